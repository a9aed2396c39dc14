"""``migsgx bench process``: a process with an enclave moves; CRIU alone for comparison.

One invocation builds two namespaced hosts (:class:`~migsgx.lab.testbed.Testbed`)
and, in the same run:

* ``migsgx``: the example ``model`` application holding SIZE of enclave memory
  (secret weights its enclave generates) and SIZE of ordinary memory migrates
  with ``migsgx migrate`` (enclave pipeline, then CRIU with the page server);
  the digests of both memories are checked on the destination;
* ``criu_only``: a plain process holding 2 x SIZE of ordinary memory migrates
  with CRIU alone: ``criu page-server`` on the destination, dump, copy of the
  other images, restore (:mod:`.criu_alone`); its images where the agent
  receives migsgx's, the testbed's directory (``--ab-images-ram``: both in
  ``/dev/shm`` too);
* ``migsgx_post_copy`` and ``migsgx_live`` (with ``--post-copy``): the
  ``migsgx`` workload again with ``migsgx migrate --post-copy``, and with
  ``--live`` (enclave pre-copy, then post-copy of the process); besides the
  downtime each reports ``post_copy_window_seconds``, from the destination
  tree's start to its last page (the time in which a lost source loses the
  application).

Both move about the same number of bytes.  Requires root (namespaces, CRIU).
The command itself is ``migsgx bench process`` (:mod:`migsgx.cli_lab`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ...errors import ConfigError, MigSGXError
from ...system.process import kill_tree
from ..testbed import START_TIMEOUT, AppProcess, Testbed
from .criu_alone import criu_only
from .figures import children_cpu, cpu_seconds, loadavg, machine_state, summarize
from .memwatch import MemoryWatch
from .migrate_figures import MODEL_COLS, enclave_cpu, migration_figures
from .settle import settle

__all__ = [
    "MODEL_COLS",
    "criu_only",
    "enclave_cpu",
    "migration_figures",
    "run",
]  # (from the modules below)


def model_rows(size: int) -> int:
    """The rows of float32 weights, :data:`MODEL_COLS` wide, that fill SIZE bytes."""

    return max(1, size // (MODEL_COLS * 4))


def start_model(
    bed: Testbed, size: int, ordinary_mib: int, *args: str, timeout: float = START_TIMEOUT
) -> AppProcess:
    """The example ``model`` app on host ``src``: SIZE of enclave weights, ``ordinary_mib``
    MiB of ordinary memory, then ``args``; ready once both are filled."""

    return bed.start_app(
        "model",
        ["--image", str(bed.image("model")), "--rows", str(model_rows(size)),
         "--cols", str(MODEL_COLS), "--ordinary-mib", str(ordinary_mib), *args],
        timeout=timeout,
    )  # fmt: skip


def _migsgx(
    bed: Testbed, size: int, args: tuple[str, ...] = (), agent_args: tuple[str, ...] = ()
) -> dict[str, Any]:
    rows = model_rows(size)
    agent = bed.start_agent(args=agent_args)
    try:
        app = start_model(bed, size, max(1, size >> 20), timeout=app_start_timeout(size))
        before = bed.ask("DIGEST", app.port, at="src", via="dst")
        agent_cpu = cpu_seconds(agent.proc.pid, children=True)
        agent_own = cpu_seconds(agent.proc.pid)
        tool_cpu = children_cpu()
        settled = settle(bed.root)  # (outside the timed part)
        with MemoryWatch() as watch:
            run = bed.migrate(app.pid, agent, args=args)  # pages protected (CRIU alone: plain)
        tool_cpu = children_cpu() - tool_cpu
        agent_cpu = cpu_seconds(agent.proc.pid, children=True) - agent_cpu
        agent_own = cpu_seconds(agent.proc.pid) - agent_own
        if run.returncode != 0 or run.stats is None:
            raise MigSGXError(f"migsgx migrate failed ({run.returncode}): {run.stderr[-2000:]}")
        after = bed.ask("DIGEST", app.port, at="dst", via="src")
        if after != before:
            raise MigSGXError(f"state differs after the migration: {before!r} != {after!r}")
        stats = run.stats
        restored = int(stats["details"]["restored_pid"])
        kill_tree(restored)
    finally:
        agent.stop()
    figures = migration_figures(stats, rows, run.seconds)
    if stats.get("post_copy_window") is not None:
        figures["post_copy_window_seconds"] = float(stats["post_copy_window"])
    # What the page cache held around each of the tool's phases (absolute spans).
    figures["memory_watch"] = watch.figures(
        (stats.get("timeline") or {}).get("spans", {}).get("tool")
    )
    figures["images_fs"] = str(stats["details"].get("destination_images_fs", ""))
    figures["settle"] = settled
    cpu = {"tool": tool_cpu, "agent": agent_cpu, **enclave_cpu(stats)}  # tool, agent: with CRIU
    details = stats["details"]
    # The same split into each process's own threads and CRIU (its children):
    # the tool's own are the source ends of the enclave streams, the agent's the
    # destination ends; CRIU's dump with its page stream, the page server and restore.
    split = {
        "tool_own": float(details.get("tool_cpu_seconds", 0.0)),
        "criu_dump": float(details.get("tool_children_cpu_seconds", 0.0)),
        "agent_own": agent_own,
        "agent_criu": agent_cpu - agent_own,
    }
    page_path = str(details.get("page_path", "criu-tls"))
    return {
        **figures,
        "page_tls": page_path == "criu-tls",
        "page_path": page_path,  # "relay": sealed frames, the agents' relay
        "prefault_ahead": bool(details.get("prefault_ahead")),
        "cpu_by_process": cpu,
        "cpu_split": split,
    }


def app_start_timeout(size: int) -> float:
    """How long the app may take to fill SIZE of enclave and SIZE of ordinary memory.

    Its enclave generates the weights at a few hundred MB/s on a busy machine:
    a minute, and a minute more for every GiB.
    """

    return 60.0 + 60.0 * size / (1 << 30)


def one_run(
    bed: Testbed,
    size: int,
    ab_late_handshake: bool = False,
    post_copy: bool = False,
    ab_page_tls: bool = False,
    ab_criu_nice: int = 0,
    flip: bool = False,
    ab_prefault: bool = False,
    ab_images_ram: bool = False,
    ab_overlap: bool = False,
    ab_spend_images: bool = False,
    ab_chunk_size: int = 0,
    ab_criu_weight: int = 0,
    ab_huge_pages: bool = False,
) -> dict[str, Any]:
    """migsgx and CRIU alone back to back (CRIU alone first with ``flip``), paired.

    With ``ab_late_handshake``, also migsgx with its destination enclaves
    launched and attested inside the freeze (``--late-handshake``, as before the
    early handshake), right after: ``migsgx_late_handshake`` and the paired
    ratios ``early_handshake_total_speedup`` and ``early_handshake_downtime_speedup``
    (late / early).  With ``post_copy``, also ``--post-copy`` and ``--live``.
    With ``ab_page_tls``, also CRIU alone with its pages in CRIU's TLS
    (``criu_only_tls``) and migsgx with its pages in CRIU's TLS instead of the
    sealed relay (``migsgx_criu_tls``, ``--page-criu-tls``: the old path), with
    the paired ratios ``criu_tls_over_migsgx_total``, ``page_tls_cost`` (CRIU
    alone with TLS / without), ``criu_over_migsgx_criu_tls_total`` (CRIU alone /
    migsgx on the old path) and ``page_relay_speedup`` (old path / relay).  With
    ``ab_criu_nice`` N (not 0), also migsgx with CRIU's dump N nicer than the
    enclave streams (``--criu-nice N``), beside it: ``migsgx_criu_nice`` and
    the paired ``criu_nice_total_speedup`` and ``criu_nice_downtime_speedup``
    (default / niced: above 1, the niceness helped); with ``flip``, the niced
    one first.  With ``ab_prefault``, also migsgx with the destination's
    prefault ahead (``--prefault-ahead``; off by default), first with ``flip``:
    ``migsgx_with_prefault``, the paired ``prefault_total_speedup`` and
    ``prefault_downtime_speedup`` (without / with: above 1, the prefault helped)
    and ``prefault_cpu_ratio`` (CPU of the whole migration, without / with).
    With ``ab_images_ram``, also migsgx with the destination's images in RAM
    (``agent serve --images-in-ram``: ``/dev/shm``) and CRIU alone with its
    images there too, that pair right after the default one (before it with
    ``flip``): ``migsgx_images_ram``, ``criu_only_images_ram`` and the paired
    ``images_ram_total_speedup``, ``images_ram_downtime_speedup`` (work
    directory / RAM: above 1, RAM helped), ``criu_images_ram_speedup`` (CRIU
    alone, the same) and ``criu_over_migsgx_total_ram`` (the ratio, both in RAM).
    With ``ab_overlap``, also migsgx with the restore after every enclave LOADED
    (``--no-overlap-restore``), first with ``flip``: ``migsgx_no_overlap``, the
    paired ``overlap_total_speedup``, ``overlap_downtime_speedup`` and
    ``overlap_after_dump_speedup`` (``after_dump_seconds``: the end of CRIU's dump
    to the destination running; all without / with: above 1, the overlap helped)
    and ``criu_over_migsgx_no_overlap_total``.  With ``ab_spend_images``, also
    migsgx with the destination's images left whole through the restore (``agent
    serve --no-spend-images``), first with ``flip``: ``migsgx_whole_images`` and the
    paired ``spend_images_total_speedup``, ``spend_images_downtime_speedup`` and
    ``spend_images_restore_speedup`` (whole / spent: above 1, spending helped).
    With ``ab_chunk_size`` N (not 0), also migsgx with ``--chunk-size N``, first
    with ``flip``: ``migsgx_chunk``, ``chunk_total_speedup`` and
    ``chunk_downtime_speedup`` (default / N: above 1, the chunk of N was faster).
    With ``ab_criu_weight`` W (not 0), also migsgx with CRIU's dump in a cgroup of
    CPU weight W (``--criu-weight W``), first with ``flip``: ``migsgx_criu_weight``,
    ``criu_weight_total_speedup``, ``criu_weight_downtime_speedup``,
    ``criu_weight_stream_speedup`` and ``criu_weight_dump_speedup`` (CRIU's dump;
    all default / weighted: above 1, the weighted arm was faster).  With
    ``ab_huge_pages``, also migsgx with the destination enclave's memory in 2 MiB
    pages (``agent serve --enclave-huge-pages``), first with ``flip``:
    ``migsgx_huge_pages``, ``huge_pages_total_speedup``,
    ``huge_pages_downtime_speedup`` and ``huge_pages_enclave_cpu_ratio`` (the
    destination enclaves' CPU over their load; all 4 KiB / 2 MiB: above 1, huge
    pages helped).
    """

    # Every other run, CRIU alone and the arms below go before the default: a drifting
    # load, or memory the run before just gave back, then favours no arm always.
    plain_first = criu_only(bed, 2 * size) if flip else None
    niced_args = ("--criu-nice", str(ab_criu_nice))
    niced_first = _migsgx(bed, size, niced_args) if ab_criu_nice and flip else None
    faulted_args = ("--prefault-ahead",)
    faulted_first = _migsgx(bed, size, faulted_args) if ab_prefault and flip else None
    ram_first = _in_ram(bed, size) if ab_images_ram and flip else None
    serial_args = ("--no-overlap-restore",)
    serial_first = _migsgx(bed, size, serial_args) if ab_overlap and flip else None
    whole_args = ("--no-spend-images",)
    whole_first = _migsgx(bed, size, agent_args=whole_args) if ab_spend_images and flip else None
    chunk_args = ("--chunk-size", str(ab_chunk_size))
    chunk_first = _migsgx(bed, size, chunk_args) if ab_chunk_size and flip else None
    weight_args = ("--criu-weight", str(ab_criu_weight))
    weight_first = _migsgx(bed, size, weight_args) if ab_criu_weight and flip else None
    huge_args = ("--enclave-huge-pages",)  # (--ab-huge-pages: 2 MiB pages)
    huge_first = _migsgx(bed, size, agent_args=huge_args) if ab_huge_pages and flip else None
    migsgx = _migsgx(bed, size)
    serial = (serial_first or _migsgx(bed, size, serial_args)) if ab_overlap else None
    extra: dict[str, Any] = {}
    if ab_late_handshake:
        late = _migsgx(bed, size, ("--late-handshake",))
        extra = {
            "migsgx_late_handshake": late,
            "early_handshake_total_speedup": late["total_seconds"] / migsgx["total_seconds"],
            "early_handshake_downtime_speedup": (
                late["downtime_seconds"] / migsgx["downtime_seconds"]
            ),
        }
    if ab_criu_nice:
        niced = niced_first or _migsgx(bed, size, niced_args)
        extra.update(
            migsgx_criu_nice=niced,
            criu_nice=ab_criu_nice,
            criu_nice_ran_first=niced_first is not None,
            criu_nice_total_speedup=migsgx["total_seconds"] / niced["total_seconds"],
            criu_nice_downtime_speedup=migsgx["downtime_seconds"] / niced["downtime_seconds"],
        )
    if ab_prefault:
        faulted = faulted_first or _migsgx(bed, size, faulted_args)
        extra.update(
            migsgx_with_prefault=faulted,
            prefault_ran_first=faulted_first is not None,
            prefault_total_speedup=migsgx["total_seconds"] / faulted["total_seconds"],
            prefault_downtime_speedup=migsgx["downtime_seconds"] / faulted["downtime_seconds"],
            prefault_cpu_ratio=(
                sum(migsgx["cpu_by_process"].values()) / sum(faulted["cpu_by_process"].values())
            ),
        )
    if ab_spend_images:
        whole = whole_first or _migsgx(bed, size, agent_args=whole_args)
        extra.update(
            migsgx_whole_images=whole,
            whole_images_ran_first=whole_first is not None,
            **_speedups("spend_images", whole, migsgx, restore=True),
        )
    if ab_chunk_size:
        chunk = chunk_first or _migsgx(bed, size, chunk_args)
        extra.update(
            migsgx_chunk=chunk,
            chunk_size=ab_chunk_size,
            chunk_ran_first=chunk_first is not None,
            **_speedups("chunk", migsgx, chunk),
        )
    if ab_criu_weight:
        weighted = weight_first or _migsgx(bed, size, weight_args)
        extra.update(
            migsgx_criu_weight=weighted,
            criu_weight=ab_criu_weight,
            criu_weight_ran_first=weight_first is not None,
            **_speedups("criu_weight", migsgx, weighted),
            criu_weight_stream_speedup=migsgx["enclave_stream_seconds"]
            / max(weighted["enclave_stream_seconds"], 1e-9),
            criu_weight_dump_speedup=migsgx["phases"]["criu_dump"]
            / max(weighted["phases"]["criu_dump"], 1e-9),
        )
    if ab_huge_pages:
        huge = huge_first or _migsgx(bed, size, agent_args=huge_args)
        extra.update(
            migsgx_huge_pages=huge,
            huge_pages_ran_first=huge_first is not None,
            **_speedups("huge_pages", migsgx, huge),
            huge_pages_enclave_cpu_ratio=_destination_cpu(migsgx)
            / max(_destination_cpu(huge), 1e-9),
        )
    plain = plain_first or criu_only(bed, 2 * size)
    if serial is not None:
        extra.update(
            migsgx_no_overlap=serial,
            no_overlap_ran_first=serial_first is not None,
            overlap_total_speedup=serial["total_seconds"] / migsgx["total_seconds"],
            overlap_downtime_speedup=serial["downtime_seconds"] / migsgx["downtime_seconds"],
            overlap_after_dump_speedup=(
                serial["after_dump_seconds"] / max(migsgx["after_dump_seconds"], 1e-9)
            ),
            criu_over_migsgx_no_overlap_total=plain["total_seconds"] / serial["total_seconds"],
        )
    if ab_images_ram:
        in_ram, plain_ram = ram_first or _in_ram(bed, size)
        extra.update(
            migsgx_images_ram=in_ram,
            criu_only_images_ram=plain_ram,
            images_ram_ran_first=ram_first is not None,
            images_ram_total_speedup=migsgx["total_seconds"] / in_ram["total_seconds"],
            images_ram_downtime_speedup=migsgx["downtime_seconds"] / in_ram["downtime_seconds"],
            criu_images_ram_speedup=plain["total_seconds"] / plain_ram["total_seconds"],
            criu_over_migsgx_total_ram=plain_ram["total_seconds"] / in_ram["total_seconds"],
        )
    if ab_page_tls:
        tls = criu_only(bed, 2 * size, page_tls=True)
        extra.update(
            criu_only_tls=tls,
            criu_tls_over_migsgx_total=tls["total_seconds"] / migsgx["total_seconds"],
            page_tls_cost=tls["total_seconds"] / plain["total_seconds"],
        )
        old = _migsgx(bed, size, ("--page-criu-tls",))
        extra.update(
            migsgx_criu_tls=old,
            criu_over_migsgx_criu_tls_total=plain["total_seconds"] / old["total_seconds"],
            page_relay_speedup=old["total_seconds"] / migsgx["total_seconds"],
            page_relay_downtime_speedup=old["downtime_seconds"] / migsgx["downtime_seconds"],
        )
    if post_copy:
        lazy = _migsgx(bed, size, ("--post-copy",))
        live = _migsgx(bed, size, ("--live",))
        extra.update(
            migsgx_post_copy=lazy,
            migsgx_live=live,
            post_copy_over_migsgx_downtime=lazy["downtime_seconds"] / migsgx["downtime_seconds"],
            live_over_migsgx_downtime=live["downtime_seconds"] / migsgx["downtime_seconds"],
        )
    return {
        **extra,
        "migsgx": migsgx,
        "criu_only": plain,
        "criu_only_ran_first": flip,
        # >= 1: migsgx is at least as fast as CRIU alone moving as many bytes.
        "criu_over_migsgx_total": plain["total_seconds"] / migsgx["total_seconds"],
        "downtime_over_criu": migsgx["downtime_seconds"] / plain["total_seconds"],
        "loadavg": loadavg(),
    }


def _speedups(
    name: str, before: dict[str, Any], after: dict[str, Any], *, restore: bool = False
) -> dict[str, float]:
    """``NAME_total_speedup`` and ``NAME_downtime_speedup`` (and the restore's): before / after."""

    out = {
        f"{name}_total_speedup": before["total_seconds"] / after["total_seconds"],
        f"{name}_downtime_speedup": before["downtime_seconds"] / after["downtime_seconds"],
    }
    if restore:
        out[f"{name}_restore_speedup"] = before["phases"]["restore"] / max(
            after["phases"]["restore"], 1e-9
        )
    return out


def _destination_cpu(arm: dict[str, Any]) -> float:
    """CPU seconds of an arm's destination enclaves over their load."""

    cpu = arm["cpu_by_process"]
    return float(sum(v for k, v in cpu.items() if k.endswith("destination_enclave")))


def _in_ram(bed: Testbed, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """migsgx with the destination's images in RAM (``/dev/shm``), then CRIU alone
    with its images there too."""

    in_ram = _migsgx(bed, size, agent_args=("--images-in-ram",))
    return in_ram, criu_only(bed, 2 * size, images_in_ram=True)


def run(
    size: int,
    *,
    subnet: int = 201,
    keep: Path | None = None,
    repeat: int = 3,
    ab_late_handshake: bool = False,
    post_copy: bool = False,
    ab_page_tls: bool = False,
    ab_criu_nice: int = 0,
    ab_prefault: bool = False,
    ab_images_ram: bool = False,
    ab_overlap: bool = False,
    ab_spend_images: bool = False,
    ab_chunk_size: int = 0,
    ab_criu_weight: int = 0,
    ab_huge_pages: bool = False,
) -> dict[str, Any]:
    if size < (1 << 20):
        raise ConfigError("--enclave-size must be at least 1 MiB")
    if repeat < 1:
        raise ConfigError("--repeat must be at least 1")
    before = loadavg()
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="migsgx-bench-process-"))
    runs = []
    try:
        with Testbed(root, subnet=subnet) as bed:
            for i in range(repeat):
                one = one_run(
                    bed, size, ab_late_handshake, post_copy, ab_page_tls, ab_criu_nice,
                    flip=i % 2 == 1, ab_prefault=ab_prefault, ab_images_ram=ab_images_ram,
                    ab_overlap=ab_overlap, ab_spend_images=ab_spend_images,
                    ab_chunk_size=ab_chunk_size, ab_criu_weight=ab_criu_weight,
                    ab_huge_pages=ab_huge_pages,
                )  # fmt: skip
                runs.append(one)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    result = summarize(runs)
    result.update(enclave_size=size, repeat=repeat, machine=machine_state(before))
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Timelines of the median migsgx run and the median CRIU-alone run."""

    from .plot import median_panels, plot_timelines

    labels = [("migsgx", "migsgx migrate"), ("criu_only", "CRIU alone")]
    if "criu_only_tls" in result["runs"][0]:
        labels.append(("criu_only_tls", "CRIU alone, pages in TLS"))
        labels.append(("migsgx_criu_tls", "migsgx migrate, pages in CRIU's TLS"))
    if "migsgx_no_overlap" in result["runs"][0]:
        labels.append(("migsgx_no_overlap", "migsgx migrate --no-overlap-restore"))
    if "migsgx_whole_images" in result["runs"][0]:
        labels.append(("migsgx_whole_images", "migsgx migrate, agent --no-spend-images"))
    if "migsgx_criu_weight" in result["runs"][0]:
        labels.append(
            ("migsgx_criu_weight", f"migsgx migrate --criu-weight {result['criu_weight']}")
        )
    if "migsgx_huge_pages" in result["runs"][0]:
        labels.append(("migsgx_huge_pages", "migsgx migrate, agent --enclave-huge-pages"))
    if "migsgx_chunk" in result["runs"][0]:
        labels.append(("migsgx_chunk", f"migsgx migrate --chunk-size {result['chunk_size']}"))
    plot_timelines(median_panels(result, labels), path)
