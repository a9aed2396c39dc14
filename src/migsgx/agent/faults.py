"""Named fault points, for tests of the failure paths with real processes.

``MIGSGX_FAULT=POINT:ACTION[,POINT:ACTION...]`` in the environment of an agent
or a migration tool makes it fail at ``POINT``: ``exit`` ends the process at
once (as a crash would), ``kill`` sends it SIGKILL, ``kill-after=SECONDS``
sends it SIGKILL that much later while the work goes on, ``fail`` raises
:class:`InjectedFault`, ``wait-file=PATH`` holds the process there until PATH
exists (a test looks at it in that state, then lets it go); any other action
is returned to the caller, which knows what it means there (``corrupt``
before a restore or of the page stream, ``kill-after-bytes=N`` while an
enclave stream comes in, ``kill-source`` at a point of the tool: SIGKILL to
the source application, for example).
Unset, every point is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Final

from ..errors import MigrationError, register_error

ENV: Final = "MIGSGX_FAULT"

#: Every point the code defines, so that a typo in a test is caught.
POINTS: Final = frozenset(
    {
        "agent.enclave-receive",  # while the incoming enclaves receive
        "agent.page-stream",  # ``corrupt``: one byte of CRIU's page stream flipped in flight
        "agent.before-restore",
        "agent.after-restore",
        "tool.after-prepare",
        "ckpt.before-dump",  # checkpoint: enclave files written, CRIU not started
        "ckpt.before-commit",  # checkpoint: in post-dump, metadata written, tree fenced
        "ckpt.after-commit",  # checkpoint: every enclave gave its state up
        "restore.held",  # restore: enclaves loaded (not running), CRIU restored the tree held
        "restore.loaded",  # restore: the same step, right before the activation
        "tool.before-dump",  # the enclaves stream, CRIU has not started
        "tool.before-commit",
        "tool.after-commit",
    }
)


@register_error
class InjectedFault(MigrationError):
    """A fault injected through $MIGSGX_FAULT."""

    code = "injected-fault"


WAIT_LIMIT: Final = 120.0


def _wait_for(path: Path, point: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not path.exists():
        if time.monotonic() > deadline:
            raise InjectedFault(f"{point}: {path} did not appear within {WAIT_LIMIT} s")
        time.sleep(0.02)


def fault(point: str) -> str | None:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}")
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    for item in spec.split(","):
        name, _, action = item.strip().partition(":")
        if name != point:
            continue
        if action == "exit":
            os._exit(70)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action.startswith("kill-after="):
            delay = float(action.partition("=")[2])
            timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()
            return None
        if action == "fail":
            raise InjectedFault(f"fault injected at {point}")
        if action.startswith("wait-file="):
            _wait_for(Path(action.partition("=")[2]), point)
            return None
        return action
    return None


def corrupting_relay(conn: socket.socket, offset: int = 64 << 10) -> socket.socket:
    """A socket that carries ``conn``'s bytes, with the byte at ``offset`` (inbound) flipped.

    For the ``corrupt`` action of a stream: the relay stands where a network
    fault would, between the peer and the local reader, and changes exactly one
    byte, so the test knows the stream was damaged and by how much.
    """

    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def pump(src: socket.socket, dst: socket.socket, flip_at: int | None) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    buf = bytearray(data)
                    buf[flip_at - seen] ^= 0x01
                    data = bytes(buf)
                seen += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    for args in ((conn, outer, offset), (outer, conn, None)):
        threading.Thread(target=pump, args=args, name="migsgx-fault-relay", daemon=True).start()
    return inner
