"""The benchmarks' view of one ``migsgx migrate --json``: its seconds, phases and timeline.

Shared by ``bench process`` and ``bench container``.  Besides the tool's own
phases, ``enclave_stream_seconds``: from the freeze to the end of the last
enclave stream (its source driver's ``load_wait``: the destination's LOADED).
The tool's ``enclave_dump`` phase is not that: it runs from the freeze to the
tool's join of the streams, which follows the overlapped restore, so in a run
whose restore is slow it holds the restore's time too.
"""

from __future__ import annotations

from typing import Any

from ...agent.protocol import PHASES
from .figures import shift_timeline

__all__ = ["MODEL_COLS", "enclave_cpu", "migration_figures"]

#: The ``model`` app's rows of float32 weights are this wide.
MODEL_COLS = 1024


def enclave_cpu(stats: dict[str, Any]) -> dict[str, float]:
    """Each enclave process's own CPU seconds over its dump or load (migrate's figures)."""

    cpu = {}
    for side, key in (("source", "enclave_stats"), ("destination", "enclave_destination_stats")):
        for i, enclave in enumerate(stats["details"].get(key, [])):
            cpu[f"enclave{i}.{side}_enclave"] = float(enclave.get("enclave_cpu_seconds", 0.0))
    return cpu


def migration_figures(stats: dict[str, Any], rows: int, wall_seconds: float) -> dict[str, Any]:
    """The benchmark's view of ``migsgx migrate --json`` output."""

    return {
        "total_seconds": stats["total"],
        "downtime_seconds": stats["downtime"],
        "bytes": stats["bytes"],
        "phases": {k: stats[k] for k in PHASES if k not in ("total", "downtime")},
        "details": {
            k: stats["details"][k]
            for k in ("process_downtime", "enclave_bytes", "page_bytes", "image_bytes", "commit")
        },
        "enclave_bytes_declared": rows * MODEL_COLS * 4,
        "tool_wall_seconds": wall_seconds,
        # From the end of CRIU's dump to the destination running: what the overlapped
        # restore shortens (the rest of the enclave streams, the images, the restore).
        "after_dump_seconds": _after_dump(stats.get("timeline")),
        # The freeze to the last enclave stream's end (LOADED); the ``enclave_dump``
        # phase runs on to the tool's join of the streams, after the overlapped restore.
        "enclave_stream_seconds": _stream(stats.get("timeline")),
        "timeline": _relative(stats.get("timeline")),
    }


def _after_dump(timeline: dict[str, Any] | None) -> float:
    tool = ((timeline or {}).get("spans") or {}).get("tool") or {}
    if "criu_dump" not in tool or "resume" not in tool:
        return 0.0
    return max(0.0, float(tool["resume"][1]) - float(tool["criu_dump"][1]))


def _stream(timeline: dict[str, Any] | None) -> float:
    spans = (timeline or {}).get("spans") or {}
    freeze = (spans.get("tool") or {}).get("freeze")
    ends = [
        float(span[1])
        for proc, phases in spans.items()
        if proc.endswith("source_driver")
        for name, span in phases.items()
        if name in ("dump", "load_wait") and len(span) == 2
    ]
    if not freeze or not ends:
        return 0.0
    return max(0.0, max(ends) - float(freeze[1]))


def _relative(timeline: dict[str, Any] | None) -> dict[str, Any]:
    if not timeline:
        return {}
    return shift_timeline(timeline["spans"], origin=float(timeline["origin"]))
