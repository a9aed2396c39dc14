"""``migsgx bench state`` end to end on a small enclave: the figures it promises are there.

Real processes (two platform services, four enclave and driver processes per
migration, the raw baseline's four), nothing timed: the assertions are about
what the JSON holds, not how fast anything was.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from migsgx.lab.bench import state

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="bench state resets peaks through /proc"),
]

PROCESSES = {"source_driver", "source_enclave", "destination_driver", "destination_enclave"}


def test_bench_state_repeats_and_reports_medians_spread_cpu_and_timelines(tmp_path: Path) -> None:
    result = state.run(2 << 20, 64 << 10, 2, repeat=2, ab_policy="batch")
    assert len(result["runs"]) == 2
    # The A/B's variant runs after the plain one, then before it.
    assert [r["variants_first"] for r in result["runs"]] == [False, True]
    for key in ("seconds", "transfer_seconds", "peak_extra_bytes"):
        spread = result["spread"]["pipelined"][key]
        assert spread["min"] <= result["pipelined"][key] <= spread["max"]
        assert sorted(r["pipelined"][key] for r in result["runs"]) == [spread["min"], spread["max"]]
    for run in result["runs"]:
        assert run["peak_extra_enclave_share"] <= run["peak_extra_share"]
        assert run["sequential_over_pipelined"] == pytest.approx(
            run["sequential"]["seconds"] / run["pipelined"]["seconds"]
        )
        bound = run["bound"]
        assert bound["cores"] == len(os.sched_getaffinity(0))
        assert bound["total_cpu_seconds"] == pytest.approx(
            sum(run["pipelined"]["window_cpu_by_process"].values())
        )
        assert bound["best_ratio"] == pytest.approx(
            run["sequential"]["seconds"] / bound["best_pipelined_seconds"]
        )
        assert run["batch_speedup"] == pytest.approx(
            run["pipelined"]["seconds"] / run["pipelined_batch"]["seconds"]
        )
        for mode in ("pipelined", "sequential"):
            figures = run[mode]
            assert set(figures["cpu_by_process"]) == PROCESSES
            assert set(figures["timeline"]) == PROCESSES
            assert set(figures["peak_extra_by_process"]) == PROCESSES
            assert figures["peak_extra_bytes"] == sum(figures["peak_extra_by_process"].values())
            assert figures["code_faulted_bytes"] == sum(figures["code_faulted_by_process"].values())
            assert set(figures["code_faulted_by_process"]) == PROCESSES
            # Measured from its launch: at least its ring and its private copy of a slot,
            # the ring whole in the VmHWM count, by its share (at least half) in the other.
            whole = figures["peak_extra_rss_by_process"]
            assert whole["destination_enclave"] >= 3 * (64 << 10)
            assert figures["peak_extra_by_process"]["destination_enclave"] >= 2 * (64 << 10)
            assert figures["peak_extra_rss_bytes"] == sum(whole.values())
            for name, share in figures["peak_extra_by_process"].items():
                assert share <= whole[name]
            seal = figures["timeline"]["source_enclave"]["seal"]
            opened = figures["timeline"]["destination_enclave"]["open"]
            commit = figures["timeline"]["source_driver"]["commit"]
            release = figures["timeline"]["source_driver"]["release"]
            assert 0 <= seal[0] <= seal[1] <= commit[0] <= commit[1] <= release[0] <= release[1]
            assert figures["seconds"] <= figures["seconds_to_release"]
            assert set(figures["window_cpu_by_process"]) == PROCESSES
            assert set(figures["window_cpu_by_stage"]) == {"dump", "transfer", "load"}
            # Each end of a ring of 2 slots waits for its peer now and then: 32 chunks
            # of 64 KiB cannot all pass without one process sleeping.
            assert set(figures["window_switches_by_process"]) == PROCESSES
            assert sum(figures["window_switches_by_process"].values()) > 0
            assert opened[1] <= commit[0]  # the destination loaded before the commit
            # What a slow first touch would show in: the drivers' faults, the kernel's counters.
            assert set(figures["minor_faults_by_process"]) == {
                "source_driver",
                "destination_driver",
            }
            assert figures["kernel_events"]["pgfault"] > 0
            # Sequential: both staging buffers faulted in before the freeze.
            staged = (figures["phases"]["staging_prefaulted_bytes"],
                      figures["phases"]["destination"]["staging_prefaulted_bytes"])  # fmt: skip
            assert all(n >= 2 << 20 for n in staged) if mode == "sequential" else staged == (0, 0)
    machine = result["machine"]
    assert machine["cpus"] == os.cpu_count()
    assert len(machine["loadavg_before"]) == len(machine["loadavg_after"]) == 3
    assert isinstance(machine["fresh_boot"], bool)
    png = tmp_path / "timeline.png"
    state.plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
