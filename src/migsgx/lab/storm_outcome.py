"""What one storm migration came to, and the storm's totals: judged and printed.

:class:`Outcome` is one migration as printed (one JSON object);
:func:`judge_back` fails a migration whose source did not run again within the
bound where it did not move; :func:`summary` totals a storm: outcomes by fault
kind, the failures, the source's seconds back per fault kind, and how often
each fault point was drawn and fired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .storm_timeline import by_kind, spread

__all__ = ["Outcome", "as_json", "back_lines", "judge_back", "summary"]


@dataclass
class Outcome:
    """One migration of a storm, as printed (one JSON object)."""

    index: int
    seed: int
    fault: str
    kind: str
    frm: str
    exit: int
    outcome: str = ""
    #: Whether every point the fault names fired (:attr:`points`).
    reached: bool = False
    #: Each point the fault names, and whether it fired (its mark in a log).
    points: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0
    back_seconds: float | None = None
    #: The former measure, for comparison: a ``PING`` sent only once the tool ended
    #: and what the fault killed was started again (exit 6 only).
    back_polled_seconds: float | None = None
    #: From the fault to the client's first acknowledged write after it (the
    #: enclaves back too), while the tool still ran.
    write_back_seconds: float | None = None
    #: Who noticed the fault and how (:func:`.storm_timeline.noticed`).
    noticed: str = ""
    #: Seconds from the fault to each step marked, the tool's end, the source's
    #: answer and the client's write (:func:`.storm_timeline.timeline`).
    timeline: dict[str, float] = field(default_factory=dict)
    recover: dict[str, int] = field(default_factory=dict)
    #: When the storm started ``migsgx recover`` (the supervisor's step), if it did.
    recover_at: float | None = None
    #: The seconds judged against the bound (:func:`judge_back`): from the fault, or
    #: from ``recover``'s start where only it could give the source back.
    bound_seconds: float | None = None
    acked: int = 0
    over_bound: bool = False
    failures: list[str] = field(default_factory=list)
    #: The tool's last line where it did not exit 0 (why it did not move).
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index, "seed": self.seed, "fault": self.fault, "kind": self.kind,
            "from": self.frm, "exit": self.exit, "outcome": self.outcome,
            "reached": self.reached, "points": self.points, "seconds": round(self.seconds, 3),
            "back_seconds": _rounded(self.back_seconds),
            "back_polled_seconds": _rounded(self.back_polled_seconds),
            "write_back_seconds": _rounded(self.write_back_seconds),
            "noticed": self.noticed, "timeline": self.timeline,
            "recover": self.recover, "bound_seconds": _rounded(self.bound_seconds),
            "acked": self.acked, "over_bound": self.over_bound,
            "failures": self.failures, "reason": self.reason,
        }  # fmt: skip


def judge_back(out: Outcome, bound: float, at: float | None) -> None:
    """Where the source stayed, whether it answered again within ``bound`` seconds of
    the fault (at ``at``); past it, or not back at all, the migration failed.

    The goal (``docs/migration.md``): any fault before the commit point lets the
    source run again within the bound.  Where the storm had to run ``migsgx
    recover`` (the tool and its guardian both dead: only an operator's step gives
    the source back), the seconds count from that step's start, not from the
    fault: the operator's delay is not the product's.
    """

    if out.outcome != "stayed" or at is None or not out.reached:
        return
    if out.back_seconds is None:
        out.over_bound = True
        out.failures.append("the source did not answer again while the storm watched")
        return
    answer = at + out.back_seconds
    since = at
    if out.recover_at is not None and answer > out.recover_at:
        since = max(at, out.recover_at)
    out.bound_seconds = answer - since
    if out.bound_seconds > bound:
        out.over_bound = True
        start = "the fault" if since == at else "migsgx recover's start"
        out.failures.append(f"the source answered again {out.bound_seconds:.2f} s after "
                            f"{start}, past the {bound:g} s bound")  # fmt: skip


def summary(outcomes: list[Outcome]) -> dict[str, object]:
    """Totals by fault kind and outcome, the failures, the source's seconds back, and
    how often each fault point was drawn and fired."""

    kinds: dict[str, dict[str, int]] = {}
    points: dict[str, dict[str, int]] = {}
    for o in outcomes:
        per = kinds.setdefault(o.kind, {})
        per[o.outcome] = per.get(o.outcome, 0) + 1
        for point, done in o.points.items():
            counts = points.setdefault(point, {"drawn": 0, "fired": 0})
            counts["drawn"] += 1
            counts["fired"] += int(done)
    judged: dict[str, list[float]] = {}
    for o in outcomes:
        if o.bound_seconds is not None:
            judged.setdefault(o.kind, []).append(o.bound_seconds)
    backs = [o.back_seconds for o in outcomes if o.back_seconds is not None]
    polled = [o.back_polled_seconds for o in outcomes if o.back_polled_seconds is not None]
    return {
        "migrations": len(outcomes),
        "failed": sum(1 for o in outcomes if o.failures),
        "by_kind": kinds,
        "source_back_seconds": spread(backs),
        "source_back_polled_seconds": spread(polled),
        "back_by_kind": by_kind((o.kind, o.back_seconds, o.timeline) for o in outcomes),
        # The seconds judged against the bound (:func:`judge_back`), per fault kind.
        "bound_by_kind": {k: spread(v) for k, v in sorted(judged.items())},
        "over_bound": [_over_bound(o) for o in outcomes if o.over_bound],
        "points": dict(sorted(points.items())),
        "not_fired": sum(1 for o in outcomes if o.points and not o.reached),
        "failures": [
            {"index": o.index, "seed": o.seed, "fault": o.fault, "failures": o.failures}
            for o in outcomes
            if o.failures
        ],
    }


def back_lines(result: dict[str, object]) -> list[str]:
    """Per fault kind, the seconds to the source's return where it stayed (min /
    median / max, runs), as the storm prints them after its summary."""

    lines = []
    judged = result.get("bound_by_kind")
    for kind, row in sorted(judged.items() if isinstance(judged, dict) else []):
        if isinstance(row, dict):
            lines.append(f"source back, {kind}: {row['min']:.2f} / {row['median']:.2f} / "
                         f"{row['max']:.2f} s ({row['runs']})")  # fmt: skip
    return lines


def _over_bound(o: Outcome) -> dict[str, object]:
    return {"index": o.index, "fault": o.fault, "back_seconds": _rounded(o.back_seconds),
            "bound_seconds": _rounded(o.bound_seconds), "noticed": o.noticed,
            "timeline": o.timeline}  # fmt: skip


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def as_json(out: Outcome) -> str:
    return json.dumps(out.to_dict(), sort_keys=True)
