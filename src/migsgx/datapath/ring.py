"""A single-producer, single-consumer ring of fixed-size slots in shared memory.

Bulk bytes cross between an enclave process and the untrusted process the way an
SGX enclave writes straight into untrusted memory: through pages both processes
map, never as a copy through a socket.  Only small control messages travel on a
socket, the *doorbell*.

Shared memory
    One ``memfd`` of exactly ``slots * slot_size`` bytes, slot ``i`` at offset
    ``i * slot_size``.  The creating side seals it with ``F_SEAL_SHRINK``,
    ``F_SEAL_GROW`` and ``F_SEAL_SEAL`` before handing it over, and the attaching
    side refuses a descriptor without those seals or with another size: a peer
    that could shrink the file could make the other process fault (SIGBUS) on a
    page it had mapped.  Nothing in the shared pages is control state; every index
    and length comes from the doorbell and is checked against this end's own
    bookkeeping.

Doorbell
    One ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair.  Every message is exactly 12
    bytes, big-endian::

        u8 kind | u8 flags | u16 zero | u32 index | u32 nbytes

    ``kind`` 1 (FILLED), producer to consumer: slot ``index`` holds ``nbytes``
    bytes; ``flags`` bit 0 marks the final slot of the stream.
    ``kind`` 2 (FREE), consumer to producer: slot ``index`` may be reused;
    ``flags`` and ``nbytes`` are zero.

    End of file on the doorbell means the peer is gone (its process died or it
    closed the ring): the waiting side raises
    :class:`~migsgx.errors.ConnectionClosedError` and never hangs.  Any other
    message the protocol does not allow (wrong size, unknown kind or flags,
    nonzero padding, an index out of range, a length above the slot size, FILLED
    for a slot the consumer still holds, FREE for a slot the producer has not
    published) raises :class:`~migsgx.errors.ProtocolError`.  After a peer error
    the ring end is dead: every later call raises again.  After the final slot a
    consumer reads no more messages.  Misuse by the local caller (publishing a
    slot it did not acquire, releasing one it does not hold, reading past the
    final slot) raises ``ValueError`` or ``RuntimeError``.

The untrusted side may be hostile.  It can stop the transfer with a clean error,
but it cannot make this end index outside its mapping or hand the caller a view
longer than a slot.  It *can* change a slot's bytes at any time, including while
the caller reads them: a consumer that must not be fooled by two reads of the
same bytes (a double fetch) copies the slot into private memory first, and
authenticated encryption catches every change made before that copy.

Views handed out by :meth:`ShmRing.acquire` and :meth:`ShmRing.next` are
released when the slot is published or released, so a stale view cannot be
used by mistake, and :meth:`ShmRing.close` can unmap safely.

A ring end is not thread-safe: one thread drives it (worker threads may fill or
read the views it hands out).

This module is the ring end and its doorbell protocol; the terms both ends share
(geometry, roles, errors, the descriptor checks) are :mod:`.ring_spec`, the
doorbell's messages on their socket :mod:`.ring_doorbell`, and handing an end to
another process :mod:`.ring_handover`.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import mmap
import os
import socket
from collections import deque
from types import TracebackType
from typing import NoReturn

from ..errors import MigSGXError, ProtocolError
from .ring_doorbell import FLAG_FINAL, KIND_FILLED, KIND_FREE, Doorbell
from .ring_spec import (
    REQUIRED_SEALS,
    RingRole,
    RingSpec,
    RingTimeoutError,
    check_doorbell,
    check_memfd,
)

__all__ = ["ShmRing"]


class _Slot(enum.Enum):
    # Producer end.
    FREE = "free"  # ours, idle
    ACQUIRED = "acquired"  # ours, lent to the caller
    PUBLISHED = "published"  # the consumer's
    # Consumer end.
    AWAY = "away"  # the producer's, or filled and not yet announced
    HELD = "held"  # announced, lent to the caller


class ShmRing:
    """One end of a shared-memory ring (see the module documentation)."""

    def __init__(
        self,
        role: RingRole,
        spec: RingSpec,
        mapping: mmap.mmap,
        doorbell: socket.socket,
        *,
        memfd: int | None = None,
        peer_doorbell: socket.socket | None = None,
    ) -> None:
        """Use :meth:`create`, :meth:`attach` or :meth:`pair`."""

        self.role = role
        self.spec = spec
        # Hot-path copies: the role this end may act as (None once closed or
        # failed), the geometry.
        self._usable: RingRole | None = role
        self._slots = spec.slots
        self._slot_size = spec.slot_size
        self._mm = mapping
        self._doorbell = Doorbell(doorbell, role.peer.name.lower())
        self._memfd = memfd
        self._peer_doorbell = peer_doorbell
        self._rw = memoryview(mapping)
        self._ro = self._rw.toreadonly()
        self._lent: dict[int, memoryview] = {}
        self._stuck: list[memoryview] = []
        self._final = False
        self._failure: MigSGXError | None = None
        self._closed = False
        initial = _Slot.FREE if role is RingRole.PRODUCER else _Slot.AWAY
        self._state = [initial] * spec.slots
        self._free: deque[int] = deque(range(spec.slots)) if role is RingRole.PRODUCER else deque()

    # --- construction -----------------------------------------------------------
    @classmethod
    def create(cls, slots: int, slot_size: int, role: RingRole) -> ShmRing:
        """Make a new ring and return this process's end, holding the peer's descriptors.

        Give the peer :meth:`peer_fds` (and :attr:`spec`), then call
        :meth:`peer_handed_over` so that the peer's death becomes visible here.
        """

        spec = RingSpec(slots, slot_size)
        memfd = os.memfd_create("migsgx-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(memfd, spec.size)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
            mapping = mmap.mmap(memfd, spec.size, mmap.MAP_SHARED)
        except BaseException:
            os.close(memfd)
            raise
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(role, spec, mapping, mine, memfd=memfd, peer_doorbell=theirs)

    @classmethod
    def attach(cls, memfd: int, doorbell_fd: int, spec: RingSpec, role: RingRole) -> ShmRing:
        """Attach to a ring another process created; takes ownership of both descriptors.

        Everything about the descriptors is checked, since they come from the peer.
        On error both are closed.
        """

        try:
            doorbell = check_doorbell(doorbell_fd)
        except BaseException:
            os.close(memfd)
            raise
        try:
            check_memfd(memfd, spec)
            mapping = mmap.mmap(memfd, spec.size, mmap.MAP_SHARED)
        except BaseException:
            doorbell.close()
            raise
        finally:
            os.close(memfd)
        return cls(role, spec, mapping, doorbell)

    @classmethod
    def pair(cls, slots: int, slot_size: int) -> tuple[ShmRing, ShmRing]:
        """Both ends in this process, for tests and for in-process pipelines."""

        producer = cls.create(slots, slot_size, RingRole.PRODUCER)
        try:
            memfd, doorbell_fd = producer.peer_fds()
            consumer = cls.attach(
                os.dup(memfd), os.dup(doorbell_fd), producer.spec, RingRole.CONSUMER
            )
        except BaseException:
            producer.close()
            raise
        producer.peer_handed_over()
        return producer, consumer

    def peer_fds(self) -> tuple[int, int]:
        """The descriptors the peer attaches with: ``(memfd, doorbell)``."""

        if self._memfd is None or self._peer_doorbell is None:
            raise RuntimeError("the peer's descriptors were already handed over")
        return self._memfd, self._peer_doorbell.fileno()

    def peer_handed_over(self) -> None:
        """Close this process's copies of the peer's descriptors."""

        if self._peer_doorbell is not None:
            self._peer_doorbell.close()
            self._peer_doorbell = None
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None

    # --- producer end -------------------------------------------------------------
    def acquire(self, timeout: float | None = None) -> tuple[int, memoryview]:
        """Wait for a free slot; return its index and a writable view of the whole slot."""

        if self._usable is not RingRole.PRODUCER:
            self._refuse(RingRole.PRODUCER)
        if self._final:
            raise RuntimeError("the final slot was already published")
        while not self._free:
            self._take_free(self._receive(timeout))
        index = self._free.popleft()
        self._state[index] = _Slot.ACQUIRED
        start = index * self._slot_size
        view = self._rw[start : start + self._slot_size]
        self._lent[index] = view
        return index, view

    def publish(self, index: int, nbytes: int, final: bool = False) -> None:
        """Hand slot ``index``, holding ``nbytes`` bytes, to the consumer."""

        if self._usable is not RingRole.PRODUCER:
            self._refuse(RingRole.PRODUCER)
        if not 0 <= index < self._slots or self._state[index] is not _Slot.ACQUIRED:
            raise ValueError(f"slot {index} is not acquired")
        if not 0 <= nbytes <= self._slot_size:
            raise ValueError(f"{nbytes} bytes do not fit a slot of {self._slot_size}")
        self._unlend(index)
        self._state[index] = _Slot.PUBLISHED
        self._send(KIND_FILLED, FLAG_FINAL if final else 0, index, nbytes)
        self._final = final

    def wait_drained(self, timeout: float | None = None) -> None:
        """Wait until the consumer has released every published slot."""

        if self._usable is not RingRole.PRODUCER:
            self._refuse(RingRole.PRODUCER)
        while any(s is _Slot.PUBLISHED for s in self._state):
            self._take_free(self._receive(timeout))

    # --- consumer end -------------------------------------------------------------
    def next(self, timeout: float | None = None) -> tuple[int, memoryview, bool]:
        """Wait for the next filled slot: ``(index, read-only view of its bytes, final)``."""

        if self._usable is not RingRole.CONSUMER:
            self._refuse(RingRole.CONSUMER)
        if self._final:
            raise RuntimeError("the final slot was already delivered")
        kind, flags, index, nbytes = self._receive(timeout)
        if kind != KIND_FILLED:
            self._fail(ProtocolError("the ring's producer sent a message only a consumer sends"))
        if flags & ~FLAG_FINAL:
            self._fail(ProtocolError("unknown doorbell flags", flags=flags))
        if index >= self._slots:
            self._fail(ProtocolError("doorbell names a slot out of range", index=index))
        if nbytes > self._slot_size:
            self._fail(ProtocolError("doorbell length exceeds the slot size", nbytes=nbytes))
        if self._state[index] is not _Slot.AWAY:
            self._fail(ProtocolError("producer filled a slot the consumer holds", index=index))
        self._state[index] = _Slot.HELD
        start = index * self._slot_size
        view = self._ro[start : start + nbytes]
        self._lent[index] = view
        self._final = bool(flags & FLAG_FINAL)
        return index, view, self._final

    def release(self, index: int) -> None:
        """Give slot ``index`` back to the producer; its view becomes unusable."""

        if self._usable is not RingRole.CONSUMER:
            self._refuse(RingRole.CONSUMER)
        if not 0 <= index < self._slots or self._state[index] is not _Slot.HELD:
            raise ValueError(f"slot {index} is not held")
        self._unlend(index)
        self._state[index] = _Slot.AWAY
        # A producer may go once it has published its final slot, without taking
        # slots back.  If it went earlier, the next call to next() finds end of file
        # after the messages it sent: that is where a consumer learns it.
        self._send(KIND_FREE, 0, index, 0, peer_may_be_gone=True)

    # --- both ends ----------------------------------------------------------------
    @property
    def slot_size(self) -> int:
        return self.spec.slot_size

    def fileno(self) -> int:
        """The doorbell's descriptor, readable when a message from the peer waits."""

        return self._doorbell.fileno()

    def close(self) -> None:
        """Close the doorbell (the peer sees end of file) and unmap the slots.

        Views still lent out are released first.  If the caller exported one of them
        further (a numpy array on a slot, say), the mapping stays until that export
        goes away, instead of failing here.
        """

        if self._closed:
            return
        self._closed = True
        self._usable = None
        self._doorbell.close()
        self.peer_handed_over()
        for index in list(self._lent):
            self._unlend(index)
        self._stuck = [v for v in self._stuck if not _try_release(v)]
        _try_release(self._ro)
        _try_release(self._rw)
        # If an export outlives the ring, the pages go when it does.
        with contextlib.suppress(BufferError):
            self._mm.close()

    def __enter__(self) -> ShmRing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------
    def _refuse(self, role: RingRole) -> NoReturn:
        if self._closed:
            raise RuntimeError("the ring is closed")
        if self.role is not role:
            raise RuntimeError(f"this is the ring's {self.role.name.lower()} end")
        failure = self._failure
        assert failure is not None
        raise type(failure)(f"ring unusable after an earlier error: {failure}") from failure

    def _fail(self, error: MigSGXError) -> NoReturn:
        """This end is dead from now on: record why and raise it."""

        self._failure = error
        self._usable = None
        raise error

    def _unlend(self, index: int) -> None:
        view = self._lent.pop(index, None)
        if view is not None and not _try_release(view):
            self._stuck.append(view)

    def _take_free(self, msg: tuple[int, int, int, int]) -> None:
        kind, flags, index, nbytes = msg
        if kind != KIND_FREE or flags or nbytes:
            self._fail(ProtocolError("the ring's consumer sent a message it may not send"))
        if index >= self._slots:
            self._fail(ProtocolError("doorbell names a slot out of range", index=index))
        if self._state[index] is not _Slot.PUBLISHED:
            self._fail(ProtocolError("consumer freed a slot it does not hold", index=index))
        self._state[index] = _Slot.FREE
        self._free.append(index)

    def _send(
        self, kind: int, flags: int, index: int, nbytes: int, *, peer_may_be_gone: bool = False
    ) -> None:
        try:
            self._doorbell.send(kind, flags, index, nbytes, peer_may_be_gone=peer_may_be_gone)
        except MigSGXError as error:
            self._fail(error)  # (its cause kept)

    def _receive(self, timeout: float | None) -> tuple[int, int, int, int]:
        try:
            return self._doorbell.receive(timeout)
        except RingTimeoutError:
            raise  # (a wait that ran out leaves the ring usable)
        except MigSGXError as error:
            self._fail(error)  # (its cause kept)


def _try_release(view: memoryview) -> bool:
    try:
        view.release()
    except BufferError:
        return False
    return True
