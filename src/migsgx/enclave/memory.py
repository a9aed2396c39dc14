"""Enclave memory: the page-granular region an enclave declares in its manifest.

Bulk state lives here, not in Python objects, so that a migration can dump and
load it chunk by chunk, and later track it page by page.  Enclave code takes
named, page-aligned allocations (:meth:`EnclaveMemory.array` gives a numpy view);
the allocation table is small structured state that travels with the memory,
so after a migration the same names find the same bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._populate import HUGE_PAGE, advise_huge, populate
from ..errors import EnclaveMemoryError

PAGE_SIZE = 4096
# Declared memory is reserved lazily: only touched pages cost (Linux value).
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _round_up(n: int, to: int = PAGE_SIZE) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Allocation:
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    def to_wire(self) -> list[Any]:
        return [self.offset, self.nbytes, self.dtype, list(self.shape)]

    @classmethod
    def from_wire(cls, item: Any) -> Allocation:
        if not (isinstance(item, list) and len(item) == 4):
            raise EnclaveMemoryError("malformed allocation record")
        offset, nbytes, dtype, shape = item
        if not (
            isinstance(offset, int)
            and isinstance(nbytes, int)
            and isinstance(dtype, str)
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise EnclaveMemoryError("malformed allocation record")
        return cls(offset, nbytes, dtype, tuple(shape))


class EnclaveMemory:
    """A private anonymous mapping of the declared size, handed out in pages.

    The mapping is the declared size rounded up to whole 2 MiB (never used
    beyond ``size``; reserved lazily, so the rounding costs no memory): the
    kernel then starts it on a 2 MiB boundary, where huge pages can back it
    from its first byte (:meth:`advise_huge`).
    """

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise EnclaveMemoryError(f"enclave memory size must be a multiple of {PAGE_SIZE}")
        self.size = size
        #: Bytes from the start advised for huge pages (:meth:`advise_huge`).
        self.huge_advised = 0
        try:
            self._mm: mmap.mmap | None = mmap.mmap(
                -1,
                _round_up(size, HUGE_PAGE),
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            )
        except (OSError, OverflowError) as exc:
            raise EnclaveMemoryError(f"cannot map {size} bytes of enclave memory: {exc}") from exc
        self._allocs: dict[str, Allocation] = {}
        self._brk = 0
        self._ahead: _Ahead | None = None

    @property
    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise EnclaveMemoryError("enclave memory has been wiped")
        return self._mm

    @property
    def used(self) -> int:
        """Bytes from the start of memory to the end of the last allocation."""

        return self._brk

    @property
    def pages(self) -> int:
        return self._brk // PAGE_SIZE

    @property
    def address(self) -> int:
        """Where the region starts in this process (for the OS's dirty tracking)."""

        probe = ctypes.c_char.from_buffer(self._map)
        try:
            return ctypes.addressof(probe)
        finally:
            del probe  # releases the buffer export, so wipe() can still unmap

    def view(self, offset: int = 0, nbytes: int | None = None) -> memoryview:
        end = self.size if nbytes is None else offset + nbytes
        if offset < 0 or end > self.size or end < offset:
            raise EnclaveMemoryError(f"range {offset}..{end} is outside enclave memory")
        return memoryview(self._map)[offset:end]

    def allocate(self, name: str, nbytes: int) -> Allocation:
        if nbytes < 0:
            raise EnclaveMemoryError(f"{name!r}: a size cannot be negative")
        if name in self._allocs:
            raise EnclaveMemoryError(f"{name!r} is already allocated")
        size = _round_up(max(nbytes, 1))
        if self._brk + size > self.size:
            raise EnclaveMemoryError(
                f"enclave memory exhausted: {name!r} needs {size} bytes, "
                f"{self.size - self._brk} of {self.size} left"
            )
        alloc = Allocation(self._brk, nbytes, "u1", (nbytes,))
        self._allocs[name] = alloc
        self._brk += size
        return alloc

    def array(self, name: str, shape: tuple[int, ...] | int, dtype: Any = np.float64) -> Any:
        """A numpy array living in enclave memory, allocated once per name."""

        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(d < 0 for d in shape_t):
            # numpy reads a count of -1 as "the whole buffer": all enclave memory.
            raise EnclaveMemoryError(f"{name!r}: shape {shape_t} has a negative dimension")
        dt = np.dtype(dtype)
        count = int(np.prod(shape_t)) if shape_t else 1
        nbytes = count * dt.itemsize
        alloc = self._allocs.get(name)
        if alloc is None:
            alloc = self.allocate(name, nbytes)
            alloc = Allocation(alloc.offset, nbytes, dt.str, shape_t)
            self._allocs[name] = alloc
        elif alloc.dtype != dt.str or alloc.shape != shape_t:
            raise EnclaveMemoryError(f"{name!r} exists with another shape or dtype")
        return np.frombuffer(self._map, dtype=dt, count=count, offset=alloc.offset).reshape(shape_t)

    def get(self, name: str) -> Any:
        alloc = self._allocs.get(name)
        if alloc is None:
            raise EnclaveMemoryError(f"no allocation named {name!r}")
        dt = np.dtype(alloc.dtype)
        count = alloc.nbytes // dt.itemsize
        return np.frombuffer(self._map, dtype=dt, count=count, offset=alloc.offset).reshape(
            alloc.shape
        )

    def __contains__(self, name: str) -> bool:
        return name in self._allocs

    def layout(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "brk": self._brk,
            "allocs": {n: a.to_wire() for n, a in self._allocs.items()},
        }

    def restore_layout(self, layout: Any) -> None:
        """Take over the allocation table of a migrated enclave (before its pages arrive)."""

        if not isinstance(layout, dict):
            raise EnclaveMemoryError("malformed memory layout")
        size, brk, allocs = layout.get("size"), layout.get("brk"), layout.get("allocs")
        if size != self.size:
            raise EnclaveMemoryError(f"memory size {size} differs from this enclave's {self.size}")
        if not isinstance(brk, int) or not 0 <= brk <= self.size or brk % PAGE_SIZE:
            raise EnclaveMemoryError("malformed memory layout")
        if not isinstance(allocs, dict):
            raise EnclaveMemoryError("malformed memory layout")
        table = {}
        for name, item in allocs.items():
            a = Allocation.from_wire(item)
            if (
                not isinstance(name, str)
                or a.offset < 0
                or a.nbytes < 0
                or a.offset + a.nbytes > brk
            ):
                raise EnclaveMemoryError("allocation outside the migrated memory")
            try:
                dt = np.dtype(a.dtype)
            except (TypeError, ValueError, SyntaxError):
                raise EnclaveMemoryError("malformed allocation record") from None
            if dt.hasobject or int(np.prod(a.shape)) * dt.itemsize != a.nbytes:
                raise EnclaveMemoryError("malformed allocation record")
            table[name] = a
        self._allocs = table
        self._brk = brk

    def advise_huge(self, nbytes: int) -> int:
        """Ask the kernel for 2 MiB pages over the first ``nbytes`` (whole huge pages).

        A destination writes its whole memory in use once, in order: with 4 KiB
        pages that is a fault per 4 KiB (about a million per 4 GiB, each taken,
        charged and mapped on its own), with huge pages one per 2 MiB.  Only the
        faults to come change: call it before the memory is first written.  The
        part of the last 2 MiB that ``nbytes`` does not fill stays in 4 KiB pages,
        so nothing beyond it becomes resident.  Dirty tracking stays exact to
        4 KiB (:mod:`.dirty`: a write to a protected huge page splits its mapping).
        Returns the bytes advised; 0 where the kernel has no huge pages, which
        changes nothing else.
        """

        advised = advise_huge(self._map, min(max(0, nbytes), self.size))
        self.huge_advised = max(self.huge_advised, advised)
        return advised

    def prefault(self, nbytes: int, stop: threading.Event) -> int:
        """Fault in the first ``nbytes`` as writable zero pages, until ``stop`` is set.

        A destination's load writes every page of a memory the kernel has not
        handed out yet; each first touch is a page fault (about 2.4 GB/s here,
        a quarter of a plain copy).  Run in a thread beside the load, this takes
        those faults ahead of it, on a core the pipeline leaves idle while it
        waits for chunks.  ``madvise`` through ctypes, since ctypes lets other
        threads run meanwhile (``mmap.madvise`` holds the interpreter lock).
        Advisory only: an old kernel that refuses it costs nothing.  Returns
        the bytes faulted in.
        """

        return populate(self._map, min(_round_up(nbytes), self.size), stop)

    @contextlib.contextmanager
    def prefaulting(self, nbytes: int, enabled: bool = True) -> Iterator[None]:
        """:meth:`prefault` in a thread for the duration of the ``with`` block (a load)."""

        if not enabled:
            yield
            return
        stop = threading.Event()
        faulter = threading.Thread(
            target=self.prefault, args=(nbytes, stop), name="enclave-prefault", daemon=True
        )
        faulter.start()
        try:
            yield
        finally:
            stop.set()
            faulter.join()

    def prefault_ahead(self, nbytes: int) -> int:
        """Start faulting in the first ``nbytes`` in a thread that outlives this call.

        A destination enclave learns how much memory the source uses before the
        source freezes (the offer's hint), so the first touch of its fresh pages
        (about as much CPU as the rest of the load: ``docs/benchmarks.md``)
        can happen while the source still runs instead of inside the load.
        :meth:`finish_prefault` stops it; :meth:`wipe` does too.  Returns the
        bytes it will fault in at most (the hint is capped at this memory's size).
        """

        if self._ahead is not None:
            raise EnclaveMemoryError("memory is being faulted in already")
        nbytes = max(0, min(_round_up(nbytes), self.size))
        self._ahead = _Ahead(self, nbytes)
        return nbytes

    @property
    def prefaulting_ahead(self) -> bool:
        return self._ahead is not None

    def wait_prefault(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for :meth:`prefault_ahead` to end by itself.

        Returns the bytes it faulted in, or None while it still runs (or was
        not started).  It is not stopped: a load stops it as ever.
        """

        ahead = self._ahead
        return ahead.wait(timeout) if ahead is not None else None

    def finish_prefault(self, keep: int) -> int:
        """Stop :meth:`prefault_ahead`; give back the pages it faulted in beyond ``keep``.

        The hint was the source's memory at its offer; what arrived is
        ``keep`` bytes.  Zero pages faulted in above that are dropped again
        (``MADV_DONTNEED``: they read as zeros, as they did), so a hint that was
        too large costs CPU once and no memory.  Returns the bytes that were
        faulted in.
        """

        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return 0
        done = ahead.stop()
        start = min(_round_up(max(0, keep)), self.size)
        if done > start and self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED, start, done - start)
        return done

    def wipe(self) -> None:
        """Zero every page and unmap: what a committed source does before it exits."""

        if self._mm is None:
            return
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None
        # Discarding the pages of a private anonymous mapping drops their
        # contents; reading them again yields zeros.
        self._mm.madvise(mmap.MADV_DONTNEED)
        try:
            self._mm.close()
        except BufferError:
            # numpy views still reference the mapping; it is zeroed, and goes with the process.
            pass
        self._mm = None
        self._allocs = {}
        self._brk = 0


class _Ahead:
    """:meth:`EnclaveMemory.prefault` in a daemon thread, from a call to a later one."""

    def __init__(self, memory: EnclaveMemory, nbytes: int) -> None:
        self._stop = threading.Event()
        self.done = 0
        self._thread = threading.Thread(
            target=self._run, args=(memory, nbytes), name="enclave-prefault-ahead", daemon=True
        )
        self._thread.start()

    def _run(self, memory: EnclaveMemory, nbytes: int) -> None:
        with contextlib.suppress(EnclaveMemoryError):
            self.done = memory.prefault(nbytes, self._stop)

    def wait(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        return None if self._thread.is_alive() else self.done

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.done
