"""Commands that run the lab's testbeds: the demo and the migration benchmarks.

:func:`register` adds them to the ``migsgx`` group (``demo`` with its
``--container`` variant; ``bench process``, ``bench container`` and ``bench live``).
These are the only commands besides ``migsgx.cli``'s that import the lab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from .cli_options import parse_size
from .cli_output import emit as _emit
from .errors import ConfigError

__all__ = ["bench_container", "bench_live", "bench_process", "demo_command", "register"]

_Command = TypeVar("_Command", bound=Callable[..., Any])


#: The options the migration benches share: paired runs, their plot, JSON, the testbed kept.
_BENCH_RUNS = (
    click.option("--repeat", type=int, default=3, show_default=True,
                 help="paired runs; top-level figures are their medians"),
    click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
                 help="draw the median runs' timelines into this PNG"),
    click.option("--json", "as_json", is_flag=True, help="print the figures as JSON"),
    click.option("--keep", type=click.Path(path_type=Path), default=None,
                 help="keep the testbed (logs, images) in this directory"),
)  # fmt: skip


def _bench_runs(command: _Command) -> _Command:
    """:data:`_BENCH_RUNS`, in that order, where the decorator stands."""

    for option in reversed(_BENCH_RUNS):
        command = option(command)
    return command


def _echo_medians(result: dict[str, Any], names: Iterable[str], width: int, repeat: int) -> None:
    """A line per kind of run of a paired bench: its medians (and post-copy window, if any)."""

    for name in names:
        r = result[name]
        window = r.get("post_copy_window_seconds")
        click.echo(
            f"{name:{width}}: total {r['total_seconds']:.3f} s, "
            f"downtime {r['downtime_seconds']:.3f} s, {r['bytes'] / (1 << 20):.0f} MiB"
            + (f", window {window:.3f} s" if window is not None else "")
            + f" (medians of {repeat})"
        )


# --- bench process --------------------------------------------------------------------------------
@click.command("process")
@click.option("--enclave-size", default="256MiB", show_default=True,
              help="enclave memory (and as much ordinary memory)")  # fmt: skip
@_bench_runs
@click.option("--ab-late-handshake", is_flag=True,
              help="A/B: each run also with the handshake inside the freeze")  # fmt: skip
@click.option("--post-copy", is_flag=True,
              help="also migrate with --post-copy and with --live (pre-copy, "
              "then post-copy): their downtime and window")  # fmt: skip
@click.option("--ab-page-tls", is_flag=True,
              help="A/B: each run also CRIU alone, and migsgx, with the pages in "
              "CRIU's TLS (migsgx's old page path)")  # fmt: skip
@click.option("--ab-criu-nice", type=click.IntRange(-19, 19), default=0,
              help="A/B: each run also migsgx with --criu-nice N")  # fmt: skip
@click.option("--ab-prefault", is_flag=True,
              help="A/B: each run also migsgx with --prefault-ahead")  # fmt: skip
@click.option("--ab-overlap", is_flag=True,
              help="A/B: each run also migsgx with --no-overlap-restore (the restore "
              "after every enclave LOADED)")  # fmt: skip
@click.option("--ab-images-ram", is_flag=True,
              help="A/B: each run also migsgx (agent serve --images-in-ram) and CRIU "
              "alone with the destination's images in RAM (/dev/shm)")  # fmt: skip
@click.option("--ab-spend-images", is_flag=True,
              help="A/B: each run also migsgx with the destination's images left whole "
              "through the restore (agent serve --no-spend-images)")  # fmt: skip
@click.option("--ab-chunk-size", default=None,
              help="A/B: each run also migsgx with --chunk-size SIZE")  # fmt: skip
@click.option("--ab-criu-weight", type=click.IntRange(0, 10000), default=0,
              help="A/B: each run also migsgx with --criu-weight W (CRIU's dump in a "
              "cgroup of that CPU weight)")  # fmt: skip
@click.option("--ab-huge-pages", is_flag=True,
              help="A/B: each run also migsgx with the destination enclave's memory in "
              "2 MiB pages (agent serve --enclave-huge-pages)")  # fmt: skip
def bench_process(
    enclave_size: str,
    repeat: int,
    plot_path: Path | None,
    as_json: bool,
    keep: Path | None,
    ab_late_handshake: bool,
    post_copy: bool,
    ab_page_tls: bool,
    ab_criu_nice: int,
    ab_prefault: bool,
    ab_overlap: bool,
    ab_images_ram: bool,
    ab_spend_images: bool,
    ab_chunk_size: str | None,
    ab_criu_weight: int,
    ab_huge_pages: bool,
) -> None:
    """Process migration with enclaves against CRIU alone (needs root)."""

    from .lab.bench.process import plot, run

    result = run(
        parse_size(enclave_size),
        keep=keep,
        repeat=repeat,
        ab_late_handshake=ab_late_handshake,
        post_copy=post_copy,
        ab_page_tls=ab_page_tls,
        ab_criu_nice=ab_criu_nice,
        ab_prefault=ab_prefault,
        ab_overlap=ab_overlap,
        ab_images_ram=ab_images_ram,
        ab_spend_images=ab_spend_images,
        ab_chunk_size=parse_size(ab_chunk_size) if ab_chunk_size else 0,
        ab_criu_weight=ab_criu_weight,
        ab_huge_pages=ab_huge_pages,
    )
    if plot_path is not None:
        plot(result, plot_path)
    if as_json:
        _emit(result)
        return
    lazy = ["migsgx_post_copy", "migsgx_live"] if post_copy else []
    tls = ["criu_only_tls", "migsgx_criu_tls"] if ab_page_tls else []
    _echo_medians(result, ("migsgx", "criu_only", *tls, *lazy), 15, repeat)


# --- bench container ---------------------------------------------------------------------------
@click.command("container")
@click.option("--engine", type=click.Choice(["runc", "podman", "containerd"]), default="runc",
              show_default=True)  # fmt: skip
@click.option("--enclave-size", default="256MiB", show_default=True, help="enclave memory")
@_bench_runs
@click.option("--live", is_flag=True,
              help="runc: also migrate with --live, its memory frozen (--no-post-copy) "
              "and by post-copy, the app holding SIZE of ordinary memory too")  # fmt: skip
@click.option("--ab-prefault", is_flag=True,
              help="A/B: each run also migsgx with --prefault-ahead")  # fmt: skip
@click.option("--ab-no-prefault", is_flag=True,
              help="A/B: each run also migsgx with --no-prefault-ahead")  # fmt: skip
@click.option("--ab-images-ram", is_flag=True,
              help="A/B: each run also migsgx with the destination's images in RAM "
              "(agent serve --images-in-ram)")  # fmt: skip
@click.option("--ab-whole-images", is_flag=True,
              help="A/B: each run also migsgx with the destination keeping every copy "
              "of the images through the restore (agent serve --no-spend-images)")  # fmt: skip
@click.option("--ab-whole-images-ram", is_flag=True,
              help="A/B: each run also migsgx with the destination's images in RAM, every "
              "copy kept (with --ab-images-ram: the pair in RAM)")  # fmt: skip
def bench_container(
    engine: str,
    enclave_size: str,
    repeat: int,
    plot_path: Path | None,
    as_json: bool,
    keep: Path | None,
    live: bool,
    ab_prefault: bool,
    ab_no_prefault: bool,
    ab_images_ram: bool,
    ab_whole_images: bool,
    ab_whole_images_ram: bool,
) -> None:
    """Container migration with enclaves against the engine's own checkpoint/restore."""

    from .lab.bench.container import LIVE_KINDS, plot, run

    arms = {"prefault": ab_prefault, "no_prefault": ab_no_prefault, "images_ram": ab_images_ram,
            "whole_images": ab_whole_images, "whole_images_ram": ab_whole_images_ram}  # fmt: skip
    ab = tuple(name for name, on in arms.items() if on)
    result = run(engine, parse_size(enclave_size), keep=keep, repeat=repeat, live=live, ab=ab)
    if plot_path is not None:
        plot(result, plot_path)
    if as_json:
        _emit(result)
        return
    _echo_medians(result, ("migsgx", "engine_only", *(LIVE_KINDS if live else ())), 11, repeat)


