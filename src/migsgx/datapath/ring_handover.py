"""Handing one end of a ring to another process, over a unix socket.

The enclave process and the untrusted mover are separate processes: the creator
of a ring (:mod:`.ring`) sends the peer's memfd and doorbell with a small
versioned header, and the receiver checks all of it (:mod:`.ring_spec`) before it
attaches.  A job of its own: a ring end works the same whoever created it.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from typing import Final

from ..errors import ConnectionClosedError, ProtocolError
from .ring import ShmRing
from .ring_spec import RingRole, RingSpec, RingTimeoutError

__all__ = ["recv_ring_fds", "send_ring_fds"]


# Hand-over message sent with the two descriptors (see send_ring_fds).
_HANDOVER = struct.Struct(">4sBBHII")


_HANDOVER_MAGIC: Final = b"MSRG"


_HANDOVER_VERSION: Final = 1


def send_ring_fds(sock: socket.socket, ring: ShmRing) -> None:
    """Send the peer's end of ``ring`` over a unix socket, then drop our copies.

    One message: ``magic "MSRG" | u8 version | u8 role | u16 zero | u32 slots |
    u32 slot_size`` (big-endian), with the memfd and the doorbell attached.

    Until the peer has received the message, its descriptors live in the unix
    socket's queue, and the peer's death cannot show as end of file on the
    doorbell if this process still holds the receiving end of that socket: keep
    only the sending end (or use timeouts).
    """

    memfd, doorbell_fd = ring.peer_fds()
    header = _HANDOVER.pack(
        _HANDOVER_MAGIC, _HANDOVER_VERSION, ring.role.peer, 0, ring.spec.slots, ring.spec.slot_size
    )
    socket.send_fds(sock, [header], [memfd, doorbell_fd])
    ring.peer_handed_over()


def recv_ring_fds(sock: socket.socket, role: RingRole, *, timeout: float | None = None) -> ShmRing:
    """Receive a ring end sent by :func:`send_ring_fds` and attach to it as ``role``."""

    if timeout is not None:
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            raise RingTimeoutError(f"no ring arrived within {timeout} s")
    # Look before taking: if the sender died after its ``__mig_ring`` frame, the
    # next bytes are another driver's frame (a guardian's ``__mig_abort``), and
    # reading them here would cut that frame and every later one.
    try:
        head = sock.recv(len(_HANDOVER_MAGIC), socket.MSG_PEEK)
    except OSError as exc:
        raise ConnectionClosedError("could not receive the ring") from exc
    if not head:
        raise ConnectionClosedError("the peer closed before sending the ring")
    if head != _HANDOVER_MAGIC[: len(head)]:
        raise ProtocolError("no ring hand-over followed (left unread)")
    try:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _HANDOVER.size + 1, 2)
        except ConnectionResetError:
            # Reported once when the sender closed with messages of ours unread;
            # what it sent before closing is still queued.
            data, fds, _flags, _addr = socket.recv_fds(sock, _HANDOVER.size + 1, 2)
    except OSError as exc:
        raise ConnectionClosedError("could not receive the ring") from exc
    if len(fds) != 2 or len(data) != _HANDOVER.size:
        for fd in fds:
            os.close(fd)
        if not data and not fds:
            raise ConnectionClosedError("the peer closed before sending the ring")
        raise ProtocolError("malformed ring hand-over", size=len(data), fds=len(fds))
    memfd, doorbell_fd = fds
    magic, version, peer_role, zero, slots, slot_size = _HANDOVER.unpack(data)
    try:
        if magic != _HANDOVER_MAGIC or version != _HANDOVER_VERSION or zero:
            raise ProtocolError("not a ring hand-over message")
        if peer_role != role:
            raise ProtocolError("the ring was handed over for the other role", role=peer_role)
        try:
            spec = RingSpec(slots, slot_size)
        except ValueError as exc:
            raise ProtocolError(f"ring geometry out of bounds: {exc}") from exc
    except BaseException:
        os.close(memfd)
        os.close(doorbell_fd)
        raise
    return ShmRing.attach(memfd, doorbell_fd, spec, role)
