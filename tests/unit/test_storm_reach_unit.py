"""A storm's own honesty: it draws only faults that act in its mode, says per point
whether each fired (one that did not is a failure), and fails a source that came
back later than the bound."""

from __future__ import annotations

import random

import pytest

from migsgx.lab.storm_faults import (
    AGENT_POINTS,
    TOOL_POINTS,
    Fault,
    draw,
    fired,
    parse,
    unreachable,
)
from migsgx.lab.storm_outcome import Outcome, back_lines, judge_back, summary

MODES = ([], ["--live"], ["--late-handshake"], ["--live", "--post-copy"], ["--mode", "sequential"])


@pytest.mark.parametrize("options", MODES, ids=lambda o: " ".join(o) or "default")
def test_no_fault_drawn_is_one_that_never_acts_in_its_mode(options: list[str]) -> None:
    faults = [draw(random.Random(seed), options=options) for seed in range(400)]
    assert [f.spec for f in faults if unreachable(f.tool or f.agent, options)] == []
    assert faults == [draw(random.Random(seed), options=options) for seed in range(400)]
    # (every point that acts in the mode is still drawn)
    points = {p for f in faults for p in f.points}
    expected = {p for p in TOOL_POINTS + AGENT_POINTS if not unreachable(f"{p}:kill", options)}
    assert points == expected


@pytest.mark.parametrize(
    ("spec", "options", "why"),
    [
        ("tool.abort-answered:kill", [], "another fault rolled"),  # (only a pair's)
        ("tool.after-handshake:kill-guardian-and-tool", [], "the guardian starts after"),
        ("tool.after-handshake:kill-guardian", ["--live"], "the guardian starts after"),
        ("tool.after-handshake:drop-data", ["--late-handshake"], "no handshake before"),
        ("tool.after-prepare:drop-data", ["--late-handshake"], "no data connection"),
    ],
)
def test_a_fault_that_cannot_act_is_named_with_its_reason(
    spec: str, options: list[str], why: str
) -> None:
    assert why in unreachable(spec, options)


@pytest.mark.parametrize(
    "spec",
    ["tool.after-handshake:drop-data", "tool.after-handshake:kill", "agent.after-claim:kill"],
)
@pytest.mark.parametrize("options", [[], ["--live"]], ids=["default", "live"])
def test_the_faults_that_act_are_drawn(spec: str, options: list[str]) -> None:
    assert unreachable(spec, options) == ""


def test_each_point_of_a_fault_fired_or_not_from_its_marks() -> None:
    fault = parse("tool.after-handshake:drop-data")
    stderr = "migsgx step: handshaken at 4.000000\n"
    assert fired(fault.points, [stderr]) == {"tool.after-handshake": False}
    stderr += "migsgx fault: tool.after-handshake:drop-data at 5.000000\n"
    assert fired(fault.points, [stderr], since=1.0) == {"tool.after-handshake": True}
    assert fired(fault.points, [stderr], since=6.0) == {"tool.after-handshake": False}  # stale
    pair = Fault("tool.after-commit:kill,guardian.retry:kill", "agent.before-claim:kill")
    guardian = "migsgx fault: guardian.retry:kill at 9.5\n"
    assert fired(pair.points, ["migsgx fault: tool.after-commit:kill at 9.0\n", guardian]) == {
        "tool.after-commit": True, "guardian.retry": True, "agent.before-claim": False,
    }  # fmt: skip
    assert fired(Fault().points, [stderr]) == {}


def _outcome(index: int, **fields: object) -> Outcome:
    out = Outcome(index, 1, "tool.after-prepare:stall-control", "connection stall", "src", 6)
    for name, value in {"outcome": "stayed", "reached": True, **fields}.items():
        setattr(out, name, value)
    return out


def test_a_source_back_past_the_bound_fails_the_migration() -> None:
    late = _outcome(0, back_seconds=5.02)
    judge_back(late, 5.0, at=100.0)
    assert late.over_bound and late.failures == [
        "the source answered again 5.02 s after the fault, past the 5 s bound"
    ]
    early = _outcome(1, back_seconds=4.9)
    judge_back(early, 5.0, at=100.0)
    assert not early.over_bound and early.failures == []
    never = _outcome(2, back_seconds=None)
    judge_back(never, 5.0, at=100.0)
    assert never.over_bound and "did not answer again" in never.failures[0]
    # Given back by the one ``migsgx recover`` the storm ran (the supervisor's step):
    # counted from its start.
    recovered = _outcome(3, back_seconds=32.0, recover_at=130.0, exit=-9)
    judge_back(recovered, 5.0, at=100.0)
    assert recovered.bound_seconds == pytest.approx(2.0) and recovered.failures == []
    moved = _outcome(4, outcome="moved", back_seconds=None)
    judge_back(moved, 5.0, at=100.0)
    assert moved.failures == []
    result = summary([late, early, never, recovered, moved])
    assert result["failed"] == 2
    assert [o["index"] for o in result["over_bound"]] == [0, 2]  # type: ignore[index]
    assert result["bound_by_kind"] == {
        "connection stall": {"min": 2.0, "median": 4.9, "max": 5.02, "runs": 3}
    }
    assert back_lines(result) == ["source back, connection stall: 2.00 / 4.90 / 5.02 s (3)"]


def test_the_summary_counts_per_point_how_often_it_fired() -> None:
    one = _outcome(0, points={"tool.after-handshake": True})
    two = _outcome(1, points={"tool.after-handshake": False}, reached=False)
    three = _outcome(2, points={"agent.after-restore": True})
    result = summary([one, two, three])
    assert result["points"] == {
        "agent.after-restore": {"drawn": 1, "fired": 1},
        "tool.after-handshake": {"drawn": 2, "fired": 1},
    }
    assert result["not_fired"] == 1
