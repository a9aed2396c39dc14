"""The live-migration commands: ``bench live`` (and the live options of ``migrate``).

Registered into :mod:`migsgx.cli`; kept apart so that the live-migration work
touches the main command table in one place only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError
from .migration.live import FALLBACK

__all__ = ["bench_live", "register"]


def _size(value: str) -> int:
    from .sgx.image import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


@click.command("live")
@click.option("--enclave-size", default="256MiB", show_default=True, help="enclave memory")
@click.option(
    "--dirty-rate", default="50MiB", show_default=True, help="bytes of pages written per second"
)
@click.option("--repeat", type=int, default=3, show_default=True, help="runs of each mode")
@click.option("--downtime-target", type=float, default=0.05, show_default=True,
              help="stop rule 'converged': seconds the last dirty set may take")  # fmt: skip
@click.option("--max-rounds", type=int, default=30, show_default=True)
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="draw the round-by-round picture into this PNG file")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print only the JSON object")
def bench_live(
    enclave_size: str,
    dirty_rate: str,
    repeat: int,
    downtime_target: float,
    max_rounds: int,
    plot: Path | None,
    as_json: bool,
) -> None:
    """Downtime of live (pre-copy) against stop-and-copy migration, same workload."""

    from .bench.live import run
    from .migration.rounds import StopRules

    try:
        rules = StopRules(downtime_target=downtime_target, max_rounds=max_rounds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    progress = None if as_json else (lambda line: click.echo(line, err=True))
    result = run(_size(enclave_size), _size(dirty_rate), repeat, rules=rules, progress=progress)
    if plot is not None:
        from .bench.live_plot import draw

        draw(result, plot)
    if not as_json:
        sc, lv = result["stop_and_copy"], result["live"]
        click.echo(
            f"downtime: stop-and-copy {sc['downtime_seconds']:.3f} s, "
            f"live {lv['downtime_seconds']:.3f} s "
            f"({result['live_over_stop_and_copy_downtime']:.3f}x), "
            f"live rounds {lv.get('rounds', 0)}, bytes/size {lv['bytes_over_size']:.2f}",
            err=True,
        )
    click.echo(json.dumps(result, indent=None if as_json else 1, default=_plain))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else str(value)


def live_options(opts: Any, console: Any, downtime_target: float, max_rounds: int) -> None:
    """``migrate --live``: stop rules, and a line on stderr per pre-copy round."""

    from .migration.rounds import StopRules

    try:
        opts.stop_rules = StopRules(downtime_target=downtime_target, max_rounds=max_rounds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    opts.live = True

    def report(index: int, r: dict[str, Any]) -> None:
        if "fallback" in r:
            console.print(
                f"enclave {index}: live migration is not possible here ({r['reason']}); "
                f"falling back to {FALLBACK}",
                highlight=False,
            )
            return
        estimate = r["pages"] * 4096 / max(r["bandwidth_bytes_per_second"], 1)
        console.print(
            f"enclave {index} round {r['round']}: {r['pages']} pages "
            f"({r['bytes'] / (1 << 20):.1f} MiB in {r['seconds']:.3f} s), "
            f"dirty {r.get('dirty_rate_bytes_per_second', 0) / (1 << 20):.1f} MiB/s, "
            f"estimated downtime {estimate:.3f} s",
            highlight=False,
        )

    opts.round_report = report


def register(cli: click.Group) -> None:
    bench = cli.commands.get("bench")
    if isinstance(bench, click.Group):
        bench.add_command(bench_live)
