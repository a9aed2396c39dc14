"""``__mig_watch`` to every source enclave of a tree at once: one deadline for the group.

Before a given-back source tree continues, each of its source enclaves is told
who holds its connection now (:func:`.holders.watch_holders`).  Asked one after
the other, each bounded by :data:`.enclave_ask.HUNG_WAIT`, N enclaves that do
not answer (stopped, stuck) kept the tree stopped N times that bound.  Here every
frame is written first, then every answer is read until one deadline
(:data:`WATCH_WAIT`): a hung enclave costs one bound, whatever their number,
and the source is back within the 5 s of ``docs/spec/commit.md`` section 5.

The pidfds go as they always did: the frame, then one message of the one byte
:data:`~migsgx.channel.WATCH_BYTE` with them (``SCM_RIGHTS``), the form
``EnclaveLink.hold`` sends its ``H`` in.  Every enclave runtime reads it: one
launched before an upgrade too, whose reader drops descriptors that ride on a
frame and then waits for the ``W`` (sent on the frame alone, its wait outlived
the deadline, the application's ``__mig_unhold`` was taken for the ``W`` and
the stream went out of step).  Both are written before the deadline starts, so
an enclave that reads the frame after it still finds its ``W`` and takes the set
(its late answer is read by nobody, or passed over by id).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
import time
from collections.abc import Sequence
from typing import Any, Final

from ..channel import ECALL, ECALL_FRAME_MAX, WATCH_BYTE
from ..errors import ConnectionClosedError, MigSGXError
from ..wire import encode, recv_frame
from .enclave_ask import not_answering
from .lost_enclaves import hung_up

__all__ = ["WATCH_WAIT", "ask_all", "tell_all"]

log = logging.getLogger("migsgx.recover")

#: How long the whole group of enclaves has to answer its ``__mig_watch``.
WATCH_WAIT: Final = 2.0

_WATCH_IDS: Final = itertools.count((1 << 53) + 11)

#: One enclave to tell: its position, the connection, its pid, the hold's nonce, the pids.
Ask = tuple[int, socket.socket, int, bytes, list[int]]


def tell_all(asks: Sequence[Ask], wait: float = WATCH_WAIT) -> list[int]:
    """``__mig_watch`` with pidfds of each ask's pids, to every enclave at once; the
    positions of those that took their set within ``wait`` (one deadline for all)."""

    sent: list[tuple[socket.socket, bytes, list[int]]] = []
    kept: list[Ask] = []
    try:
        for ask in asks:
            pidfds: list[int] = []
            for pid in ask[4]:
                with contextlib.suppress(OSError):  # (gone meanwhile: nothing to watch of it)
                    pidfds.append(os.pidfd_open(pid))
            if pidfds:
                sent.append((ask[1], ask[3], pidfds))
                kept.append(ask)
        answers = ask_all(sent, wait)
    finally:
        for _, _, pidfds in sent:
            for pidfd in pidfds:
                os.close(pidfd)
    told = []
    for (index, _, enclave, _, _), (msg, why) in zip(kept, answers, strict=True):
        if msg is not None and msg["t"] == "ret":
            told.append(index)
            continue
        if msg is not None:
            why = f"{msg.get('code')}: {msg.get('message')}"
        elif why == "hung":
            why = not_answering(index, enclave, "__mig_watch")
        log.warning("enclave %d keeps the holders named with its hold (%s)", index, why)
    return told


def ask_all(
    asks: Sequence[tuple[socket.socket, bytes, list[int]]], wait: float = WATCH_WAIT
) -> list[tuple[dict[str, Any] | None, str]]:
    """Write each ``__mig_watch`` (the frame with the nonce, then ``W`` with the
    pidfds), then read the answers until one deadline ``wait`` seconds on: per ask its
    answer, or why none (``it is gone``, ``hung``: :func:`.enclave_ask.ask` tells them
    apart the same way)."""

    results: list[tuple[dict[str, Any] | None, str]] = [(None, "hung")] * len(asks)
    pending: dict[int, tuple[int, socket.socket, int]] = {}
    try:
        for position, (sock, nonce, pidfds) in enumerate(asks):
            call_id = next(_WATCH_IDS)
            frame = encode(
                {"t": "ecall", "id": call_id, "fn": "__mig_watch", "args": [nonce]},
                max_size=ECALL_FRAME_MAX,
            )
            try:
                sock.settimeout(wait)
                sock.sendall(frame)
                socket.send_fds(sock, [WATCH_BYTE], pidfds)
            except OSError:
                results[position] = (None, _silent(sock))
                continue
            pending[sock.fileno()] = (position, sock, call_id)
        deadline = time.monotonic() + wait
        while pending and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(pending), [], [], left)
            for fd in ready:
                position, sock, call_id = pending[fd]
                try:
                    sock.settimeout(max(deadline - time.monotonic(), 0.01))
                    msg = recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX)
                except ConnectionClosedError:
                    msg, results[position] = None, (None, "it is gone")
                except (MigSGXError, OSError):
                    msg, results[position] = None, (None, _silent(sock))
                if msg is None:
                    del pending[fd]
                elif msg.get("id") == call_id:
                    results[position] = (msg, "")
                    del pending[fd]
        for position, sock, _ in pending.values():
            results[position] = (None, _silent(sock))
    finally:
        for sock, _, _ in asks:
            with contextlib.suppress(OSError):
                sock.settimeout(None)
    return results


def _silent(sock: socket.socket) -> str:
    return "it is gone" if hung_up(sock) else "hung"
