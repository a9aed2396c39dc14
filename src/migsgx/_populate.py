"""Faulting fresh anonymous memory in ahead of its first write (``MADV_POPULATE_WRITE``).

A process that writes memory the kernel has not handed out yet pays a page
fault per 4 KiB page: on these VMs about 0.3 CPU seconds per GiB, and more
when the host must back the pages first (``docs/benchmarks.md``).  Both
the destination enclave (its memory) and the sequential mode's drivers (their
staging buffers) take those faults before the freeze where they can, in a
thread beside the handshake, instead of inside the frozen window.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

__all__ = ["PAGE_SIZE", "populate", "round_up"]

PAGE_SIZE = 4096
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; no name in 3.11
# Steps short enough that a stop request is seen within a few milliseconds.
_STEP = 16 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def round_up(n: int, to: int = PAGE_SIZE) -> int:
    return (n + to - 1) // to * to


def populate(mm: mmap.mmap, nbytes: int, stop: threading.Event) -> int:
    """Fault in the first ``nbytes`` of ``mm`` as writable pages, until ``stop`` is set.

    ``madvise`` through ctypes, since ctypes lets other threads run meanwhile
    (``mmap.madvise`` holds the interpreter lock for the whole call).
    Advisory only: a kernel that refuses it costs nothing.  Returns the bytes
    faulted in.  The caller keeps ``mm`` open until this returns.
    """

    nbytes = min(round_up(max(0, nbytes)), len(mm))
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    done = 0
    try:
        while done < nbytes and not stop.is_set():
            step = min(_STEP, nbytes - done)
            if _libc.madvise(ctypes.c_void_p(base + done), step, _MADV_POPULATE_WRITE):
                break
            done += step
    finally:
        del anchor  # the mapping may be closed again
    return done
