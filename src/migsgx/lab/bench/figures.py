"""What every benchmark reports besides its own figures: repeats, CPU time, machine state.

A benchmark runs its comparison ``--repeat N`` times in one invocation and
keeps every run (``runs``).  The top-level keys hold the *median* of each
number over the runs (ratios are taken per run, so a pair measured side by side
stays a pair), and ``spread`` holds ``{"min": ..., "max": ...}`` for each.  A
single best run is never the figure: on a machine shared with other work, the
spread is part of the result.

``machine`` says how fresh the machine was (``uptime_seconds``; the first
touch of memory the kernel has not handed out before is slow on these VMs, so
a freshly booted machine is slower) and how loaded (``loadavg`` before and
after, from ``/proc/loadavg``).

CPU time comes from ``/proc/PID/stat`` (user + system, all threads), read
while the process lives; ``children=True`` adds what its waited-for children
used (CRIU runs as a child of the tool and of the agent).
"""

from __future__ import annotations

import os
import resource
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from ... import _proc
from ...errors import MigSGXError

__all__ = [
    "FRESH_BOOT_SECONDS",
    "children_cpu",
    "cpu_seconds",
    "loadavg",
    "machine_state",
    "shift_timeline",
    "summarize",
]

FRESH_BOOT_SECONDS = 900.0
"""Up for less than this: counted as freshly booted (its memory mostly never touched)."""

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU seconds of a live process (and its reaped children)."""

    fields = _proc.stat(pid)
    if fields is None:
        raise MigSGXError(f"cannot read the CPU time of process {pid}: it is gone")
    utime, stime, cutime, cstime = (int(x) for x in fields[_proc.UTIME : _proc.CSTIME + 1])
    ticks = utime + stime + (cutime + cstime if children else 0)
    return ticks / _TICKS


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (and theirs): tools run to completion."""

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""

    with open("/proc/loadavg", encoding="ascii") as f:
        return [float(x) for x in f.read().split()[:3]]


def _uptime() -> float:
    with open("/proc/uptime", encoding="ascii") as f:
        return float(f.read().split()[0])


def machine_state(before: Sequence[float] | None = None) -> dict[str, Any]:
    """The machine as a benchmark found it; ``before`` is :func:`loadavg` at the start."""

    uptime = _uptime()
    return {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "uptime_seconds": round(uptime, 1),
        "fresh_boot": uptime < FRESH_BOOT_SECONDS,
        "loadavg_before": list(before) if before is not None else None,
        "loadavg_after": loadavg(),
    }


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _median(values: list[Any]) -> Any:
    first = values[0]
    if all(isinstance(v, Mapping) for v in values):
        keys = [k for k in first if all(k in v for v in values)]
        return {k: _median([v[k] for v in values]) for k in keys}
    if all(_is_number(v) for v in values):
        return statistics.median(values)
    return first  # text, flags, lists: the same in every run, or the first run's


def _spread(values: list[Any]) -> Any:
    first = values[0]
    if all(isinstance(v, Mapping) for v in values):
        out = {}
        for k in first:
            if all(k in v for v in values):
                inner = _spread([v[k] for v in values])
                if inner is not None:
                    out[k] = inner
        return out or None
    if all(_is_number(v) for v in values):
        return {"min": min(values), "max": max(values)}
    return None


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians at the top, every run under ``runs``, min/max under ``spread``."""

    if not runs:
        raise ValueError("no runs to summarize")
    every = [dict(r) for r in runs]
    median: dict[str, Any] = _median(every)
    median["runs"] = every
    median["spread"] = _spread(every) or {}
    return median


def shift_timeline(
    timeline: Mapping[str, Mapping[str, Sequence[float]]], origin: float | None = None
) -> dict[str, dict[str, list[float]]]:
    """Absolute monotonic spans made relative to ``origin`` (default: the earliest start).

    Spans of zero length are left out: they are phases a mode does not have.
    """

    spans = [s for phases in timeline.values() for s in phases.values() if len(s) == 2]
    if origin is None:
        origin = min((s[0] for s in spans), default=0.0)
    return {
        proc: {
            name: [round(s[0] - origin, 4), round(s[1] - origin, 4)]
            for name, s in phases.items()
            if len(s) == 2 and s[1] > s[0]
        }
        for proc, phases in timeline.items()
    }
