"""The figures of ``migsgx bench live``: freeze steps, medians, paired ratios (no I/O)."""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["FIGURES", "FREEZE_STEPS", "freeze_steps", "paired", "size_ratio", "step_medians",
           "summary"]  # fmt: skip

FIGURES = (
    "downtime_seconds",
    "client_gap_seconds",
    "total_seconds",
    "bytes_sent",
    "bytes_over_size",
    "rounds",
    "verify_seconds",
    "verify_bytes",
    "destination_verify_seconds",
    "downtime_without_verify_seconds",
    "freeze_to_loaded_seconds",
    "commit_seconds",
    "setup_in_downtime_seconds",
    "tracking_overhead",
    "final_pages",
)


#: The live freeze on the critical path, in order (``freeze_steps``).
FREEZE_STEPS = (
    "handover", "quiesce", "final_scan", "final_send", "source_digest", "digest_send",
    "destination_tail", "loaded_verify", "decide", "deliver",
)  # fmt: skip


def freeze_steps(
    stats: dict[str, Any], t_freeze: float, t_loaded: float, t_decided: float, t_active: float
) -> dict[str, Any]:
    """Where a live downtime goes: seconds per step from the freeze to the destination running.

    Every process stamps its steps with CLOCK_MONOTONIC (one clock on the
    host), so the source driver's, the source enclave's and this driver's
    steps lie end to end: ``handover`` (the final frame, the ring), the
    enclave's ``quiesce``, ``final_scan`` (the last PAGEMAP_SCAN), ``final_send``
    (last pages and small state into the ring), ``source_digest``,
    ``digest_send`` (until the ring drained), ``destination_tail`` (the
    destination's check and LOADED back), ``loaded_verify``, ``decide`` (the
    durable COMMIT), ``deliver`` (the token until the destination runs).
    ``other`` is what the steps leave out of the downtime.  The destination
    enclave's own steps, which overlap the source's, are under ``destination``.
    """

    timeline = stats.get("timeline", {})
    driver, enclave = timeline.get("source_driver", {}), timeline.get("source_enclave", {})
    try:
        marks = [
            ("handover", t_freeze, enclave["quiesce"][0]),
            *((k, *enclave[k]) for k in FREEZE_STEPS[1:6]),
            ("destination_tail", enclave["digest_send"][1], driver["loaded_wait"][1]),
            ("loaded_verify", *driver["loaded_verify"]),
            ("decide", driver["loaded_verify"][1], t_decided),
            ("deliver", t_decided, t_active),
        ]
    except (KeyError, IndexError, TypeError):
        return {}
    steps: dict[str, Any] = {name: float(b) - float(a) for name, a, b in marks}
    steps["other"] = (t_active - t_freeze) - sum(steps.values())
    dest = stats.get("destination", {}).get("timeline", {}).get("destination_enclave", {})
    steps["destination"] = {k: float(v[1]) - float(v[0]) for k, v in dest.items()}
    return steps


def step_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds of each freeze step over the runs (``destination`` likewise)."""

    steps = [r["freeze_steps"] for r in runs if r.get("freeze_steps")]
    if not steps:
        return {}
    out: dict[str, Any] = {}
    for key in (*FREEZE_STEPS, "other"):
        values = [s[key] for s in steps if key in s]
        if values:
            out[key] = statistics.median(values)
    dest = [s.get("destination", {}) for s in steps]
    out["destination"] = {k: statistics.median([d[k] for d in dest if k in d]) for k in dest[0]}
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def paired(settled: list[dict[str, Any]], unsettled: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pair (same repeat, back to back), unsettled over settled; medians and spread."""

    out: dict[str, Any] = {}
    for key in ("downtime_seconds", "final_pages", "rounds", "bytes_sent"):
        ratios = [
            float(u[key]) / float(s[key])
            for s, u in zip(settled, unsettled, strict=True)
            if _number(s.get(key)) and _number(u.get(key)) and s[key]
        ]
        if ratios:
            out[f"{key}_unsettled_over_settled"] = {
                "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)
            }  # fmt: skip
    return out


def summary(
    runs: list[dict[str, Any]], keys: tuple[str, ...] = FIGURES
) -> tuple[dict[str, Any], dict[str, Any]]:
    medians: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values:
            medians[key] = statistics.median(values)
            spread[key] = {"min": min(values), "max": max(values)}
    return medians, spread


def size_ratio(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Live downtime of the largest size over the smallest, per repeat, then the median.

    The sizes run interleaved (:func:`~.live.run_sizes`): repeat ``i`` of
    every size ran back to back, so each pair saw the same machine.
    """

    if len(results) < 2:
        return None
    small = min(results, key=lambda r: r["enclave_bytes"])
    large = max(results, key=lambda r: r["enclave_bytes"])
    ratios = [
        float(b["downtime_seconds"]) / float(a["downtime_seconds"])
        for a, b in zip(small["live"]["runs"], large["live"]["runs"], strict=False)
        if a.get("downtime_seconds") and b.get("downtime_seconds")
    ]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "ratios": ratios}  # fmt: skip
