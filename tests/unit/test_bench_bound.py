"""The pipeline bound of ``bench state``: stages and the best ratio from CPU figures."""

from __future__ import annotations

from typing import Any

import pytest

from migsgx.lab.bench.bound import (
    pipeline_bound,
    process_cpu,
    process_switches,
    sequential_floor,
    stage_cpu,
)


def _phases(mode: str, src_enclave: float, src_driver: dict[str, float],
            dst_driver: dict[str, float], dst_enclave: float) -> dict[str, Any]:  # fmt: skip
    return {
        "mode": mode,
        "enclave_cpu_seconds": src_enclave,
        "driver_cpu": src_driver,
        "destination": {"enclave_cpu_seconds": dst_enclave, "driver_cpu": dst_driver},
    }


PIPELINED = _phases("pipelined", 0.2, {"dump": 0.3, "send": 0.0, "load_wait": 0.01},
                    {"receive": 0.0, "load": 0.3}, 0.55)  # fmt: skip
SEQUENTIAL = _phases("sequential", 0.2, {"dump": 0.35, "send": 0.3, "load_wait": 0.0},
                     {"receive": 0.5, "load": 0.4}, 0.55)  # fmt: skip


def test_process_cpu_sums_each_drivers_phases() -> None:
    expected = {"source_enclave": 0.2, "source_driver": 0.31, "destination_driver": 0.3,
                "destination_enclave": 0.55}  # fmt: skip
    assert process_cpu(PIPELINED) == pytest.approx(expected)


def test_pipelined_stages_are_whole_processes() -> None:
    assert stage_cpu(PIPELINED) == pytest.approx({"dump": 0.2, "transfer": 0.61, "load": 0.55})


def test_sequential_stages_split_the_drivers_by_phase() -> None:
    assert stage_cpu(SEQUENTIAL) == pytest.approx({"dump": 0.55, "transfer": 0.8, "load": 0.95})


def test_bound_is_total_over_cores_when_no_process_dominates() -> None:
    b = pipeline_bound(
        {"seconds": 1.0, "active_seconds": 0.02, "phases": PIPELINED},
        {"seconds": 2.6, "phases": SEQUENTIAL},
        cores=2,
    )
    floor = sequential_floor(SEQUENTIAL, 2) + 0.02
    assert b["sequential_floor_seconds"] == pytest.approx(floor)
    total = 0.2 + 0.31 + 0.3 + 0.55
    assert b["cpu_ratio"] == pytest.approx(floor / (total / 2 + 0.02))
    assert b["total_cpu_seconds"] == pytest.approx(total)
    assert b["busiest_process"] == "destination_enclave"
    assert b["best_pipelined_seconds"] == pytest.approx(total / 2 + 0.02)
    assert b["best_ratio"] == pytest.approx(2.6 / (total / 2 + 0.02))
    assert b["pipelined_over_best"] == pytest.approx(1.0 / (total / 2 + 0.02))


def test_bound_is_the_busiest_process_when_cores_are_plenty() -> None:
    b = pipeline_bound(
        {"seconds": 1.0, "active_seconds": 0.0, "phases": PIPELINED},
        {"seconds": 2.6, "phases": SEQUENTIAL},
        cores=8,
    )
    assert b["best_pipelined_seconds"] == pytest.approx(0.55)


def test_no_cores_is_an_error() -> None:
    with pytest.raises(ValueError):
        pipeline_bound({"seconds": 1, "active_seconds": 0, "phases": PIPELINED},
                       {"seconds": 2}, cores=0)  # fmt: skip


def test_sequential_floor_adds_its_three_phases_each_overlapped_two_by_two() -> None:
    # dump: enclave 0.2 beside drain 0.35; send 0.3 beside receive 0.5; fill 0.4 beside open 0.55
    assert sequential_floor(SEQUENTIAL, 2) == pytest.approx(0.35 + 0.5 + 0.55)
    assert sequential_floor(SEQUENTIAL, 1) == pytest.approx(0.55 + 0.8 + 0.95)


def test_switches_by_process_and_none_reported_counts_zero() -> None:
    phases = {**PIPELINED, "enclave_switches": 9000, "driver_switches": 8500,
              "destination": {**PIPELINED["destination"], "driver_switches": 12000}}  # fmt: skip
    assert process_switches(phases) == {"source_enclave": 9000, "source_driver": 8500,
                                        "destination_driver": 12000,
                                        "destination_enclave": 0}  # fmt: skip