# --- demo with a container -----------------------------------------------------------------------
@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="where the demo keeps its hosts (default: a temporary directory)")  # fmt: skip
@click.option("--container", type=click.Choice(["runc", "podman", "containerd"]), default=None,
              help="run the app in a container of this engine (sharing its host's network) "
                   "and migrate that")  # fmt: skip
@click.option("--process", is_flag=True, help="migrate the app as a plain process")
def demo_command(workdir: Path | None, container: str | None, process: bool) -> None:
    """Two emulated hosts; the key-value enclave app moves between them while in use.

    By default the app runs in a runc container that owns its address, and the
    client's TCP connection stays open across the move.
    """

    from .lab.demo import run_demo

    run_demo(workdir, container=container, process=process)


# --- bench live --------------------------------------------------------------------------------
@click.command("live")
@click.option("--enclave-size", default="256MiB", show_default=True,
              help="enclave memory; several, comma-separated, run one after another")  # fmt: skip
@click.option(
    "--dirty-rate", default="50MiB", show_default=True, help="bytes of pages written per second"
)
@click.option("--repeat", type=int, default=3, show_default=True, help="runs of each mode")
@click.option("--downtime-target", type=float, default=0.05, show_default=True,
              help="stop rule 'converged': seconds the last dirty set may take")  # fmt: skip
