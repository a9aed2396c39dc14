"""Storm faults (:mod:`migsgx.lab.storm_faults`): named, replayed from a seed, and what
each may cost."""

from __future__ import annotations

import random

import pytest

from migsgx.agent.faults import POINTS
from migsgx.lab.storm_faults import AGENT_POINTS, TOOL_POINTS, draw, parse


@pytest.mark.parametrize(
    "spec, kind, may_lose",
    [
        ("none", "none", ""),
        ("tool.after-commit:kill", "kill -9 tool", ""),
        ("tool.before-commit:stall-data", "connection stall", ""),
        ("tool.before-dump:kill-source", "kill -9 source app", "gone"),
        ("agent.after-claim:kill-enclave", "kill -9 destination enclave",
         "the destination enclave held the only copy"),
        ("agent.before-claim:kill-enclave", "kill -9 destination enclave", ""),
    ],
)  # fmt: skip
def test_fault_specs_name_the_party_and_what_may_be_lost(
    spec: str, kind: str, may_lose: str
) -> None:
    fault = parse(spec)
    assert (fault.spec, fault.kind, fault.may_lose) == (spec, kind, may_lose)


def test_every_point_drawn_is_a_fault_point_and_a_seed_replays_its_faults() -> None:
    assert set(TOOL_POINTS + AGENT_POINTS) <= POINTS
    first = [draw(random.Random(seed)) for seed in range(200)]
    assert first == [draw(random.Random(seed)) for seed in range(200)]
    assert all(parse(f.spec) == f for f in first)
    kinds = {f.kind for f in first}
    assert {"none", "connection drop", "connection stall", "connection corrupt"} <= kinds
    assert "kill -9 destination platform service" in kinds and "kill -9 tool" in kinds


def test_an_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown storm fault"):
        parse("tool.nowhere:kill")
