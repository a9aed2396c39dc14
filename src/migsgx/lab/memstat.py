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
  processes counts twice in the sum, although it occupies its memory once.
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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import MigSGXError, register_error

__all__ = [
    "MemStatError",
    "PeakWindow",
    "file_rss",
    "peak_rss",
    "reset_peak",
    "rss",
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
