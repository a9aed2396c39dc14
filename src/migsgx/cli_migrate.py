"""Command-line commands of migration: agents, ``migrate``, checkpoints, demos.

:func:`register` adds them to the ``migsgx`` group (``agent``, ``migrate``,
``checkpoint``, ``restore``, ``demo`` with its ``--container`` variant,
``bench process`` and ``bench container``).
Errors propagate as :class:`~migsgx.errors.MigSGXError`; ``migsgx.cli.main``
turns them into exit codes.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .cli_output import emit as _emit
from .errors import ConfigError

__all__ = [
    "agent",
    "bench_process",
    "checkpoint_command",
    "migrate_command",
    "register",
    "restore_command",
]

_Command = TypeVar("_Command", bound=Callable[..., Any])


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected ADDRESS:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def parse_size(value: str) -> int:
    """``256MiB``, ``1GiB``, ``4096`` -> bytes (the image manifest's size syntax)."""

    from .sgx.image import parse_size as parse

    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


# --- agent ------------------------------------------------------------------------------------
@click.group()
def agent() -> None:
    """The per-host migration agent (the destination of migrations)."""


@agent.command("cert")
@click.option("--ca", "ca_dir", type=click.Path(path_type=Path), required=True)
@click.option("--state", type=click.Path(path_type=Path), required=True)
@click.option("--name", "names", multiple=True, required=True, help="address peers dial")
@click.option("--host-id", default=None, help="default: the platform's host id")
def agent_cert(ca_dir: Path, state: Path, names: tuple[str, ...], host_id: str | None) -> None:
    """Issue this host's agent certificate (STATE/agent/) from the CA in CA_DIR."""

    from .agent.tls import issue_agent_identity

    if host_id is None:
        host_id = _platform_host_id(state)
    identity = issue_agent_identity(ca_dir, state, host_id, list(names))
    _emit({"identity": str(identity.directory), "host_id": host_id, "names": list(names)})


def _platform_host_id(state: Path) -> str:
    import tomllib

    from .sgx.platform import PLATFORM_TOML

    try:
        meta = tomllib.loads((state / PLATFORM_TOML).read_text())
        return str(meta["host_id"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{state} holds no platform; give --host-id") from exc


@agent.command("serve")
@click.option("--state", type=click.Path(path_type=Path), required=True)
@click.option("--listen", required=True, help="ADDRESS:PORT (port 0: any)")
@click.option("--ca", "ca_dir", type=click.Path(path_type=Path), default=None,
              help="trust this CA instead of the one stored with the identity")  # fmt: skip
@click.option("--platform-socket", type=click.Path(path_type=Path), default=None)
@click.option("--work-dir", type=click.Path(path_type=Path), default=None)
@click.option("--keep-images", is_flag=True, help="keep each migration's images (debugging)")
@click.option("--images-in-ram", is_flag=True,
              help="receive CRIU's images into RAM (/dev/shm) when it has room for them, "
              "not the work directory")  # fmt: skip
@click.option("--ready-file", type=click.Path(path_type=Path), default=None,
              help="write ADDRESS:PORT here once listening")  # fmt: skip
@click.option("--metrics", "metrics", default=None, metavar="ADDRESS:PORT",
              help="serve Prometheus metrics on ADDRESS:PORT (port 0: any)")  # fmt: skip
def agent_serve(
    state: Path,
    listen: str,
    ca_dir: Path | None,
    platform_socket: Path | None,
    work_dir: Path | None,
    keep_images: bool,
    images_in_ram: bool,
    ready_file: Path | None,
    metrics: str | None,
) -> None:
    """Serve migrations into this host.

    Enclaves are launched by the host's platform service: the one listening on
    --platform-socket (default STATE/run/enclave.sock) when it runs, else one the
    agent starts and stops with itself.
    """

    from .agent.server import Agent, AgentConfig, platform_socket_alive
    from .agent.tls import AgentIdentity
    from .containers import ContainerSettings
    from .sgx.service import default_socket
    from .sgx.spawn import ServiceProcess, start_service

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    identity = AgentIdentity.of_state(state, ca=ca_dir).check()
    sock = platform_socket or default_socket(state)
    service: ServiceProcess | None = None
    if not platform_socket_alive(sock):
        if platform_socket is not None:
            raise ConfigError(f"no platform service answers at {platform_socket}")
        service = start_service(state, socket_path=sock)
    server = Agent(
        AgentConfig(
            state=state,
            listen=_address(listen),
            platform_socket=sock,
            identity=identity,
            work_dir=work_dir or state / "agent" / "work",
            keep_images=keep_images,
            images_in_ram=images_in_ram,
            containers=ContainerSettings.load(state),
        )
    )
    try:
        host, port = server.bind()
        signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
        if metrics is not None:
            m_host, m_port = server.serve_metrics(*_address(metrics))
            click.echo(f"agent {server.host_id} metrics on http://{m_host}:{m_port}/metrics",
                       err=True)  # fmt: skip
        click.echo(f"agent {server.host_id} listening on {host}:{port}", err=True)
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(f"{host}:{port}\n")
            tmp.replace(ready_file)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    finally:
        server.shutdown()
        if service is not None:
            service.stop()


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
    copy left on the destination (``lost``: what remains is reported).
    """

    from .agent.ckpt_recover import resolve_checkpoint
    from .agent.recover import Resolution, recover
    from .agent.tls import AgentIdentity
    from .errors import InDoubtError, LostAfterCommitError
    from .sgx.service import default_socket

    if state is None and not checkpoints:
        raise click.UsageError("name --state STATE, or --checkpoint DIR")
    results: list[Resolution] = []
    if state is not None:
        results += recover(state, AgentIdentity.of_state(state, ca=ca_dir))
        if platform_socket is None:
            platform_socket = default_socket(state)
    results += [resolve_checkpoint(d, platform_socket) for d in checkpoints]
    if as_json:
        _emit([r.to_dict() for r in results])
    else:
        for r in results:
            click.echo(f"{r.mid}  {r.phase:9}  {r.decision:6}  {r.outcome:11}  {r.detail}")
    doubtful = [r.mid for r in results if r.in_doubt]
    if doubtful:
        raise InDoubtError(f"{len(doubtful)} migration(s) remain in doubt: {', '.join(doubtful)}")
    lost = [r.mid for r in results if r.outcome == "lost"]
    if lost:
        raise LostAfterCommitError(
            f"{len(lost)} committed migration(s) have no copy left on the destination: "
            + ", ".join(lost)
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
@click.option("--chunk-size", default=None, help="enclave stream chunk size (e.g. 1MiB)")
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
@click.option("--prefault-ahead/--no-prefault-ahead", default=False, show_default=True,
              help="destination enclaves fault in the source's memory size from their "
              "launch on, and the freeze waits for it; or only as the state arrives")  # fmt: skip
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
    prefault_ahead: bool,
) -> None:
    """Migrate process PID, or a container, with its enclaves to the agent at --to.

    Established TCP connections stay open where the workload owns an address that
    moves with it (a runc container in a pod network namespace, docs/containers.md);
    elsewhere they are closed on the destination (clients reconnect); listeners
    move.  Exit status: 6 the migration did not happen (the source runs on), 7 in
    doubt (run migsgx recover), 8 the source ended, 9 the source was lost inside
    the post-copy window (the application is lost: docs/migration.md), 10 the
    destination's enclave was lost after the commit (the application runs
    without it).  Containers
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
        to=_address(to),
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
        prefault_ahead=prefault_ahead,
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
    """Checkpoint process PID (and its enclaves) into DIR; the process ends."""

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

    from .agent.checkpoint import restore

    _emit({"pid": restore(directory, netns=netns, platform_socket=platform_socket)})


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
@click.option("--ab-images-ram", is_flag=True,
              help="A/B: each run also migsgx (agent serve --images-in-ram) and CRIU "
              "alone with the destination's images in RAM (/dev/shm)")  # fmt: skip
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
    ab_images_ram: bool,
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
        ab_images_ram=ab_images_ram,
    )
    if plot_path is not None:
        plot(result, plot_path)
    if as_json:
        _emit(result)
        return
    lazy = ["migsgx_post_copy", "migsgx_live"] if post_copy else []
    tls = ["criu_only_tls", "migsgx_criu_tls"] if ab_page_tls else []
    for name in ("migsgx", "criu_only", *tls, *lazy):
        r = result[name]
        window = r.get("post_copy_window_seconds")
        click.echo(
            f"{name:15}: total {r['total_seconds']:.3f} s, downtime {r['downtime_seconds']:.3f} s, "
            f"{r['bytes'] / (1 << 20):.0f} MiB"
            + (f", window {window:.3f} s" if window is not None else "")
            + f" (medians of {repeat})"
        )


# --- bench container ---------------------------------------------------------------------------
@click.command("container")
@click.option("--engine", type=click.Choice(["runc", "podman", "containerd"]), default="runc",
              show_default=True)  # fmt: skip
@click.option("--enclave-size", default="256MiB", show_default=True, help="enclave memory")
@_bench_runs
@click.option("--live", is_flag=True,
              help="runc: also migrate with --live, its memory frozen (--no-post-copy) "
              "and by post-copy, the app holding SIZE of ordinary memory too")  # fmt: skip
def bench_container(
    engine: str,
    enclave_size: str,
    repeat: int,
    plot_path: Path | None,
    as_json: bool,
    keep: Path | None,
    live: bool,
) -> None:
    """Container migration with enclaves against the engine's own checkpoint/restore."""

    from .lab.bench.container import LIVE_KINDS, plot, run

    result = run(engine, parse_size(enclave_size), keep=keep, repeat=repeat, live=live)
    if plot_path is not None:
        plot(result, plot_path)
    if as_json:
        _emit(result)
        return
    for name in ("migsgx", "engine_only", *(LIVE_KINDS if live else ())):
        r = result[name]
        window = r.get("post_copy_window_seconds")
        click.echo(
            f"{name:11}: total {r['total_seconds']:.3f} s, "
            f"downtime {r['downtime_seconds']:.3f} s, {r['bytes'] / (1 << 20):.0f} MiB"
            + (f", window {window:.3f} s" if window is not None else "")
            + f" (medians of {repeat})"
        )


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


# --- registration -------------------------------------------------------------------------------
# --- live migration: bench live, migrate --live -------------------------------------------------
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

    from .core.rounds import StopRules
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

    from .core.rounds import StopRules
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

    cli.add_command(agent)
    cli.add_command(migrate_command)
    cli.add_command(recover_command)
    cli.add_command(checkpoint_command)
    cli.add_command(restore_command)
    cli.add_command(demo_command)  # the demo, with its container variant
    bench = cli.commands.get("bench")
    if not isinstance(bench, click.Group):
        bench = click.Group("bench", help="Benchmarks that print numbers.")
        cli.add_command(bench)
    bench.add_command(bench_process)
    bench.add_command(bench_container)
    bench.add_command(bench_live)
