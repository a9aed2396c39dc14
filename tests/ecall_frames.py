"""ECALL frames written by hand on an enclave's connection, for the tests of its reader.

What a driver or an application writes when a test speaks for it: an ``ecall``
frame (its own id), that frame with descriptors on it (the ``__mig_watch`` form
with its pidfds), ``__mig_hold`` as ``EnclaveLink.hold`` sends it (the frame,
then ``H`` with the descriptors), and the answer to one call read past any other
frame.  One id count for every caller in a process: no two calls share an id, and
none meets the ids of an ``EnclaveClient`` or ``EnclaveLink`` on the same
connection (those count from 1 and from 2**40).
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Sequence
from typing import Any

from migsgx.channel import ECALL, ECALL_FRAME_MAX, HOLD_BYTE
from migsgx.wire import encode, recv_frame

__all__ = ["answer", "call", "ecall_frame", "send_ecall", "send_hold", "send_with_fds"]

_IDS = itertools.count(1 << 45)


def ecall_frame(fn: str, args: list[Any]) -> tuple[int, bytes]:
    """A fresh call id and its encoded ``ecall`` frame."""

    call_id = next(_IDS)
    frame = encode({"t": "ecall", "id": call_id, "fn": fn, "args": args},
                   max_size=ECALL_FRAME_MAX)  # fmt: skip
    return call_id, frame


def send_ecall(sock: socket.socket, fn: str, args: list[Any]) -> int:
    """Send one call; returns its id (its answer: :func:`answer`)."""

    call_id, frame = ecall_frame(fn, args)
    sock.sendall(frame)
    return call_id


def send_with_fds(sock: socket.socket, fn: str, args: list[Any], fds: Sequence[int]) -> int:
    """Send one call with ``fds`` on its own frame (one message); returns its id."""

    call_id, frame = ecall_frame(fn, args)
    socket.send_fds(sock, [frame], list(fds))
    return call_id


def send_hold(sock: socket.socket, nonce: bytes, fds: Sequence[int]) -> int:
    """``__mig_hold`` as ``EnclaveLink.hold`` sends it: the frame, then ``H`` with
    ``fds``; returns its id."""

    call_id = send_ecall(sock, "__mig_hold", [nonce])
    socket.send_fds(sock, [HOLD_BYTE], list(fds))
    return call_id


def answer(sock: socket.socket, call_id: int) -> dict[str, Any]:
    """The answer to ``call_id``, or the enclave's ``err`` of id 0 (a bad frame)."""

    while (msg := recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX))["id"] not in (call_id, 0):
        pass
    return msg


def call(sock: socket.socket, fn: str, args: list[Any]) -> dict[str, Any]:
    """One call and its answer."""

    return answer(sock, send_ecall(sock, fn, args))
