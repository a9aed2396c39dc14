"""Faulting fresh anonymous memory in ahead of its first write (``MADV_POPULATE_WRITE``).

A process that writes memory the kernel has not handed out yet pays a page
fault per 4 KiB page: on these VMs about 0.3 CPU seconds per GiB, and more
when the host must back the pages first (``docs/benchmarks.md``).  Both
the destination enclave (its memory) and the sequential mode's drivers (their
staging buffers) take those faults before the freeze where they can, in a
thread beside the handshake, instead of inside the frozen window.

Huge pages (``MADV_HUGEPAGE``, :func:`advise_huge`) make that fault one per
2 MiB instead of 512: the kernel clears the same bytes, but takes, charges and
maps them once.  Machines whose transparent huge pages are ``madvise`` (as
here) give them only where asked; where they are ``never``, or not built, the
advice changes nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

__all__ = ["HUGE_PAGE", "PAGE_SIZE", "advise_huge", "populate", "round_up", "thp_mode"]

PAGE_SIZE = 4096
#: A transparent huge page on x86-64 (a PMD's span).
HUGE_PAGE = 2 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; no name in 3.11
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
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


def advise_huge(mm: mmap.mmap, nbytes: int) -> int:
    """Ask for transparent huge pages over the first ``nbytes`` of ``mm``, in whole 2 MiB.

    Only the whole huge pages from the start are advised (``nbytes`` rounded
    down): a partial one at the end would be faulted in whole, up to 2 MiB of
    zeros beyond what the caller writes.  The advice marks the range for the
    faults to come; pages already there stay as they are.  Advisory: a kernel
    without transparent huge pages refuses it, and that costs nothing.  Returns
    the bytes advised (0: none, or refused).
    """

    length = min(max(0, nbytes), len(mm)) // HUGE_PAGE * HUGE_PAGE
    if length == 0:
        return 0
    try:
        mm.madvise(_MADV_HUGEPAGE, 0, length)
    except OSError:
        return 0
    return length


def thp_mode() -> str:
    """This machine's transparent huge page mode (``always``, ``madvise``, ``never``; ``""``
    where the kernel has none or the file cannot be read, as inside an enclave's sandbox)."""

    try:
        with open(_THP_ENABLED, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""
