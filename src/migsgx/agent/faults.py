"""Named fault points, for tests of the failure paths with real processes.

``MIGSGX_FAULT=POINT:ACTION[,POINT:ACTION...]`` in the environment of an agent
or a migration tool makes it fail at ``POINT``: ``exit`` ends the process at
once (as a crash would), ``kill`` sends it SIGKILL, ``kill-after=SECONDS``
sends it SIGKILL that much later while the work goes on, ``fail`` raises
:class:`InjectedFault`, ``wait-file=PATH`` holds the process there until PATH
exists (a test looks at it in that state, then lets it go); any other action
is returned to the caller, which knows what it means there (``corrupt``
before a restore, ``corrupt``/``drop``/``reorder``/``truncate``/``replay`` of the
page stream (:func:`tampering_relay`), ``kill-after-bytes=N`` while an
enclave stream comes in, ``kill-source`` at a point of the tool: SIGKILL to
the source application, for example; ``hold-to-restored=N`` and
``flip-byte-in-restore=N`` at ``tool.enclave-stream``: the enclave stream from
byte N on is held until the destination answered ``restored`` (resp. held,
byte N flipped, until the tool asked for the restore), so that the restore
overlaps a load that cannot have ended; ``kill-criu`` after the commit point of
a post-copy migration: SIGKILL to the source's CRIU, the only server of the
pages still missing; ``kill-guardian-and-tool`` at a point of the tool: SIGKILL to
its guardian, then to the tool itself; ``kill-source-platform-and-tool``: SIGKILL
to this host's platform service, then to the tool; ``kill-first-source-enclave-and-tool``:
SIGKILL to the first source enclave, then to the tool (``...-guardian-and-tool``: to
its guardian first; ``stop-first-source-enclave-and-tool``: SIGSTOP to it instead, a
hung enclave); ``kill-first-source-enclave``: SIGKILL to it alone, the tool lives on;
``kill-enclave-and-exit`` at a point of the checkpoint tool: SIGKILL to its first
enclave, then the tool ends (``kill-enclave-guardian-and-exit``: to its guardian
first); ``abort-rest`` at ``ckpt.between-commits``: the checkpoint tool aborts the
enclaves not yet committed, as a racing guardian would, and dies).
Unset, every point is a no-op.
A fault's mark is on stderr (``migsgx fault: POINT:ACTION at T``); with
``MIGSGX_TRACE`` set the steps around it are too (:mod:`migsgx._trace`).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from .. import _proc
from ..errors import MigrationError, register_error

ENV: Final = "MIGSGX_FAULT"

#: Every point the code defines, so that a typo in a test is caught.
POINTS: Final = frozenset(
    {
        "agent.enclave-receive",  # while the incoming enclaves receive
        "agent.page-stream",  # corrupt|drop|reorder|truncate|replay: the page stream in flight
        "agent.before-restore",
        # The engine made the container, its restore has not returned; a process tree:
        # CRIU restored it, in its pre-resume notification (it has not detached).
        "agent.in-restore",
        # The tree restored and held (overlapped: the enclaves may still load), the
        # record not answered, ``restored`` not yet sent.
        "agent.after-restore",
        # Overlapped: held-loading, every enclave LOADED, not yet checked alive nor answered.
        "agent.enclaves-loaded",
        "agent.before-resume",  # the tool's resume arrived (the tokens went before it)
        "agent.resume-marked",  # no enclaves: the resume is recorded, the tree not yet continued
        "agent.after-resume",  # the tree runs (and its enclaves are attached), no answer yet
        "agent.before-claim",  # the first decision frame reached an enclave (window W2)
        "agent.after-claim",  # an enclave claimed the id and runs, the tree not resumed (W3)
        "tool.after-handshake",  # early handshake done, the application not yet frozen
        # In the application (``resume``): its connections taken back, no ``__mig_unhold``
        # sent yet; ``no-unhold``: answer without it, as a runtime older than that call.
        "app.resume-taken",
        "tool.after-prepare",
        "guardian.retry",  # ``give-up``: the guardian in doubt stops as if its 10 minutes ran out
        # the tool died; the source enclaves answered the guardian's abort, frames not journaled
        "guardian.abort-answered",
        # the tool died; the guardian handed the aborted enclaves back, its journal not done
        "guardian.handed-back",
        # recover took the connections back; the enclaves answered its abort, frames not journaled
        "recover.abort-answered",
        "recover.redeliver",  # a re-delivery without the tool: fresh copy's data connection open
        # A platform store's first user found none and writes it now (``wait-file`` only;
        # read by :mod:`migsgx.sgx.store_file` itself, below this module).
        "counters.before-create",
        # The platform service received an enclave's COMMIT (a decision, or a lone
        # checkpoint gate's commit) and has not written it; ``after``: written, not yet
        # answered.  ``kill-enclave`` only: it SIGKILLs that enclave and goes on once its
        # channel hung up (read by :mod:`migsgx.sgx.service_requests` itself).
        "platform.before-commit",
        "platform.after-commit",
        "ckpt.before-dump",  # checkpoint: enclave files written, CRIU not started
        "ckpt.before-commit",  # checkpoint: in post-dump, metadata written, tree fenced
        "ckpt.between-commits",  # checkpoint: one enclave's gate committed, the next not yet
        "ckpt.after-commit",  # checkpoint: every enclave gave its state up
        "ckpt.rolled-back",  # checkpoint: the enclaves aborted, not yet handed back
        "restore.before-criu",  # restore: enclaves loaded (not running), CRIU not started
        "restore.held",  # restore: enclaves loaded (not running), CRIU restored the tree held
        "restore.loaded",  # restore: the same step, right before the activation
        "restore.activated",  # restore: the enclaves activated, the tree not running, not attached
        "tool.before-dump",  # the enclaves stream, CRIU has not started
        # CRIU froze the tree, nothing of it dumped (the pid driver's ``query-ext-files``);
        # a connection fault (``stall-control``) there holds the dump until the tool gives
        # it up (at most 20 s): a stall that begins inside the engine's long step.
        "tool.in-dump",
        "tool.ring-handover",  # an enclave's __mig_ring frame went, its descriptors not yet
        "tool.before-images",  # every enclave LOADED, CRIU dumped, the images not yet sent
        "tool.before-restore",  # post-copy: the lazy dump serves, no restore asked yet
        "tool.before-commit",
        # Overlapped: the destination answered ``restored``, the enclave streams not joined.
        "tool.restored-loading",
        "tool.after-group",  # every source enclave joined the migration group, none decided
        "tool.between-commits",  # one source enclave committed, the next not yet
        "tool.after-commit",
        "tool.before-release",  # journal ``done``, the committed source enclaves not released
        "tool.after-resumed",  # no enclaves: the destination answered resumed, journal not done
        "tool.after-abort",  # roll-back: the source enclaves decided ABORT, nothing undone yet
        # roll-back: the destination answered it keeps nothing, the source not resumed yet
        "tool.rolled-back",
        # roll-back: an enclave answered its ABORT, the frame not yet on its data connection
        "tool.abort-answered",
        "tool.before-token",  # each COMMIT token, before it goes on the data connection
        "tool.enclave-stream",  # each enclave's data connection, once it is open
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


def armed(point: str) -> bool:
    """Whether the fault spec names ``point`` (without firing it): a step that costs
    time only to reach the point (a CRIU notification) is taken only then."""

    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}")
    names = {item.strip().partition(":")[0] for item in os.environ.get(ENV, "").split(",")}
    return point in names


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
        # When, on the system-wide monotonic clock: tests measure from here.
        sys.stderr.write(f"migsgx fault: {point}:{action} at {time.monotonic():.6f}\n")
        sys.stderr.flush()
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


def socket_owner(path: Path) -> int:
    """The pid that listens on the Unix socket ``path`` (``SO_PEERCRED``)."""

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    finally:
        sock.close()
    return int.from_bytes(creds[:4], "little")


def kill_dead(pids: list[int]) -> None:
    """SIGKILL ``pids`` and return once each is dead (a zombie holds no socket)."""

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while any(_proc.alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise InjectedFault("fault injection: a victim did not die")
        time.sleep(0.01)


#: ``PF_EXITING`` in the flags of ``/proc/PID/stat``: the task is in ``do_exit``.
_PF_EXITING: Final = 0x4
#: SIGKILL in the pending-signal masks of ``/proc/PID/status`` (bit ``signal - 1``).
_SIGKILL_BIT: Final = 1 << (signal.SIGKILL - 1)


def dying(pid: int) -> bool:
    """Whether ``pid`` is gone, a zombie, past the point of no return (exiting), or
    holds a SIGKILL it has yet to take.

    A killed pid-namespace init whose children CRIU still traces stays in its
    exit until CRIU lets them go; waiting for it to be a zombie there would wait
    on CRIU, which waits on the tool.  A task frozen in its cgroup (a committed
    container's, cgroup v1's freezer) takes its SIGKILL only once thawed: waiting
    for it to exit would wait for good (the tool hung at ``kill-source`` after the
    commit, found by a podman storm).
    """

    fields = _proc.stat(pid)
    if fields is None:
        return True
    if fields[_proc.STATE] in ("Z", "X") or bool(int(fields[_proc.FLAGS]) & _PF_EXITING):
        return True
    return any(
        int(_proc.status_field(pid, name) or "0", 16) & _SIGKILL_BIT
        for name in ("ShdPnd", "SigPnd")
    )


def flipping_relay(
    peer: socket.socket,
    offset: int,
    hold: Callable[[], bool] | None = None,
    *,
    drop: bool = False,
    flip: bool = True,
) -> socket.socket:
    """A loopback relay to ``peer`` that flips one bit of byte ``offset`` sent through it.

    The untrusted side (or the network) corrupting one byte of an enclave stream:
    what the enclaves must catch.  Returns the relay's near end; bytes from the
    peer pass unchanged.  ``hold``: the damaged byte goes on only once it is true
    (polled, at most :data:`WAIT_LIMIT` seconds): the failure then reaches the
    source at a step the test names (``flip-byte-in-dump``: while the engine's
    CRIU writes the process's pages).  ``drop``: at that byte the relay shuts the
    connection down both ways instead (``drop-in-dump``: the stream dropped).
    ``flip`` False: byte ``offset`` goes on unchanged, only held (``hold-to-restored``:
    the enclave cannot reach LOADED before the destination restored the tree).
    """

    listener = socket.create_server(("127.0.0.1", 0))
    try:
        near = socket.create_connection(listener.getsockname()[:2])
        far, _ = listener.accept()
    finally:
        listener.close()

    def pump(src: socket.socket, dst: socket.socket, flip_at: int | None) -> None:
        seen = 0
        held: bytearray | None = None  # from the damaged byte on, until ``hold``
        deadline, ended = 0.0, False
        try:
            while True:
                if held is not None:
                    # Read on while holding: a sender left without a window for longer
                    # than its TCP user timeout (3 s) would fail for that instead.
                    if hold is not None and not hold() and time.monotonic() < deadline:
                        if ended:
                            time.sleep(0.005)
                        elif select.select([src], [], [], 0.005)[0]:
                            more = src.recv(1 << 16)
                            ended = not more
                            held += more
                        continue
                    if drop:
                        break  # (nothing from the byte on: both ends shut down below)
                    dst.sendall(held)
                    held = None
                    if ended:
                        break
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    data[flip_at - seen] ^= 0x01 if flip else 0x00
                    if hold is not None or drop:
                        held, deadline = data, time.monotonic() + WAIT_LIMIT
                seen += len(data)
                if held is None:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    for args in ((far, peer, offset), (peer, far, None)):
        threading.Thread(target=pump, args=args, name="migsgx-fault-relay", daemon=True).start()
    return near


#: What ``agent.page-stream`` can do to the page stream as it comes in.  ``corrupt``
#: flips one byte (any format, CRIU's TLS too); the others work on whole frames of
#: the sealed relay's format (``docs/spec/pagestream.md``: u32 length, body).
PAGE_STREAM_ACTIONS: Final = frozenset({"corrupt", "drop", "reorder", "truncate", "replay"})


def _frames(sock: socket.socket) -> Iterator[bytes]:
    """Whole length-prefixed frames from ``sock`` until EOF (a partial tail as it is)."""

    buf = bytearray()
    while data := sock.recv(1 << 20):
        buf += data
        while len(buf) >= 4:
            end = 4 + int.from_bytes(buf[:4], "big")
            if len(buf) < end:
                break
            yield bytes(buf[:end])
            del buf[:end]
    if buf:
        yield bytes(buf)


#: The frame ``drop``, ``reorder`` (with the next) and ``replay`` act on: the page
#: server answers CRIU's first request before the bulk of the pages comes, so the
#: first frames are a request and its wait; from the third on, frames follow each
#: other without one while the pages last (a frame that holds a request CRIU waits
#: on, dropped, stalls the stream instead: see the spec).  A process of more than
#: 8 MiB of pages (any Python process: two frames of at most 4 MiB) has a frame 3.
TAMPERED_FRAME: Final = 2
_EMPTY_FRAME: Final = 4 + 16  # length and tag only: the relay's last frame, no other


def _tamper_frames(src: socket.socket, dst: socket.socket, action: str) -> None:
    """``drop`` frame 2, ``reorder`` frames 2 and 3, ``truncate`` (withhold) the last
    frame, or ``replay`` frame 2 after the last."""

    kept: bytes | None = None
    for count, frame in enumerate(_frames(src)):
        if action == "truncate" and len(frame) == _EMPTY_FRAME:
            continue  # every page arrives; only the stream's end is missing
        if count == TAMPERED_FRAME and action in ("drop", "reorder", "replay"):
            kept = frame
            if action != "replay":
                continue
        dst.sendall(frame)
        if action == "reorder" and count == TAMPERED_FRAME + 1 and kept is not None:
            dst.sendall(kept)
            kept = None
    if kept is not None and action in ("reorder", "replay"):
        dst.sendall(kept)


def tampering_relay(conn: socket.socket, action: str, offset: int = 64 << 10) -> socket.socket:
    """A socket that carries ``conn``'s bytes, the inbound ones changed by ``action``.

    The relay stands where a network attacker would, between the peer and the
    local reader, and does exactly one named thing (:data:`PAGE_STREAM_ACTIONS`;
    ``corrupt`` flips the byte at ``offset``), so the test knows how the stream
    was damaged.
    """

    if action not in PAGE_STREAM_ACTIONS:
        raise ValueError(f"unknown page-stream action {action!r}")
    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def pump(src: socket.socket, dst: socket.socket, change: str | None) -> None:
        seen = 0
        try:
            if change not in (None, "corrupt"):
                _tamper_frames(src, dst, change)
            else:
                while data := src.recv(1 << 16):
                    if change is not None and seen <= offset < seen + len(data):
                        buf = bytearray(data)
                        buf[offset - seen] ^= 0x01
                        data = bytes(buf)
                    seen += len(data)
                    dst.sendall(data)
        except OSError:
            # The reader went away (it refused the stream): as a network would,
            # stop carrying either way, so that no writer waits on a full buffer.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    for args in ((conn, outer, action), (outer, conn, None)):
        threading.Thread(target=pump, args=args, name="migsgx-fault-relay", daemon=True).start()
    return inner


def firewall_drop(port: int) -> None:
    """A network stall of the TCP connections on local ``port`` (no process dies).

    This host's firewall drops their packets both ways from now on; the test
    that asked for it removes the rules.
    """

    for chain, side in (("INPUT", "--dport"), ("OUTPUT", "--sport")):
        subprocess.run(
            ["iptables", "-I", chain, "-p", "tcp", side, str(port), "-j", "DROP"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip


#: A TLS 1.2/1.3 application-data record header and a body that cannot authenticate.
_DAMAGED_RECORD: Final = b"\x17\x03\x03\x00\x20" + b"\xa5" * 32


def connection_fault(sock: socket.socket, kind: str) -> None:
    """A network fault of one open connection: ``drop``, ``stall`` or ``corrupt``.

    ``corrupt`` puts one record on a TLS connection that fails authentication at
    the peer, as a byte flipped in flight makes any record fail (what the peer
    sees is the same ``bad_record_mac``); the bytes go past this end's TLS, so
    its own state is untouched.
    """

    if kind == "drop":
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    elif kind == "stall":
        firewall_drop(int(sock.getsockname()[1]))
    elif kind == "corrupt":
        with contextlib.suppress(OSError):
            os.write(sock.fileno(), _DAMAGED_RECORD)
    else:
        raise ValueError(f"unknown connection fault {kind!r}")


def cutting_relay(conn: socket.socket, after: int, kind: str) -> socket.socket:
    """A socket that carries ``conn``'s bytes until ``after`` have come in, then a fault.

    ``drop``: both ends are shut down (the connection breaks mid-stream);
    ``stall``: this host's firewall drops ``conn``'s packets from then on and the
    relay forwards nothing more (the stream stops, nothing closes).
    """

    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def inbound() -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := conn.recv(1 << 16):
                if seen + len(data) >= after:
                    outer.sendall(data[: max(0, after - seen)])
                    sys.stderr.write(f"migsgx fault: relay:{kind}-now at {time.monotonic():.6f}\n")
                    sys.stderr.flush()
                    if kind == "stall":
                        firewall_drop(int(conn.getsockname()[1]))
                        return  # nothing more is read: the peer's sends stop at the window
                    for sock in (conn, outer):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                    return
                seen += len(data)
                outer.sendall(data)
        with contextlib.suppress(OSError):
            outer.shutdown(socket.SHUT_WR)

    def outbound() -> None:
        with contextlib.suppress(OSError):
            while data := outer.recv(1 << 16):
                conn.sendall(data)

    for target in (inbound, outbound):
        threading.Thread(target=target, name="migsgx-fault-relay", daemon=True).start()
    return inner
