"""Which pages of enclave memory were written: the kernel's write-protect tracking.

Pre-copy (:mod:`.precopy`) streams enclave memory while the enclave keeps
serving ECALLs, then only the pages written since the previous round.  This
kernel has no soft-dirty bits (CRIU's ``pre-dump --track-mem`` cannot work), but
its newer tracking does, through ``ctypes`` and no package:

1. ``userfaultfd(UFFD_USER_MODE_ONLY)``, ``UFFDIO_API`` with
   ``UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED``: a write to a
   protected page only clears the protection (no fault is delivered to anyone),
   and pages never touched count as protected too;
2. ``UFFDIO_REGISTER`` (mode WP) over the region, ``UFFDIO_WRITEPROTECT`` on all of it;
3. ``PAGEMAP_SCAN`` on ``/proc/self/pagemap`` with ``PM_SCAN_WP_MATCHING |
   PM_SCAN_CHECK_WPASYNC`` for ``PAGE_IS_WRITTEN``: the written pages come back
   and are protected again in the same call, so nothing written between two
   scans is lost.

Who owns this matters: on SGX hardware the OS keeps the page tables, so the
tracker is the OS's word, not the enclave's.  Its answer is a hint that saves
bytes; the enclaves check the end result with a keyed digest of the final
memory (``docs/spec/precopy.md``), so a tracker that hides a write costs a
refused migration, never a silent difference.  ``$MIGSGX_DIRTY_FAULT`` lets
tests play such an OS: ``unavailable``, or ``hide=PAGE`` (that page is never
reported).
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Final

import numpy as np
import numpy.typing as npt

from ..errors import DirtyTrackingLostError, DirtyTrackingUnavailableError

__all__ = ["FAULT_ENV", "DirtyTracker", "open_tracker"]

FAULT_ENV: Final = "MIGSGX_DIRTY_FAULT"
PAGE: Final = 4096

_SYS_USERFAULTFD: Final = {"x86_64": 323, "aarch64": 282}
_UFFD_USER_MODE_ONLY: Final = 1
_O_CLOEXEC: Final = 0o2000000
_O_NONBLOCK: Final = 0o4000
_UFFD_API: Final = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED: Final = 1 << 13
_UFFD_FEATURE_WP_ASYNC: Final = 1 << 15
_UFFDIO_REGISTER_MODE_WP: Final = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP: Final = 1 << 0
_PM_SCAN_WP_MATCHING: Final = 1 << 0
_PM_SCAN_CHECK_WPASYNC: Final = 1 << 1
_PAGE_IS_WRITTEN: Final = 1 << 1
_VEC_LEN: Final = 512  # regions per PAGEMAP_SCAN call; the walk resumes where it ended
_PROTECT_STEP: Final = 32 << 20  # bytes write-protected per call (see protect_all)


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]  # fmt: skip


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]  # fmt: skip


class _ScanArg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
            "category_inverted", "category_mask", "category_anyof_mask", "return_mask",
        )
    ]  # fmt: skip


_UFFDIO_API: Final = _iowr(_UFFD_API, 0x3F, ctypes.sizeof(_Api))
_UFFDIO_REGISTER: Final = _iowr(_UFFD_API, 0x00, ctypes.sizeof(_Register))
_UFFDIO_WRITEPROTECT: Final = _iowr(_UFFD_API, 0x06, ctypes.sizeof(_WriteProtect))
_PAGEMAP_SCAN: Final = _iowr(ord("f"), 16, ctypes.sizeof(_ScanArg))

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.ioctl.restype = ctypes.c_int
        _libc.prctl.restype = ctypes.c_int
    return _libc


def _errno_text() -> str:
    err = ctypes.get_errno()
    return f"{os.strerror(err)} (errno {err})"


_PR_GET_DUMPABLE: Final = 3
_PR_SET_DUMPABLE: Final = 4


def _open_own_pagemap() -> int:
    """``/proc/self/pagemap``, also from a non-dumpable process.

    A sandboxed enclave process is non-dumpable from its first instruction,
    which makes its ``/proc/self`` files root's: it cannot open its own
    pagemap.  It becomes dumpable for the ``open`` alone.  Nobody else can use
    that moment: the process's uid is its own, its pid namespace hides it, and
    its seccomp filter forbids ptrace; root could read its memory anyway.  The
    descriptor keeps this memory map, so nothing is reopened later.
    """

    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        return os.open("/proc/self/pagemap", flags)
    except PermissionError:
        pass
    libc = _c()
    was = libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)
    if libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        raise DirtyTrackingUnavailableError(f"cannot open this process's pagemap: {_errno_text()}")
    try:
        return os.open("/proc/self/pagemap", flags)
    except OSError as exc:
        raise DirtyTrackingUnavailableError(f"cannot open this process's pagemap: {exc}") from exc
    finally:
        if was != 1 and libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            # Never go on dumpable: stop here rather than keep the memory open.
            os._exit(70)


def _pages_of(regions: npt.NDArray[np.void], base: int) -> npt.NDArray[np.int64]:
    """Page indexes (from ``base``) of ``PAGEMAP_SCAN`` regions ``[start, end)``, in order.

    User addresses fit in 63 bits.  Each region's pages are its first page
    plus ``0 .. count - 1``: one ``arange`` over all of them, shifted back by
    region.
    """

    starts = regions["start"].astype(np.int64)
    firsts = (starts - base) // PAGE
    counts = (regions["end"].astype(np.int64) - starts) // PAGE
    shift = np.repeat(firsts - (np.cumsum(counts) - counts), counts)
    pages: npt.NDArray[np.int64] = shift + np.arange(int(counts.sum()), dtype=np.int64)
    return pages


class DirtyTracker:
    """Written-page tracking over ``[address, address + size)`` of this process.

    Not thread-safe: one scanner.  :meth:`close` (or the process's end) drops
    the tracking; the memory itself is untouched.
    """

    def __init__(self, address: int, size: int, *, hide: int | None = None) -> None:
        if address % PAGE or size <= 0 or size % PAGE:
            raise ValueError("the tracked region is whole pages")
        self.address = address
        self.size = size
        self._hide = hide
        self._uffd = -1
        self._pagemap = -1
        self.scans = 0
        self._vec = (_PageRegion * _VEC_LEN)()
        machine = platform.machine()
        nr = _SYS_USERFAULTFD.get(machine)
        if nr is None:
            raise DirtyTrackingUnavailableError(f"no userfaultfd system call known on {machine}")
        libc = _c()
        fd = libc.syscall(nr, _O_CLOEXEC | _O_NONBLOCK | _UFFD_USER_MODE_ONLY)
        if fd < 0:
            raise DirtyTrackingUnavailableError(f"userfaultfd: {_errno_text()}")
        self._uffd = int(fd)
        try:
            self._setup()
            self._pagemap = _open_own_pagemap()
            # PAGEMAP_SCAN must exist and accept the async write-protect check.
            self._scan(dry=True)
        except BaseException:
            self.close()
            raise

    def _ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> int:
        return int(_c().ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg)))

    def _setup(self) -> None:
        want = _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED
        api = _Api(api=_UFFD_API, features=want)
        if self._ioctl(self._uffd, _UFFDIO_API, api) != 0:
            raise DirtyTrackingUnavailableError(
                f"UFFDIO_API with asynchronous write-protect: {_errno_text()}"
            )
        if api.features & want != want:
            raise DirtyTrackingUnavailableError("the kernel lacks asynchronous write-protect")
        reg = _Register(range=_Range(self.address, self.size), mode=_UFFDIO_REGISTER_MODE_WP)
        if self._ioctl(self._uffd, _UFFDIO_REGISTER, reg) != 0:
            raise DirtyTrackingUnavailableError(f"UFFDIO_REGISTER (WP): {_errno_text()}")
        self.protect_all()

    def protect_all(self) -> None:
        """Start over: every page counts as clean from now on.

        In steps of :data:`_PROTECT_STEP`: the kernel holds the process's
        memory-map lock for one whole call (about 0.1 s per GiB on a busy
        machine), and anything that maps memory meanwhile waits, such as the
        start of a thread for the next ECALL.  Steps let it through.  Tracking
        counts once the last step is done, before round 0 reads anything.
        """

        for start in range(0, self.size, _PROTECT_STEP):
            length = min(_PROTECT_STEP, self.size - start)
            wp = _WriteProtect(range=_Range(self.address + start, length),
                               mode=_UFFDIO_WRITEPROTECT_MODE_WP)  # fmt: skip
            if self._ioctl(self._uffd, _UFFDIO_WRITEPROTECT, wp) != 0:
                raise DirtyTrackingLostError(f"UFFDIO_WRITEPROTECT: {_errno_text()}")

    def _scan(self, *, dry: bool = False, limit: int | None = None) -> list[int]:
        if self._uffd < 0:
            raise DirtyTrackingLostError("the dirty tracker was closed")
        parts: list[npt.NDArray[np.int64]] = []
        span = self.size if limit is None else max(0, min(self.size, limit))
        start, end = self.address, self.address + span
        vec = self._vec
        # The same memory as numpy columns: a round may find 100,000 regions,
        # and reading them field by field through ctypes holds the interpreter lock.
        regions = np.ctypeslib.as_array(vec)
        while start < end:
            arg = _ScanArg(
                size=ctypes.sizeof(_ScanArg),
                flags=0 if dry else _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC,
                start=start,
                end=end,
                vec=ctypes.addressof(vec),
                vec_len=_VEC_LEN,
                category_mask=_PAGE_IS_WRITTEN,
                return_mask=_PAGE_IS_WRITTEN,
            )
            if dry:
                arg.vec, arg.vec_len = 0, 0
            n = self._ioctl(self._pagemap, _PAGEMAP_SCAN, arg)
            if n < 0:
                kind = DirtyTrackingUnavailableError if dry else DirtyTrackingLostError
                raise kind(f"PAGEMAP_SCAN: {_errno_text()}")
            if n > 0:
                parts.append(_pages_of(regions[:n], self.address))
            if dry or arg.walk_end <= start:
                break
            start = arg.walk_end
        if not parts:
            return []
        pages: list[int] = np.concatenate(parts).tolist()
        return pages

    def collect(self, limit: int | None = None) -> list[int]:
        """Pages (indexes from the region's start) written since the last call; re-armed."""

        return self.collect_with_log(limit)[0]

    def collect_with_log(self, limit: int | None = None) -> tuple[list[int], list[int]]:
        """One scan, as two readers see it: (the OS's report, the enclave's write log).

        ``limit`` (bytes from the start, a multiple of the page size) ends the
        walk early: the kernel walks every page table entry of the range, about
        0.4 ms per GiB, written or not, so a scan of the used memory only costs
        what is used rather than what the enclave declared.  A page beyond the
        limit keeps its written bit until a scan covers it.

        The report decides which pages travel; ``hide=PAGE`` makes it lie, as an
        OS that owns the page tables can.  The write log decides which digest
        tags the source enclave must recompute (``docs/spec/precopy.md``,
        section 3.2).  On SGX2 hardware it is the enclave's own record of the
        write faults its EPCM write-protection raises, which the OS cannot
        complete without the enclave; this emulation has no EPCM, so the same
        kernel scan stands in for it, unfiltered: the kernel is already what
        isolates an emulated enclave (root can read its memory, see
        DESIGN.md's trust model).
        """

        if limit is not None and limit % PAGE:
            raise ValueError("a scan ends on a page boundary")
        written = self._scan(limit=limit)
        self.scans += 1
        reported = written if self._hide is None else [p for p in written if p != self._hide]
        return reported, written

    def close(self) -> None:
        for fd in (self._uffd, self._pagemap):
            if fd >= 0:
                os.close(fd)
        self._uffd = self._pagemap = -1

    def __enter__(self) -> DirtyTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tracker(address: int, size: int) -> DirtyTracker:
    """A tracker over a region of this process, as the OS (or ``$MIGSGX_DIRTY_FAULT``) allows."""

    spec = os.environ.get(FAULT_ENV, "")
    hide: int | None = None
    if spec == "unavailable":
        raise DirtyTrackingUnavailableError(f"dirty tracking disabled by ${FAULT_ENV}")
    if spec.startswith("hide="):
        hide = int(spec.partition("=")[2])
    return DirtyTracker(address, size, hide=hide)
