"""Resident memory of processes, for the memory overhead of a migration (Linux only).

The overhead of a migration is the sum, over every participating process, of
its peak resident set during the migration minus its resident set at rest just
before.  The kernel keeps the peak as ``VmHWM``; writing ``5`` to
``/proc/PID/clear_refs`` resets it to the current resident set, so::

    rest = PeakWindow.start(pids)     # records VmRSS, resets VmHWM
    ...migrate...
    extra = rest.overhead()           # {pid: VmHWM - rest}, read while they live

What the figures mean, measured on this kernel (6.18):

* Shared pages count in every process that maps them: a ring mapped by two
  processes counts twice in a sum of ``VmHWM`` figures, although it occupies
  its memory once.  :func:`shared_excess` measures what that double count
  adds (a page mapped by *k* processes counts ``1/k`` in each, as the
  kernel's ``Pss`` does), and a :class:`SharedSampler` keeps its largest value
  over a window, so that the sum counts every page once.  It reads the page
  tables of the shared mappings only (``/proc/PID/maps``, ``pagemap`` and
  ``/proc/kpagecount``, root): ``smaps_rollup`` would give ``Pss`` directly
  but walks every page of the process, about 0.2 s for an enclave of 1 GiB
  here, too slow to sample beside the migration it measures.
* Kernel memory (socket and pipe buffers, page tables) does not count at all.
* Pages of files a process maps (the code of its libraries) count in ``VmRSS``
  from their first fault in that process, although they sit in the page cache
  once for every process that maps the file, clean and reclaimable: a
  migration's handshake that runs a library's code for the first time in a
  process (dcap-qvl verifying the peer's quote: about 1.1 MB of its text in
  the source enclave) makes that process's peak grow without taking memory
  from the machine.  :meth:`PeakWindow.overhead` leaves them out (the growth
  of ``RssFile`` over the window) and :meth:`PeakWindow.code_faulted` reports
  them.  The subtraction assumes the code faulted in during the window is
  still mapped at the end (libraries are not unloaded) and was faulted before
  the peak (a migration runs its code at the start, its bulk transfer peaks
  later); code first run after the peak would make the figure low by as much.
* ``VmRSS`` and ``VmHWM`` read while the memory is still mapped are exact, but
  the peak the kernel records when memory is unmapped comes from per-CPU
  counters that may lag by a few dozen pages: a transient peak that is gone
  before it is read can be under-reported by up to about 32 pages per CPU.
  Read the peaks before the processes unmap their buffers.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import _proc as _procfs
from ..errors import MigSGXError, register_error

__all__ = [
    "MemStatError",
    "PeakWindow",
    "SharedSampler",
    "file_rss",
    "kernel_events",
    "minor_faults",
    "peak_rss",
    "reset_peak",
    "rss",
    "shared_excess",
    "sum_overhead",
]


@register_error
class MemStatError(MigSGXError):
    """A process's memory figures could not be read or reset."""

    code = "memstat"


def _proc(pid: int, name: str) -> str:
    if pid <= 0:
        raise MemStatError(f"not a process id: {pid}", pid=pid)
    return f"/proc/{pid}/{name}"


def reset_peak(pid: int) -> None:
    """Reset the process's peak resident set (``VmHWM``) to its current one."""

    try:
        with open(_proc(pid, "clear_refs"), "w", encoding="ascii") as f:
            f.write("5")
    except FileNotFoundError as exc:
        raise MemStatError(f"no process {pid}", pid=pid) from exc
    except OSError as exc:  # permission, or the process exited while we wrote
        raise MemStatError(f"cannot reset the peak of process {pid}: {exc}", pid=pid) from exc


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(_proc(pid, "status"), encoding="ascii") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as exc:
        raise MemStatError(f"no process {pid}", pid=pid) from exc
    except OSError as exc:
        raise MemStatError(f"cannot read the status of process {pid}: {exc}", pid=pid) from exc
    prefix = field + ":"
    for line in lines:
        if line.startswith(prefix):
            parts = line[len(prefix) :].split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                return int(parts[0])
            break
    # A zombie has no memory fields left.
    raise MemStatError(f"process {pid} reports no {field}", pid=pid)


def peak_rss(pid: int) -> int:
    """Peak resident set in bytes since start or the last :func:`reset_peak`."""

    return _status_kib(pid, "VmHWM") * 1024


