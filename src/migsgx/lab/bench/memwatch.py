"""The machine's dirty and writeback page cache over one benchmark arm, by phase.

Where the destination writes CRIU's images decides what a run leaves the next:
on a disk's file system (ext4 here), gigabytes of dirty page cache, written
back once they exceed the kernel's background threshold; on a tmpfs, memory
that goes with the files.  :class:`MemoryWatch` samples ``/proc/meminfo``
(``Dirty``, ``Writeback``, ``Shmem``, ``MemFree``) in a thread while an arm runs, on the
clock the timelines use (``CLOCK_MONOTONIC``), and :meth:`MemoryWatch.figures`
gives the values before and after the arm, their peaks, and the values at the
start and end of each of the tool's phases: what a phase met, and what it left;
and the kernel's reclaim and compaction counters over the arm
(:func:`~migsgx.lab.memstat.kernel_events`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from ..memstat import kernel_events

__all__ = ["FIELDS", "MemoryWatch", "meminfo_mib"]

#: The /proc/meminfo fields sampled (MiB in the figures).
FIELDS: Final = ("Dirty", "Writeback", "Shmem", "MemFree")
INTERVAL: Final = 0.05


def meminfo_mib(path: Path = Path("/proc/meminfo")) -> dict[str, float]:
    """:data:`FIELDS` of ``/proc/meminfo`` in MiB (absent fields left out)."""

    out: dict[str, float] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            try:
                out[key] = round(int(rest.split()[0]) / 1024, 1)
            except (IndexError, ValueError):
                continue
    return out


class MemoryWatch:
    """Samples :data:`FIELDS` every :data:`INTERVAL` s until the ``with`` block ends."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._events0: dict[str, int] = {}
        self._events: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memwatch", daemon=True)

    def start(self) -> MemoryWatch:
        """The first sample, and the thread that takes the others."""

        self._events0 = kernel_events()
        self.samples.append((time.monotonic(), meminfo_mib()))
        self._thread.start()
        return self

    def close(self) -> None:
        """The thread ends, and the last sample (nothing if never started)."""

        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), meminfo_mib()))
        self._events = {k: v - self._events0.get(k, 0) for k, v in kernel_events().items()}

    def __enter__(self) -> MemoryWatch:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.samples.append((time.monotonic(), meminfo_mib()))

    def at(self, t: float) -> dict[str, float]:
        """The last sample taken at or before ``t`` (monotonic), else the first."""

        found = self.samples[0][1] if self.samples else {}
        for when, values in self.samples:
            if when > t:
                break
            found = values
        return found

    def figures(
        self, spans: dict[str, list[float]] | None = None, origin: float = 0.0
    ) -> dict[str, Any]:
        """Before, after, peak; and per phase of ``spans`` ([start, end] seconds after
        ``origin``, monotonic) the values at its start and end."""

        if not self.samples:
            return {}
        peak = {k: max(v.get(k, 0.0) for _, v in self.samples) for k in FIELDS if k != "MemFree"}
        free = [v["MemFree"] for _, v in self.samples if "MemFree" in v]
        out: dict[str, Any] = {
            "before_mib": self.samples[0][1],
            "after_mib": self.samples[-1][1],
            "peak_mib": peak,
            # The least memory free over the arm: its peak use, beside everyone else's.
            "min_mib": {"MemFree": min(free)} if free else {},
            "samples": len(self.samples),
            "kernel_events": self._events,
            # The machine's count at the arm's start: its rise from one arm's start to the
            # next is what the VM gave back to its host between them (first touch again).
            "reported_kib_at_start": self._events0.get("reported_kib", 0),
        }
        if spans:
            out["phases_mib"] = {
                phase: {"start": self.at(origin + a), "end": self.at(origin + b)}
                for phase, (a, b) in spans.items()
            }
        return out
