"""What both ends of a shared-memory ring (:mod:`.ring`) agree on before either maps a byte.

Its geometry and the roles of its two ends, the errors a peer can cause, and the
checks of the descriptors a peer hands over: they are shared by the ring end
itself and by the hand-over between processes (:mod:`.ring_handover`), and say
nothing about the doorbell protocol, so they stand apart from both.
"""

from __future__ import annotations

import enum
import fcntl
import os
import socket
import stat
from dataclasses import dataclass
from typing import Final

from ..errors import ConnectionClosedError, MigrationError, ProtocolError, register_error
from ..limits import MAX_SLOT_SIZE, MAX_SLOTS

__all__ = [
    "REQUIRED_SEALS",
    "RingPeerGoneError",
    "RingRole",
    "RingSpec",
    "RingTimeoutError",
    "check_doorbell",
    "check_memfd",
]


REQUIRED_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@register_error
class RingTimeoutError(MigrationError):
    """The peer did not answer within the timeout."""

    code = "timeout"


class RingPeerGoneError(ConnectionClosedError):
    """End of file on the doorbell: the other end of the ring closed it or died.

    Kept apart from a closed socket so that a mover whose ring the enclave shut
    (because the enclave itself failed) does not pass for the cause.
    """


class RingRole(enum.IntEnum):
    """Which end of the ring a process holds."""

    PRODUCER = 1
    CONSUMER = 2

    @property
    def peer(self) -> RingRole:
        return RingRole.CONSUMER if self is RingRole.PRODUCER else RingRole.PRODUCER


@dataclass(frozen=True)
class RingSpec:
    """A ring's geometry."""

    slots: int
    slot_size: int

    def __post_init__(self) -> None:
        if not 1 <= self.slots <= MAX_SLOTS:
            raise ValueError(f"slots must be in 1..{MAX_SLOTS}, not {self.slots}")
        if not 1 <= self.slot_size <= MAX_SLOT_SIZE:
            raise ValueError(f"slot_size must be in 1..{MAX_SLOT_SIZE}, not {self.slot_size}")

    @property
    def size(self) -> int:
        return self.slots * self.slot_size


def check_doorbell(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise ProtocolError("the ring's doorbell descriptor is not a socket") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.close()
        raise ProtocolError("the ring's doorbell is not a unix seqpacket socket")
    sock.setblocking(True)
    return sock


def check_memfd(fd: int, spec: RingSpec) -> None:
    try:
        info = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ProtocolError("the ring's memory descriptor is not a sealed memfd") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ProtocolError("the ring's memory descriptor is not a regular file")
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ProtocolError("the ring's memory may still change size", seals=seals)
    if info.st_size != spec.size:
        raise ProtocolError(
            "the ring's memory does not match its geometry", size=info.st_size, want=spec.size
        )
