"""A ring's doorbell (:mod:`.ring`): its 12-byte messages on a seqpacket socket.

Every message is ``u8 kind | u8 flags | u16 zero | u32 index | u32 nbytes``,
big-endian; what each kind means, and which message a ring end may accept in
which state, is the ring's (:mod:`.ring`'s documentation).  This module only
writes and reads the messages, with a kernel-side timeout, and tells apart the
ways a read or a write ends badly: nothing in time (:class:`RingTimeoutError`,
which leaves the ring usable), the peer gone (:class:`RingPeerGoneError`) or a
message of the wrong shape (:class:`~migsgx.errors.ProtocolError`), after which
the ring end is dead.
"""

from __future__ import annotations

import errno
import math
import socket
import struct
from typing import Final

from ..errors import ProtocolError
from .ring_spec import RingPeerGoneError, RingTimeoutError

__all__ = ["FLAG_FINAL", "KIND_FILLED", "KIND_FREE", "Doorbell"]

# MAX_SLOTS (migsgx.limits) also keeps every doorbell queue far below its socket buffer.

_MSG = struct.Struct(">BBHII")
KIND_FILLED: Final = 1
KIND_FREE: Final = 2
FLAG_FINAL: Final = 0x01

_TIMEVAL = struct.Struct("@ll")


class Doorbell:
    """One end of a ring's doorbell; ``peer`` names the other end in a timeout's message."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self._sock = sock
        self._peer = peer
        self._out = bytearray(_MSG.size)
        self._in = bytearray(_MSG.size + 4)  # room to notice an oversize message
        self._timeout: float | None = None  # the socket's SO_RCVTIMEO

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def send(
        self, kind: int, flags: int, index: int, nbytes: int, *, peer_may_be_gone: bool = False
    ) -> None:
        """Send one message; a peer that is gone raises, unless ``peer_may_be_gone``."""

        _MSG.pack_into(self._out, 0, kind, flags, 0, index, nbytes)
        try:
            self._sock.send(self._out)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                if peer_may_be_gone:
                    return
                raise RingPeerGoneError("the ring's peer is gone") from exc
            raise

    def receive(self, timeout: float | None) -> tuple[int, int, int, int]:
        """The next message, ``(kind, flags, index, nbytes)``, well shaped (no more is checked)."""

        if timeout is not None and timeout <= 0:
            got = self._recv(socket.MSG_DONTWAIT)
        else:
            if timeout != self._timeout:
                # A kernel-side timeout keeps a wait at one system call.
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
                self._timeout = timeout
            got = self._recv(0)
        if got < 0:
            raise RingTimeoutError(
                f"no doorbell message from the ring's {self._peer} within {timeout} s"
            )
        if got == 0:
            raise RingPeerGoneError("the ring's peer is gone")
        if got != _MSG.size:
            raise ProtocolError("doorbell message of the wrong size", size=got)
        kind, flags, zero, index, nbytes = _MSG.unpack_from(self._in)
        if zero:
            raise ProtocolError("doorbell message with nonzero padding")
        return kind, flags, index, nbytes

    def _recv(self, flags: int) -> int:
        """One read: its size, 0 at end of file, -1 if nothing came in time."""

        try:
            return self._sock.recv_into(self._in, 0, flags)
        except BlockingIOError:
            return -1
        except ConnectionResetError:
            # A peer that closes with messages of ours unread makes the kernel report
            # ECONNRESET once, possibly ahead of messages it sent before closing.
            # Those are still queued: read them (or end of file) now.
            try:
                return self._sock.recv_into(self._in, 0, flags)
            except BlockingIOError:
                return -1
            except OSError as exc:
                raise RingPeerGoneError("the ring's peer is gone") from exc
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise RingPeerGoneError("the ring's peer is gone") from exc
            raise


def _timeval(timeout: float | None) -> bytes:
    if timeout is None:
        return _TIMEVAL.pack(0, 0)  # wait for ever
    micros = max(1, math.ceil(timeout * 1_000_000))
    return _TIMEVAL.pack(micros // 1_000_000, micros % 1_000_000)
