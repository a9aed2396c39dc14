"""Storm faults (:mod:`migsgx.lab.storm_faults`): named, replayed from a seed, and what
each may cost."""

from __future__ import annotations

import random

import pytest

from migsgx.agent.faults import POINTS
from migsgx.lab import storm_ckpt
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


@pytest.mark.parametrize(
    "spec, kind, may_lose",
    [
        ("none", "none", ""),
        ("ckpt.before-dump:kill-source", "checkpoint kill-source", "gone"),
        ("ckpt.before-commit:kill-source", "checkpoint kill-source", ""),
        ("ckpt.before-commit:kill-enclave", "checkpoint kill-enclave",
         "the source enclave held the only copy"),
        ("ckpt.after-commit:kill-enclave", "checkpoint kill-enclave", ""),
        ("restore.loaded:kill-source", "restore kill-source", ""),
        ("restore.activated:kill-source", "restore kill-source",
         "the restored enclave (activated) held the only copy"),
    ],
)  # fmt: skip
def test_checkpoint_storm_faults_name_the_step_and_what_may_be_lost(
    spec: str, kind: str, may_lose: str
) -> None:
    fault = storm_ckpt.parse(spec)
    assert (fault.spec, fault.kind, fault.may_lose) == (spec, kind, may_lose)


def test_checkpoint_storm_draws_named_points_and_replays_from_a_seed() -> None:
    assert set(storm_ckpt.CKPT_POINTS + storm_ckpt.RESTORE_POINTS) <= POINTS
    first = [storm_ckpt.draw(random.Random(seed)) for seed in range(200)]
    assert first == [storm_ckpt.draw(random.Random(seed)) for seed in range(200)]
    assert all(storm_ckpt.parse(f.spec) == f for f in first)
    assert {f.kind for f in first} >= {"none", "checkpoint kill-guardian", "restore exit"}
    with pytest.raises(ValueError, match="unknown checkpoint storm fault"):
        storm_ckpt.parse("ckpt.nowhere:exit")