def rss(pid: int) -> int:
    """Current resident set in bytes."""

    return _status_kib(pid, "VmRSS") * 1024


def file_rss(pid: int) -> int:
    """Resident pages of mapped files (``RssFile``: libraries' code and data), in bytes."""

    return _status_kib(pid, "RssFile") * 1024


def sum_overhead(rest: Mapping[int, int]) -> int:
    """Sum of ``peak_rss(pid) - rest[pid]`` over the processes (never below zero each)."""

    return sum(max(0, peak_rss(pid) - base) for pid, base in rest.items())


@dataclass(frozen=True)
class PeakWindow:
    """Resident sets at rest of a set of processes whose peaks were just reset."""

    rest: Mapping[int, int]
    files: Mapping[int, int] = field(default_factory=dict)
    """``RssFile`` at rest, per process: file pages faulted in later are code, not overhead."""

    @classmethod
    def start(cls, pids: Iterable[int]) -> PeakWindow:
        rest: dict[int, int] = {}
        files: dict[int, int] = {}
        for pid in pids:
            reset_peak(pid)
            rest[pid] = rss(pid)
            files[pid] = file_rss(pid)
        return cls(rest, files)

    def code_faulted(self, pid: int) -> int:
        """File pages (libraries' code) the process faulted in since the start, in bytes."""

        return max(0, file_rss(pid) - self.files.get(pid, file_rss(pid)))

    def overhead_of(self, pid: int) -> int:
        """Peak minus rest of one process, less the file pages it faulted in meanwhile."""

        return max(0, peak_rss(pid) - self.rest[pid] - self.code_faulted(pid))

    def overhead(self) -> dict[int, int]:
        """``{pid: peak - rest - code faulted}`` in bytes; read before the processes exit."""

        return {pid: self.overhead_of(pid) for pid in self.rest}

    def total(self) -> int:
        """Sum of :meth:`overhead` (the peaks of processes over their rest, less code)."""

        return sum(self.overhead().values())


_PAGE = mmap.PAGESIZE
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1


#: Shared mappings of memory rather than of a file on disk (whose pages are the
#: page cache's, as a library's code is): memory files, POSIX and System V
#: shared memory, shared anonymous memory.
_SHARED_MEMORY = ("/memfd:", "/dev/shm/", "/SYSV", "/dev/zero")


