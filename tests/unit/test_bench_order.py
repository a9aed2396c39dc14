"""Which arm of a benchmark's headline pair runs first: migsgx in odd runs, the
baseline (CRIU alone, the engine alone, the sequential and raw transport runs) in
even ones, as the A/B arms already did.  The arms are recorders here: what is
checked is the order in which each run's code calls them, and that the figures
paired are the ones each call returned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from migsgx.lab.bench import container, process, state


def _recorder(calls: list[str], name: str, figures: dict[str, Any]) -> Any:
    def arm(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return figures

    return arm


@pytest.mark.parametrize("flip", [False, True])
def test_process_pairs_criu_alone_first_every_other_run(
    monkeypatch: pytest.MonkeyPatch, flip: bool
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(process, "_migsgx", _recorder(
        calls, "migsgx", {"total_seconds": 4.0, "downtime_seconds": 3.0}))  # fmt: skip
    monkeypatch.setattr(process, "criu_only", _recorder(calls, "criu", {"total_seconds": 2.0}))
    run = process.one_run(None, 1 << 20, flip=flip)  # type: ignore[arg-type]
    assert calls == (["criu", "migsgx"] if flip else ["migsgx", "criu"])
    assert run["criu_only_ran_first"] is flip
    assert run["criu_over_migsgx_total"] == 0.5 and run["downtime_over_criu"] == 1.5


@pytest.mark.parametrize("flip", [False, True])
def test_container_pairs_the_engine_alone_first_every_other_run(
    monkeypatch: pytest.MonkeyPatch, flip: bool
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(container, "_migsgx", _recorder(
        calls, "migsgx", {"total_seconds": 2.0, "downtime_seconds": 1.0}))  # fmt: skip
    monkeypatch.setitem(container.ENGINE_ONLY, "runc",
                        _recorder(calls, "runc", {"total_seconds": 4.0}))  # fmt: skip
    run = container.one_run(None, None, "runc", 1 << 20, None, flip=flip)  # type: ignore[arg-type]
    assert calls == (["runc", "migsgx"] if flip else ["migsgx", "runc"])
    assert run["engine_only_ran_first"] is flip
    assert run["engine_over_migsgx_total"] == 2.0 and run["downtime_over_engine"] == 0.25


@pytest.mark.parametrize("flip", [False, True])
def test_state_runs_its_baselines_first_every_other_run(
    monkeypatch: pytest.MonkeyPatch, flip: bool
) -> None:
    calls: list[str] = []
    by_process = dict.fromkeys(state.ENCLAVES, 10)

    def migrate_once(*args: Any, **kwargs: Any) -> dict[str, Any]:
        mode = args[6]
        calls.append(mode + ("-batch" if kwargs.get("policy") else ""))
        return {
            "seconds": 2.0 if mode == "pipelined" else 6.0, "seconds_to_release": 1.0,
            "transfer_seconds": 1.0, "total_seconds": 3.0, "window_cpu_by_process": {"a": 1.0},
            "peak_extra_by_process": by_process, "peak_extra_bytes": 20,
            "peak_extra_rss_bytes": 30,
        }  # fmt: skip

    monkeypatch.setattr(state, "migrate_once", migrate_once)
    monkeypatch.setattr(state, "raw_transport", _recorder(calls, "raw", 4.0))
    monkeypatch.setattr(state, "pipeline_bound", lambda *a: {})
    run = state.one_run(Path("i"), Path("a"), Path("b"), 8, 4, 2, False, "batch", flip=flip)
    plain = ["pipelined", "pipelined-batch"]
    baselines = ["sequential", "raw"]
    assert calls == ([*baselines, "pipelined-batch", "pipelined"] if flip else plain + baselines)
    assert run["baselines_first"] is flip and run["variants_first"] is flip
    assert run["sequential_over_pipelined"] == 3.0
    assert run["pipelined_share_of_raw"] == 2.0  # 8 bytes in 1 s, against 4 B/s