@click.option("--max-rounds", type=int, default=30, show_default=True)
@click.option("--settle", type=float, default=0.6, show_default=True,
              help="stop rule 'converged' also waits for a round that took at least this "
              "share of the one before (0: the first round under the target stops)")  # fmt: skip
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="draw the round-by-round picture into this PNG file")  # fmt: skip
@click.option("--pid", is_flag=True,
              help="also move the workload as a process with 'migrate --live' (enclave "
              "pre-copy, then post-copy of the process; root, CRIU): downtime and the "
              "window in which the destination depends on the source")  # fmt: skip
@click.option("--ab-settle", is_flag=True,
              help="A/B: each live run also with --settle 0, right after (paired)")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print only the JSON object")
def bench_live(
    enclave_size: str,
    dirty_rate: str,
    repeat: int,
    downtime_target: float,
    max_rounds: int,
    settle: float,
    plot: Path | None,
    pid: bool,
    ab_settle: bool,
    as_json: bool,
) -> None:
    """Downtime of live (pre-copy) against stop-and-copy migration, same workload."""

    from .core.stoprules import StopRules
    from .lab.bench.live import run, run_sizes
    from .lab.bench.live_figures import size_ratio

    try:
        rules = StopRules(downtime_target=downtime_target, max_rounds=max_rounds, settle=settle)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    sizes = [parse_size(part) for part in enclave_size.split(",")]
    if plot is not None and len(sizes) > 1:
        raise ConfigError("--plot draws one enclave size")
    progress = None if as_json else (lambda line: click.echo(line, err=True))
    if len(sizes) == 1:
        results = [run(sizes[0], parse_size(dirty_rate), repeat, rules=rules, progress=progress,
                       pid=pid, ab_settle=ab_settle)]  # fmt: skip
    else:
        # Several sizes: interleaved in one set of hosts, so their ratio is paired.
        results = run_sizes(sizes, parse_size(dirty_rate), repeat, rules=rules,
                            progress=progress, pid=pid, ab_settle=ab_settle)  # fmt: skip
    for result in results:
        if plot is not None:
            from .lab.bench.live_plot import draw

            draw(result, plot)
        if not as_json:
            sc, lv = result["stop_and_copy"], result["live"]
            click.echo(
                f"{result['enclave_bytes'] >> 20} MiB downtime: stop-and-copy "
                f"{sc['downtime_seconds']:.3f} s, live {lv['downtime_seconds']:.3f} s "
                f"({result['live_over_stop_and_copy_downtime']:.3f}x), "
                f"live rounds {lv.get('rounds', 0)}, bytes/size {lv['bytes_over_size']:.2f}",
                err=True,
            )
    if len(results) == 1:
        _emit(results[0])
        return
    # How the live downtime grows from the smallest size to the largest: the
    # medians' ratio, and the median of the ratios of runs made back to back.
    small = min(results, key=lambda r: r["enclave_bytes"])
    large = max(results, key=lambda r: r["enclave_bytes"])
    base = small["live"]["downtime_seconds"]
    _emit(
        {
            "sizes": results,
            "live_downtime_largest_over_smallest": (
                large["live"]["downtime_seconds"] / base if base else None
            ),
            "live_downtime_largest_over_smallest_paired": size_ratio(results),
        }
    )


def register(cli: click.Group) -> None:
    """Add the demo and the migration benchmarks to the ``migsgx`` group."""

    cli.add_command(demo_command)  # the demo, with its container variant
    bench = cli.commands.get("bench")
    if not isinstance(bench, click.Group):
        bench = click.Group("bench", help="Benchmarks that print numbers.")
        cli.add_command(bench)
    bench.add_command(bench_process)
    bench.add_command(bench_container)
    bench.add_command(bench_live)