def _shared_ranges(pid: int) -> list[tuple[int, int]]:
    """Address ranges of the process's shared memory mappings (``s`` in the permissions)."""

    ranges = []
    try:
        with open(_proc(pid, "maps"), encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 5 or not parts[1].endswith("s"):
                    continue
                path = parts[5].strip() if len(parts) == 6 else ""
                if not path or path.startswith(_SHARED_MEMORY):
                    lo, _, hi = parts[0].partition("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except FileNotFoundError as exc:
        raise MemStatError(f"no process {pid}", pid=pid) from exc
    except OSError as exc:
        raise MemStatError(f"cannot read the mappings of process {pid}: {exc}", pid=pid) from exc
    return ranges


def shared_excess(pid: int) -> int:
    """Bytes by which the process's resident set over-counts its shared memory pages.

    A resident page of a shared memory mapping that *k* processes map counts whole in
    each one's ``VmRSS``; counted by its share, ``1/k`` in each (as ``Pss``),
    the process holds ``(1 - 1/k)`` of a page less.  Summed over the pages of
    its shared memory mappings (rings, in a migration).  Private mappings are
    not looked at: their pages are the process's own (copy-on-write pages
    shared after a ``fork`` are not counted here); nor are shared mappings of
    files on disk, which are page cache as a library's code is (see
    :meth:`PeakWindow.code_faulted`).
    """

    ranges = _shared_ranges(pid)
    if not ranges:
        return 0
    excess = 0.0
    try:
        pagemap = os.open(_proc(pid, "pagemap"), os.O_RDONLY)
    except FileNotFoundError as exc:
        raise MemStatError(f"no process {pid}", pid=pid) from exc
    except OSError as exc:
        raise MemStatError(f"cannot read the pages of process {pid}: {exc}", pid=pid) from exc
    try:
        counts = os.open("/proc/kpagecount", os.O_RDONLY)
    except OSError as exc:
        os.close(pagemap)
        raise MemStatError(f"cannot read page counts (root only): {exc}", pid=pid) from exc
    try:
        for lo, hi in ranges:
            raw = os.pread(pagemap, (hi - lo) // _PAGE * 8, lo // _PAGE * 8)
            for (entry,) in struct.iter_unpack("=Q", raw):
                pfn = entry & _PFN_MASK
                if not entry & _PRESENT or pfn == 0:
                    continue  # not resident (or its frame hidden: not root)
                (count,) = struct.unpack("=Q", os.pread(counts, 8, pfn * 8))
                if count > 1:
                    excess += _PAGE * (1 - 1 / count)
    except OSError as exc:  # the process exited while we read
        raise MemStatError(f"cannot read the pages of process {pid}: {exc}", pid=pid) from exc
    finally:
        os.close(counts)
        os.close(pagemap)
    return round(excess)


class SharedSampler:
    """The largest :func:`shared_excess` of each process over a window, sampled.

    ``VmHWM`` records a peak exactly but not what part of it was shared; the
    sharing is read here every ``interval`` seconds in a thread (of a process
    that is not measured: reading another's mappings allocates).  Subtracting
    the largest excess from a process's peak assumes the peak came while its
    shared mappings were in place, as a migration's rings are from before its
    first chunk to after its last.  ``discover`` names processes that start
    later, each with its excess at rest as read when its window began (a tick
    may come after it mapped its ring); it is called at every tick.  A
    process that exits ends its sampling.
    """

    def __init__(
        self,
        pids: Iterable[int],
        interval: float = 0.05,
        discover: Callable[[], Mapping[int, int]] | None = None,
    ) -> None:
        self.rest: dict[int, int] = {}
        self.most: dict[int, int] = {}
        self._live: set[int] = set()
        self._interval = interval
        self._discover = discover
        self._stop = threading.Event()
        self._lock = threading.Lock()
        for pid in pids:
            self._add(pid)
        self._thread = threading.Thread(target=self._run, name="memstat-shared", daemon=True)
        self._thread.start()

    def _add(self, pid: int, rest: int | None = None) -> None:
        value = shared_excess(pid)
        self.rest[pid] = value if rest is None else rest
        self.most[pid] = value
        self._live.add(pid)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        """One reading now (also what the thread does); exited processes are dropped."""

        with self._lock:
            found = self._discover() if self._discover is not None else {}
            for pid, rest in found.items():
                if pid not in self.rest:
                    with contextlib.suppress(MemStatError):
                        self._add(pid, rest)
            for pid in sorted(self._live):
                try:
                    value = shared_excess(pid)
                except MemStatError:
                    self._live.discard(pid)
                    continue
                self.most[pid] = max(self.most[pid], value)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def discount(self, pid: int) -> int:
        """How much more the process's pages counted whole than by their share, at most,
        over the window (beyond what they did when its sampling began; 0 if it never did)."""

        with self._lock:
            return max(0, self.most.get(pid, 0) - self.rest.get(pid, 0))


#: Machine-wide kernel counters that say why a first touch of fresh memory costs more
#: than its page faults: direct reclaim, compaction, huge pages, and pages the VM gave
#: back to its host (``page_reporting``: touching them again faults in the host too).
_EVENTS = (
    "pgfault", "pgmajfault", "allocstall_normal", "allocstall_movable", "pgscan_direct",
    "pgsteal_direct", "compact_stall", "compact_fail", "thp_fault_alloc",
    "thp_fault_fallback", "numa_hint_faults",
    # Pages dirtied, and written back, over a span: writeback of what ran before shows here.
    "nr_dirtied", "nr_written",
)  # fmt: skip
_REPORTED = Path("/sys/module/page_reporting/parameters/reported_kib")


def kernel_events() -> dict[str, int]:
    """The counters of :data:`_EVENTS` now (those this kernel has), and ``reported_kib``."""

    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in _EVENTS:
                out[name] = int(value)
    with contextlib.suppress(OSError, ValueError):
        out["reported_kib"] = int(_REPORTED.read_text())
    return out


def minor_faults(pid: int) -> int:
    """The page faults ``pid`` took without I/O so far (``/proc/PID/stat``, ``minflt``)."""

    fields = _procfs.stat(pid)
    if fields is None:
        raise MemStatError(f"cannot read the faults of process {pid}: it is gone", pid=pid)
    return int(fields[_procfs.MINFLT])
