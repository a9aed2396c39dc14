"""A migration's figures from its phases: the spans between the tool's marks and the
timeline of every process, on the one monotonic clock of the machine.

Plain arithmetic over the marks (phase name -> ``time.monotonic()``) and the
enclave streams' own figures; the state that makes them is :mod:`.source_state`.
"""

from __future__ import annotations

import resource
from typing import Any

__all__ = ["children_cpu", "overlapped_order", "span", "timeline"]


def span(t: dict[str, float], a: str, b: str) -> float:
    """Seconds from mark ``a`` to mark ``b`` (0 where either is missing)."""

    return max(0.0, t[b] - t[a]) if a in t and b in t else 0.0


def overlapped_order(t: dict[str, float]) -> bool:
    """Whether the restore came before the join of the enclave streams."""

    return "restored" in t and "enclaves_sent" in t and t["restored"] <= t["enclaves_sent"]


def timeline(
    t: dict[str, float], sent: list[dict[str, Any]], dest: list[dict[str, Any]]
) -> dict[str, Any]:
    """Phases per process as absolute CLOCK_MONOTONIC spans, with their origin.

    One clock serves every process of the machine, so the tool's phases, the
    enclave streams' (both hosts of a testbed share the kernel) line up.  ``sent``:
    each source enclave stream's figures; ``dest``: each destination's.
    """

    tool = {
        name: [t[a], t[b]]
        for name, a, b in (
            ("early_handshake", "handshake", "handshaken"),
            ("freeze", "prepare", "prepared"),
            ("criu_dump", "dump", "dumped"),
            *(
                (
                    ("images", "dumped", "images_sent"),
                    ("restore", "images_sent", "restored"),
                    ("join_enclaves", "restored", "enclaves_sent"),
                    ("commit", "enclaves_sent", "committed"),
                )
                if overlapped_order(t)
                else (
                    ("join_enclaves", "dumped", "enclaves_sent"),
                    ("images", "enclaves_sent", "images_sent"),
                    ("restore", "images_sent", "restored"),
                    ("commit", "restored", "committed"),
                )
            ),
            ("resume", "committed", "resumed"),
        )
        if a in t and b in t
    }
    spans: dict[str, Any] = {"tool": tool}
    for ends in (sent, dest):  # (a destination's phases after its source's, as before)
        for i, s in enumerate(ends):
            for proc, phases in s.get("timeline", {}).items():
                spans[f"enclave{i}.{proc}"] = phases
    return {"origin": t["start"], "spans": spans}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
