"""Medians, spreads and timelines of the benchmarks' JSON (no processes involved)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from migsgx.lab.bench.figures import cpu_seconds, machine_state, shift_timeline, summarize


def test_top_level_keys_hold_medians_and_spread_holds_min_max() -> None:
    runs = [
        {"pipelined": {"seconds": 3.0, "mode": "pipelined"}, "ratio": 2.0, "ok": True},
        {"pipelined": {"seconds": 1.0, "mode": "pipelined"}, "ratio": 4.0, "ok": True},
        {"pipelined": {"seconds": 2.0, "mode": "pipelined"}, "ratio": 3.5, "ok": True},
    ]
    result = summarize(runs)
    assert result["pipelined"] == {"seconds": 2.0, "mode": "pipelined"}
    assert result["ratio"] == 3.5
    assert result["ok"] is True  # flags are not averaged
    assert result["spread"]["pipelined"]["seconds"] == {"min": 1.0, "max": 3.0}
    assert result["spread"]["ratio"] == {"min": 2.0, "max": 4.0}
    assert "ok" not in result["spread"]
    assert result["runs"] == runs


def test_even_number_of_runs_takes_the_middle_mean() -> None:
    assert summarize([{"x": 1.0}, {"x": 2.0}])["x"] == 1.5


def test_no_runs_is_an_error() -> None:
    with pytest.raises(ValueError):
        summarize([])


def test_timeline_is_relative_to_its_first_event_and_drops_empty_phases() -> None:
    shifted = shift_timeline(
        {
            "driver": {"launch": [100.0, 100.5], "send": [100.7, 100.7]},
            "enclave": {"seal": [100.2, 101.0]},
        }
    )
    assert shifted == {"driver": {"launch": [0.0, 0.5]}, "enclave": {"seal": [0.2, 1.0]}}


def test_machine_state_and_cpu_time_of_this_process() -> None:
    state = machine_state([0.5, 0.25, 0.0])
    assert state["loadavg_before"] == [0.5, 0.25, 0.0]
    assert len(state["loadavg_after"]) == 3
    assert state["fresh_boot"] == (state["uptime_seconds"] < 900)
    spent = cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))  # burn some CPU
    assert cpu_seconds(os.getpid()) > spent


def test_client_gap_leaves_out_the_time_the_writer_was_paused() -> None:
    """Another enclave's turn to move is not a gap this client saw."""

    from migsgx.lab.bench.live import Writer

    writer = Writer.__new__(Writer)  # only its record of calls, no thread
    writer.done = [(0.0, 1.0), (1.0, 2.0), (30.0, 31.0), (31.0, 31.5), (31.5, 33.5), (33.5, 34.0)]
    writer.resumed = [0.0, 29.5]
    assert writer.gap(30.5, 34.0) == 2.0  # not 29.0, from 2.0 (paused) to 31.0
    writer.resumed = []
    assert writer.gap(30.5, 34.0) == 29.0  # without the record: the pause counted


def _mode_run(total: float) -> dict[str, object]:
    return {
        "total_seconds": total,
        "downtime_seconds": total / 10,
        "timeline": {"tool": {"dump": [0.0, total]}},
        "cpu_by_process": {"tool": total / 2},
    }


def test_plots_take_each_modes_median_run(tmp_path: Path) -> None:
    from migsgx.lab.bench import container, process
    from migsgx.lab.bench.plot import median_panels

    # The median of each mode on its own: run 0 is the median of "migsgx", run 2 of the other.
    runs = [
        {"migsgx": _mode_run(2.0), "criu_only": _mode_run(9.0), "engine_only": _mode_run(9.0)},
        {"migsgx": _mode_run(1.0), "criu_only": _mode_run(7.0), "engine_only": _mode_run(7.0)},
        {"migsgx": _mode_run(3.0), "criu_only": _mode_run(8.0), "engine_only": _mode_run(8.0)},
    ]
    result = {"runs": runs, "enclave_size": 64 << 20, "engine": "runc"}
    panels = median_panels(result, [("migsgx", "migsgx migrate"), ("criu_only", "CRIU alone")])
    assert [title for title, _, _ in panels] == [
        "migsgx migrate, enclave 64 MiB: total 2.00 s, downtime 0.20 s (median run)",
        "CRIU alone, enclave 64 MiB: total 8.00 s, downtime 0.80 s (median run)",
    ]
    assert panels[1][1:] == ({"tool": {"dump": [0.0, 8.0]}}, {"tool": 4.0})
    # Both benchmarks draw them (matplotlib, a PNG each).
    for module in (process, container):
        png = tmp_path / f"{module.__name__}.png"
        module.plot(result, png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
