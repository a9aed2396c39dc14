"""The enclave's end of a ring: chunks written straight into slots, and read out of them.

The source enclave's dump loop (:func:`fill_ring` with a sealer) and the
destination's load loop (:class:`SlotReader`, then an opener) run inside the
enclave process and touch only the ring (:mod:`.ring`), never a socket: they are
kept apart from the untrusted movers of :mod:`.transport` so that the code the
enclave runs is small and its one copy rule (a slot is copied into private memory
before anything looks at it) stands in one place.  The raw transport baseline
uses the same loops with a plain copy, so the two differ by the cipher alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import FrameError, StreamError
from .ring import ShmRing

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["ChunkWriter", "SlotReader", "copy_chunk", "drain_ring", "fill_ring"]


ChunkWriter = Callable[[memoryview, memoryview, bool], int]
"""``write(part, slot, last) -> n``: put one chunk of plaintext into a slot, say how many bytes."""


def copy_chunk(part: memoryview, slot: memoryview, last: bool) -> int:
    """The raw baseline's stand-in for sealing: the chunk copied as it is."""

    n = len(part)
    slot[:n] = part
    return n


def fill_ring(
    ring: ShmRing,
    data: Buffer,
    chunk_size: int,
    write: ChunkWriter = copy_chunk,
    *,
    final: bool = True,
    timeout: float | None = None,
) -> int:
    """Cut ``data`` into chunks, ``write`` each straight into a slot, publish it.

    This is the source enclave's dump loop: :mod:`migsgx.enclave.migrator_source` passes
    a sealer as ``write``; the raw transport baseline passes :func:`copy_chunk`,
    so the two differ by the cipher alone.  Empty ``data`` still makes one
    (empty) chunk, since a stream always ends with a chunk.  The last chunk is the
    ring's final slot if ``final``.  Returns the bytes published.
    """

    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    with memoryview(data).cast("B") as src:
        total = len(src)
        offset = 0
        published = 0
        while True:
            end = min(offset + chunk_size, total)
            last = end >= total
            index, slot = ring.acquire(timeout)
            n = write(src[offset:end], slot, last)
            ring.publish(index, n, final=final and last)
            published += n
            offset = end
            if last:
                return published


class SlotReader:
    """A ring's consumer end as an enclave reads it: each slot copied once, then freed.

    The untrusted side can change a slot's bytes at any moment; the private copy
    taken before anything looks at them is what gets authenticated and opened (no
    double fetch).  The slot goes back to the producer before the chunk is opened,
    so the next one can arrive meanwhile.  After the final slot, :meth:`take`
    raises :class:`~migsgx.errors.StreamError`: the untrusted side ended the
    transfer before the reader's stream did.
    """

    def __init__(self, ring: ShmRing, *, timeout: float | None = None) -> None:
        self._ring = ring
        self._private = memoryview(bytearray(ring.slot_size))
        self.timeout = timeout
        self.ended = False
        self.received = 0

    def take(self) -> memoryview:
        """The next chunk, in private memory valid until the next call."""

        if self.ended:
            raise StreamError("the transfer ended before the stream's last chunk")
        index, view, final = self._ring.next(self.timeout)
        n = len(view)
        self._private[:n] = view
        self._ring.release(index)
        self.ended = final
        self.received += n
        return self._private[:n]


def drain_ring(ring: ShmRing, dest: Buffer, *, timeout: float | None = None) -> int:
    """The raw baseline's destination enclave: :class:`SlotReader`, then a copy for opening."""

    reader = SlotReader(ring, timeout=timeout)
    with memoryview(dest).cast("B") as dst:
        offset = 0
        while not reader.ended:
            chunk = reader.take()
            n = len(chunk)
            if n > len(dst) - offset:
                raise FrameError("the stream is longer than the destination", at=offset)
            dst[offset : offset + n] = chunk
            offset += n
        return offset
