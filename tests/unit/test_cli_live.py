"""``migsgx bench live``: options reach the library, one JSON object comes out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from migsgx import cli
from migsgx.core.rounds import StopRules
from migsgx.lab.bench import live as bench_live
from migsgx.lab.bench import live_figures


def _fake_result(size: int, rate: int) -> dict[str, Any]:
    mode = {"downtime_seconds": 0.1, "bytes_over_size": 1.1, "rounds": 3, "runs": [], "spread": {}}
    return {
        "enclave_bytes": size,
        "dirty_rate_bytes_per_s": rate,
        "stop_and_copy": {**mode, "downtime_seconds": 2.0, "rounds": 0},
        "live": mode,
        "live_over_stop_and_copy_downtime": 0.05,
    }


def test_bench_live_passes_options_and_prints_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_run(size: int, rate: int, repeat: int, **kw: Any) -> dict[str, Any]:
        seen.update(size=size, rate=rate, repeat=repeat, **kw)
        return _fake_result(size, rate)

    monkeypatch.setattr(bench_live, "run", fake_run)
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "live", "--enclave-size", "1GiB", "--dirty-rate", "50MiB",
                  "--repeat", "4", "--max-rounds", "7", "--settle", "0.5", "--pid", "--ab-settle",
                  "--json"])  # fmt: skip
    assert exited.value.code == cli.EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["stop_and_copy"]["downtime_seconds"] == 2.0
    assert (seen["size"], seen["rate"], seen["repeat"]) == (1 << 30, 50 << 20, 4)
    assert seen["rules"] == StopRules(max_rounds=7, settle=0.5)
    assert seen["pid"] is True and seen["ab_settle"] is True


def test_bench_live_runs_several_sizes_in_one_object(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []

    def fake_run_sizes(asked: list[int], rate: int, repeat: int, **kw: Any) -> list[Any]:
        sizes.extend(asked)
        results = []
        for size in asked:
            result = _fake_result(size, rate)
            small = size < 1 << 30
            runs = [{"downtime_seconds": d} for d in ((0.1, 0.2) if small else (0.12, 0.3))]
            result["live"] = {**result["live"], "downtime_seconds": 0.1 if small else 0.12,
                              "runs": runs}  # fmt: skip
            results.append(result)
        return results

    monkeypatch.setattr(bench_live, "run_sizes", fake_run_sizes)
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "live", "--enclave-size", "256MiB,4GiB", "--json"])
    assert exited.value.code == cli.EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert sizes == [256 << 20, 4 << 30]
    assert [r["enclave_bytes"] for r in out["sizes"]] == sizes
    assert out["live_downtime_largest_over_smallest"] == pytest.approx(1.2)
    # Run by run (each pair back to back): 1.2 and 1.5.
    paired = out["live_downtime_largest_over_smallest_paired"]
    assert paired["median"] == pytest.approx(1.35)
    assert (paired["min"], paired["max"]) == (pytest.approx(1.2), pytest.approx(1.5))


def test_bench_live_refuses_bad_rules(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "live", "--max-rounds", "0", "--json"])
    assert exited.value.code != cli.EXIT_OK
    assert "max_rounds" in capsys.readouterr().err


def test_migrate_live_progress_line_gives_the_estimate_with_the_digest_check() -> None:
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from migsgx.cli_migrate import _live_options

    out = io.StringIO()
    opts = SimpleNamespace()
    _live_options(opts, Console(file=out, width=300), 0.05, 30)
    tagged = {"tagged_bytes": 1 << 30, "tag_seconds": 0.5}  # the digest at 2 GiB/s
    rounds = [
        {"round": 0, "pages": 25_600, "bytes": 100 << 20, "seconds": 1.0, **tagged},
        {"round": 1, "pages": 256, "bytes": 1 << 20, "seconds": 0.02},
    ]
    estimate = StopRules.estimate(rounds)
    assert estimate > 256 * 4096 / (100 << 20)  # more than the pages alone
    opts.round_report(0, {**rounds[1], "bandwidth_bytes_per_second": 100 << 20,
                          "estimated_downtime_seconds": estimate})  # fmt: skip
    assert f"estimated downtime {estimate:.3f} s" in out.getvalue()


def test_settle_ab_pairs_each_run_with_the_one_right_after() -> None:
    settled = [
        {"downtime_seconds": 0.02, "final_pages": 100, "rounds": 5, "bytes_sent": 10},
        {"downtime_seconds": 0.04, "final_pages": 200, "rounds": 4, "bytes_sent": 10},
    ]
    unsettled = [
        {"downtime_seconds": 0.03, "final_pages": 300, "rounds": 2, "bytes_sent": 8},
        {"downtime_seconds": 0.04, "final_pages": None, "rounds": 2, "bytes_sent": 8},
    ]
    ab = live_figures.paired(settled, unsettled)
    assert ab["downtime_seconds_unsettled_over_settled"] == {"median": 1.25, "min": 1.0, "max": 1.5}
    # The pair without a count is left out.
    assert ab["final_pages_unsettled_over_settled"]["median"] == 3.0
    assert ab["rounds_unsettled_over_settled"]["max"] == 0.5
