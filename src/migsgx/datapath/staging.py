"""Sequential mode's whole state, staged in an untrusted driver between rings and connection.

Pipelined mode moves each slot on as it fills (:mod:`.transport`); sequential mode
first takes the whole state in, then sends it (source), or receives all of it
before the enclave loads (destination).  That buffer has a lifetime of its own
(made before the freeze, pre-faulted in a thread, closed after the transfer),
so it is its own module, speaking the same chunk frames.
"""

from __future__ import annotations

import contextlib
import mmap
import socket
import threading
from collections.abc import Iterator
from typing import Final

from .._populate import populate
from ..core.peer import CHUNK_HEADER
from ..errors import FrameError
from .ring import ShmRing
from .transport import read_chunk_header, recv_exactly_into, send_chunk

__all__ = ["Staging"]


_STAGING_SLACK: Final = 16 << 20


class Staging:
    """Sequential mode's whole-state buffer in an untrusted driver, with chunk boundaries.

    Source: :meth:`drain` the ring into it while the enclave dumps, then
    :meth:`send`.  Destination: :meth:`receive` everything, then :meth:`fill`
    the ring while the enclave loads.  Chunks keep the boundaries they had in
    the source's ring, so the enclave sees the same slots either way.
    """

    def __init__(self, size: int) -> None:
        self.buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.lengths: list[int] = []
        self.used = 0
        self._ahead: threading.Thread | None = None
        self._stop_ahead = threading.Event()
        #: Bytes :meth:`prefault_ahead` faulted in (set once it stopped).
        self.prefaulted = 0

    @classmethod
    def for_state(cls, memory_size: int, chunk_size: int, overhead: int) -> Staging:
        """Room for a state of ``memory_size`` in chunks, ``overhead`` bytes added to each."""

        return cls(cls.staged_size(memory_size, chunk_size, overhead) + _STAGING_SLACK)

    @staticmethod
    def staged_size(memory: int, chunk_size: int, overhead: int) -> int:
        """The bytes a state of ``memory`` takes here, with its chunks' overhead."""

        return memory + (memory // chunk_size + 16) * (overhead + 512)

    def prefault_ahead(self, nbytes: int) -> None:
        """Fault in the first ``nbytes`` of the buffer in a thread, from now on.

        Called before the freeze (at the handshake) with the size of the state
        to come: the first touch of a fresh buffer is a page fault per page
        (0.3-0.4 CPU seconds per GiB here, several times that when the VM's host
        must back the pages first), and without this it falls inside the frozen
        window, in the driver's copy (source) or receive (destination).
        :meth:`stop_ahead` (or :meth:`close`) ends it.
        """

        if self._ahead is not None or nbytes <= 0:
            return

        def run() -> None:
            self.prefaulted = populate(self.buffer, nbytes, self._stop_ahead)

        self._ahead = threading.Thread(target=run, name="migsgx-staging-prefault", daemon=True)
        self._ahead.start()

    def wait_ahead(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` for :meth:`prefault_ahead` to end by itself; its bytes."""

        if self._ahead is not None:
            self._ahead.join(timeout)
        return self.prefaulted

    def stop_ahead(self) -> int:
        """Stop :meth:`prefault_ahead` (what it did stays); the bytes it faulted in."""

        if self._ahead is not None:
            self._stop_ahead.set()
            self._ahead.join()
        return self.prefaulted

    def _append(self, n: int) -> memoryview:
        if self.used + n > len(self.buffer):
            raise FrameError("the state is larger than the staging buffer", at=self.used)
        view = memoryview(self.buffer)[self.used : self.used + n]
        self.used += n
        self.lengths.append(n)
        return view

    def drain(self, ring: ShmRing, timeout: float | None = None) -> None:
        """Copy every slot of ``ring`` (consumer end) in, until the final one."""

        while True:
            index, slot, final = ring.next(timeout)
            with self._append(len(slot)) as room:
                room[:] = slot
            ring.release(index)
            if final:
                return

    def receive(self, sock: socket.socket, cap: int) -> None:
        """Read chunk frames in until the final one; each at most ``cap`` bytes."""

        header = bytearray(CHUNK_HEADER.size)
        while True:
            n, final = read_chunk_header(sock, header, cap)
            with self._append(n) as room:
                recv_exactly_into(sock, room)
            if final:
                return

    def chunks(self) -> Iterator[tuple[memoryview, bool]]:
        """Every staged chunk in order, with the final flag on the last one."""

        with memoryview(self.buffer) as view:
            pos = 0
            last = len(self.lengths) - 1
            for i, n in enumerate(self.lengths):
                yield view[pos : pos + n], i == last
                pos += n

    def send(self, sock: socket.socket) -> int:
        """Send every staged chunk as a chunk frame; return the bytes sent."""

        for chunk, final in self.chunks():
            send_chunk(sock, chunk, final=final)
            chunk.release()
        return self.used

    def fill(self, ring: ShmRing, timeout: float | None = None) -> None:
        """Publish every staged chunk into ``ring`` (producer end), one per slot."""

        for chunk, final in self.chunks():
            index, slot = ring.acquire(timeout)
            slot[: len(chunk)] = chunk
            ring.publish(index, len(chunk), final=final)
            chunk.release()

    def close(self) -> None:
        self.stop_ahead()  # (its madvise needs the mapping)
        with contextlib.suppress(BufferError):
            self.buffer.close()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
