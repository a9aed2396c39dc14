"""The commands that move an application: ``migrate``, ``recover``, ``checkpoint``, ``restore``.

:func:`register` adds them to the ``migsgx`` group.  Errors propagate as
:class:`~migsgx.errors.MigSGXError`; ``migsgx.cli.main`` turns them into exit codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .cli_options import parse_address, parse_size
from .cli_output import emit as _emit
from .errors import ConfigError

__all__ = [
    "checkpoint_command",
    "migrate_command",
    "recover_command",
    "register",
    "restore_command",
]


# --- recover ------------------------------------------------------------------------------------
@click.command("recover")
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="this host's state directory (platform store, journals)")  # fmt: skip
@click.option("--ca", "ca_dir", type=click.Path(path_type=Path), default=None)
@click.option("--checkpoint", "checkpoints", type=click.Path(path_type=Path), multiple=True,
              help="also resolve the checkpoint (or restore) in this directory")  # fmt: skip
@click.option("--platform-socket", type=click.Path(path_type=Path), default=None,
              envvar="MIGSGX_PLATFORM_SOCKET",
              help="the platform service that reads checkpoint gates")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print each migration's resolution as JSON")
def recover_command(
    state: Path | None,
    ca_dir: Path | None,
    checkpoints: tuple[Path, ...],
    platform_socket: Path | None,
    as_json: bool,
) -> None:
    """Resolve migrations and checkpoints in doubt from durable records (idempotent).

    Each unfinished migration of this (source) host is brought to exactly one
    runnable copy: a recorded COMMIT is delivered to the destination again and
    the stopped source removed; a recorded ABORT ends the destination's copy
    and the source continues.  Each --checkpoint DIR is resolved from its
    enclaves' gates: committed, the checkpoint is the copy (a fenced source is
    removed; restore it); not, the source continues and the files go.  Exit
    status 7 while any stays in doubt, else 10 if a committed migration has no
    copy left on the destination (``lost``: what remains is reported).  Source
    enclaves found dead before the decision (their state gone, the rest given
    back) are named in ``lost_enclaves`` (the status stays as above).  A source
    enclave that does not answer within 5 s (stopped, or busy) is named in
    doubt with its pid, and nothing is done on its silence: run recover again
    once it answers.  On a host whose agent is down, the held trees it left are
    listed too: a claimed one (W3) is resumed here, the rest stay in doubt until
    the agent starts on the state (``step``); with the agent up, they are its own.
    """

    # (imported here, and the checkpoint half only with --checkpoint: this command's
    # start counts toward the seconds until a source runs again, docs/benchmarks.md)
    from .agent.recover import recover
    from .agent.recover_records import Resolution
    from .agent.tls import AgentIdentity
    from .errors import InDoubtError, LostAfterCommitError

    if state is None and not checkpoints:
        raise click.UsageError("name --state STATE, or --checkpoint DIR")
    results: list[Resolution] = []
    if state is not None:
        from .agent.recover_dest import recover_destination

        identity = AgentIdentity.of_state(state, ca=ca_dir)
        results += recover(state, identity)
        results += recover_destination(state, identity)  # (a dead agent's held trees)
    if checkpoints:
        from .agent.ckpt_recover import resolve_checkpoint
        from .sgx.listener import default_socket

        if platform_socket is None and state is not None:
            platform_socket = default_socket(state)
        results += [resolve_checkpoint(d, platform_socket) for d in checkpoints]
    if as_json:
        _emit([r.to_dict() for r in results])
    else:
        for r in results:
            named = "".join(f"; enclave {e['index']} died before the decision, its state "
                           f"is gone (MRENCLAVE {e['mr_enclave']}, pid {e['pid']})"
                           for e in r.lost_enclaves)  # fmt: skip
            step = getattr(r, "step", "")  # (a destination record's: DestinationResolution)
            step = f"; next: {step}" if step else ""
            click.echo(
                f"{r.mid}  {r.phase:9}  {r.decision:6}  {r.outcome:11}  {r.detail}{named}{step}"
            )
    doubtful = [r.mid for r in results if r.in_doubt]
    if doubtful:
        raise InDoubtError(f"{len(doubtful)} migration(s) remain in doubt: {', '.join(doubtful)}")
    lost = [r.mid for r in results if r.outcome == "lost"]
    if lost:
        raise LostAfterCommitError(
            f"{len(lost)} committed migration(s) or restore(s) have lost their enclave state "
            "(no copy left on the destination, or a restored application that runs or ran "
            "without its enclaves): " + ", ".join(lost)
        )


# --- migrate ------------------------------------------------------------------------------------
@click.command("migrate")
@click.argument("pid", type=int, required=False)
@click.option("--runc", "runc_id", default=None, metavar="CONTAINER_ID",
              help="migrate this runc container instead of a process")  # fmt: skip
@click.option("--podman", "podman_name", default=None, metavar="NAME",
              help="migrate this podman container instead of a process")  # fmt: skip
@click.option("--containerd", "containerd_id", default=None, metavar="CONTAINER_ID",
              help="migrate this containerd container instead of a process")  # fmt: skip
@click.option("--to", "to", required=True, help="the destination agent, ADDRESS:PORT")
@click.option("--state", type=click.Path(path_type=Path), required=True,
              help="this host's state directory (its agent identity)")  # fmt: skip
@click.option("--ca", "ca_dir", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="print per-phase figures as JSON")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None)
@click.option("--keep-images", is_flag=True)
@click.option("--chunk-size", default=None,
              help="enclave stream chunk size (default 1MiB; --live's rounds 128KiB)")  # fmt: skip
@click.option("--mode", type=click.Choice(["pipelined", "sequential"]), default="pipelined")
@click.option("--keep-tcp", is_flag=True, help="fail on established TCP connections")
@click.option("--tcp-established/--no-tcp-established", "tcp_established", default=None,
              help="keep established TCP connections open across the move (default: "
                   "where the workload owns an address that moves with it)")  # fmt: skip
@click.option("--shell-job", is_flag=True, help="the tree has a controlling terminal")
@click.option("--live", is_flag=True,
              help="pre-copy enclave memory while the application runs; with a "
              "process (PID) or a runc container, post-copy its memory too where the "
              "hosts allow")  # fmt: skip
@click.option("--post-copy/--no-post-copy", default=None,
              help="move a process's or runc container's memory after the commit (CRIU "
              "lazy pages; default: with --live where the hosts allow): short "
              "downtime, but until its last page arrived the destination needs the "
              "source (exit 9 if the source is lost then)")  # fmt: skip
@click.option("--post-copy-port", type=click.IntRange(0, 65535), default=0,
              help="the port the source serves its memory on (default: any)")  # fmt: skip
@click.option("--post-copy-min", default=None, metavar="SIZE",
              help="post-copy only a tree holding at least SIZE of private memory; a "
              "smaller one moves it while frozen, faster there (default with --live: "
              "64MiB, docs/migration.md; with --post-copy: 0, always)")  # fmt: skip
@click.option("--downtime-target", type=float, default=0.05, show_default=True,
              help="--live: seconds the last dirty set may take to send")  # fmt: skip
@click.option("--max-rounds", type=int, default=30, show_default=True, help="--live: round limit")
@click.option("--early-handshake/--late-handshake", default=True, show_default=True,
              help="destination enclaves launch, attest before the freeze or in it")  # fmt: skip
@click.option("--page-relay/--page-criu-tls", default=True, show_default=True,
              help="a process's pages: sealed frames relayed by the agents (fast), or in "
              "CRIU's own TLS (slower; for comparison)")  # fmt: skip
@click.option("--criu-nice", type=click.IntRange(-19, 19), default=0, show_default=True,
              help="run CRIU's dump this much nicer than the enclave streams beside it "
              "(negative: CRIU first)")  # fmt: skip
@click.option("--criu-weight", type=click.IntRange(1, 10000), default=None,
              help="run CRIU's dump in a cgroup of this CPU weight (cgroup v2's scale: "
              "100 is a process's own) beside the enclave streams (default: unmoved)")  # fmt: skip
@click.option("--prefault-ahead/--no-prefault-ahead", default=None,
              help="destination enclaves fault in the source's memory size from their "
              "launch on, and the freeze waits for it; or only as the state arrives "
              "(default: ahead for a container holding at most 256 MiB itself)")  # fmt: skip
@click.option("--overlap-restore/--no-overlap-restore", default=True, show_default=True,
              help="the destination restores the tree (held, stopped) while the enclaves "
              "still load; or only once every enclave LOADED")  # fmt: skip
def migrate_command(
    pid: int | None,
    runc_id: str | None,
    podman_name: str | None,
    containerd_id: str | None,
    to: str,
    state: Path,
    ca_dir: Path | None,
    as_json: bool,
    work_dir: Path | None,
    keep_images: bool,
    chunk_size: str | None,
    mode: str,
    keep_tcp: bool,
    tcp_established: bool | None,
    shell_job: bool,
    live: bool,
    post_copy: bool | None,
    post_copy_port: int,
    post_copy_min: str | None,
    downtime_target: float,
    max_rounds: int,
    early_handshake: bool,
    page_relay: bool,
    criu_nice: int,
    criu_weight: int | None,
    prefault_ahead: bool | None,
    overlap_restore: bool,
) -> None:
    """Migrate process PID, or a container, with its enclaves to the agent at --to.

    Established TCP connections stay open where the workload owns an address that
    moves with it (a runc container in a pod network namespace, docs/containers.md);
    elsewhere they are closed on the destination (clients reconnect); listeners
    move.  Exit status: 6 the migration did not happen (the source runs on), 7 in
    doubt (run migsgx recover), 8 the source ended, 9 the source was lost inside
    the post-copy window (the application is lost: docs/migration.md), 10 the
    destination's enclave was lost after the commit (the application runs
    without it), 11 a source enclave died before the decision (nothing moved,
    the source runs without that enclave's state, which is gone).  Containers
    are found with the engine settings of STATE/containers.toml
    (docs/containers.md).  Run as root on the source host.
    """

    from rich.console import Console

    from .agent.postcopy_choice import POST_COPY_MIN
    from .agent.source import MigrateOptions, migrate
    from .agent.tls import AgentIdentity
    from .containers import ContainerSettings

    named = (
        ("pid", pid),
        ("runc", runc_id),
        ("podman", podman_name),
        ("containerd", containerd_id),
    )
    chosen = [(n, v) for n, v in named if v is not None]
    if len(chosen) != 1:
        raise click.UsageError(
            "name exactly one of PID, --runc CONTAINER_ID, --podman NAME, --containerd CONTAINER_ID"
        )
    driver, target = chosen[0]
    what = f"{driver} {target}" if driver != "pid" else str(pid)

    console = Console(stderr=True)
    status = console.status("migrating") if console.is_terminal else None

    def progress(phase: str) -> None:
        if status is not None:
            status.update(f"migrating {what}: {phase}")

    opts = MigrateOptions(
        pid=pid or 0,
        to=parse_address(to),
        identity=AgentIdentity.of_state(state, ca=ca_dir),
        driver=driver,
        target=str(target),
        containers=ContainerSettings.load(state),
        work_dir=work_dir,
        keep_images=keep_images,
        chunk_size=parse_size(chunk_size) if chunk_size else None,
        mode=mode,
        tcp_close=not keep_tcp,
        tcp_established=tcp_established,
        shell_job=shell_job,
        progress=progress,
        early_handshake=early_handshake,
        page_relay=page_relay,
        criu_nice=criu_nice,
        criu_weight=criu_weight,
        prefault_ahead=prefault_ahead,
        overlap_restore=overlap_restore,
    )
    if live:
        _live_options(opts, console, downtime_target, max_rounds)
    # --live's own choice gives way to frozen memory below a size (agent/postcopy_choice.py).
    size_rule = 0
    if post_copy is None:  # (--live: where the driver and the hosts allow)
        post_copy = live and _post_copy_here(console, driver)
        size_rule = POST_COPY_MIN if post_copy else 0
    opts.post_copy = post_copy
    opts.lazy_port = post_copy_port
    opts.post_copy_min = parse_size(post_copy_min) if post_copy_min is not None else size_rule
    opts.notice = lambda line: console.print(line, highlight=False)
    if status is not None:
        with status:
            outcome = migrate(opts)
    else:
        outcome = migrate(opts)
    stats = outcome.stats
    if as_json:
        _emit(stats)
        return
    console.print(
        f"migrated {what} to {to}: pid {outcome.restored_pid} there; "
        f"total {stats['total']:.3f} s, downtime {stats['downtime']:.3f} s, "
        f"{stats['bytes'] / (1 << 20):.1f} MiB"
    )


# --- checkpoint / restore ------------------------------------------------------------------------
@click.command("checkpoint")
@click.argument("pid", type=int)
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
def checkpoint_command(pid: int, directory: Path) -> None:
    """Checkpoint process PID (and its enclaves) into DIR; the process ends.

    Exit status: 6 nothing was saved (the process runs on), 7 in doubt (an
    enclave died inside its commit and its gate could not be read: run
    ``migsgx recover --checkpoint DIR``), 8 the process ended before the
    checkpoint was complete, 11 an enclave of it died before its commit
    (nothing saved; the process runs without that enclave's state, which is
    gone: docs/migration.md, "Checkpoints").
    """

    from .agent.checkpoint import checkpoint

    result = checkpoint(pid, directory)
    _emit({"dir": str(result.directory), "pid": result.pid, "enclaves": result.enclaves})


@click.command("restore")
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
@click.option("--netns", default=None, help="restore into this named network namespace")
@click.option("--platform-socket", type=click.Path(path_type=Path), default=None,
              envvar="MIGSGX_PLATFORM_SOCKET",
              help="this host's platform service (for a checkpoint with enclaves)")  # fmt: skip
def restore_command(directory: Path, netns: str | None, platform_socket: Path | None) -> None:
    """Restore the checkpoint in DIR (its enclave state can be restored once)."""

    from .agent.ckpt_restore import restore

    _emit({"pid": restore(directory, netns=netns, platform_socket=platform_socket)})


def _post_copy_here(console: Any, driver: str) -> bool:
    """``--live``: post-copy the process's memory where the driver and this host can."""

    from .agent.source import NO_LAZY, NO_LAZY_WHY, POST_COPY_DRIVERS
    from .containers.postcopy import check_pipe_max_size
    from .errors import PostCopyUnavailableError

    if driver not in POST_COPY_DRIVERS:
        why = NO_LAZY_WHY.get(driver, NO_LAZY)
        console.print(f"post-copy is not supported for a {driver} container ({why}); its "
                      "memory moves while it is frozen", highlight=False)  # fmt: skip
        return False
    try:
        check_pipe_max_size()
    except PostCopyUnavailableError as exc:
        console.print(f"post-copy is not possible here ({exc}); the process's memory "
                      "moves while it is frozen", highlight=False)  # fmt: skip
        return False
    return True


def _live_options(opts: Any, console: Any, downtime_target: float, max_rounds: int) -> None:
    """``migrate --live``: stop rules, and a line on stderr per pre-copy round."""

    from .core.stoprules import StopRules
    from .datapath.live import FALLBACK

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
        # The driver's estimate (the stop rule's): the final transfer with the digest check.
        estimate = r.get("estimated_downtime_seconds")
        if estimate is None:
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
    """Add the commands of this module to the ``migsgx`` group."""

    cli.add_command(migrate_command)
    cli.add_command(recover_command)
    cli.add_command(checkpoint_command)
    cli.add_command(restore_command)
