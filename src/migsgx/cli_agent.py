"""The ``agent`` commands: a host's agent certificate, and the agent that serves migrations.

:func:`register` adds them to the ``migsgx`` group.  Errors propagate as
:class:`~migsgx.errors.MigSGXError`; ``migsgx.cli.main`` turns them into exit codes.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from .agent.versions import VERSION as PROTOCOL_VERSION
from .cli_options import parse_address
from .cli_output import emit as _emit
from .errors import ConfigError

__all__ = ["agent", "register"]


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
@click.option("--spend-images/--no-spend-images", default=True, show_default=True,
              help="free a process's pages from its images as CRIU restores them "
              "(CRIU's auto-dedup), and remove a container engine's copies of them "
              "once the next is made: their memory goes back during the restore")  # fmt: skip
@click.option("--enclave-huge-pages/--no-enclave-huge-pages", default=False, show_default=True,
              help="back the memory a destination enclave loads with 2 MiB pages where "
              "the kernel gives them (transparent huge pages: always or madvise)")  # fmt: skip
@click.option("--min-protocol", type=click.IntRange(1, PROTOCOL_VERSION), default=1,
              show_default=True,
              help="refuse tools older than this control protocol version (raise it once "
              "every source host is upgraded)")  # fmt: skip
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
    spend_images: bool,
    enclave_huge_pages: bool,
    min_protocol: int,
    ready_file: Path | None,
    metrics: str | None,
) -> None:
    """Serve migrations into this host.

    Enclaves are launched by the host's platform service: the one listening on
    --platform-socket (default STATE/run/enclave.sock) when it runs, else one the
    agent starts and stops with itself.
    """

    from .agent.server import Agent, AgentConfig
    from .agent.tls import AgentIdentity
    from .containers import ContainerSettings
    from .sgx.listener import default_socket, platform_socket_alive
    from .sgx.spawn import ServiceProcess, start_service, wait_for_unit

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    identity = AgentIdentity.of_state(state, ca=ca_dir).check()
    sock = platform_socket or default_socket(state)
    service: ServiceProcess | None = None
    # (a systemd unit's socket: its service is restarting; the agent waits for it)
    if not platform_socket_alive(sock) and not wait_for_unit(state, sock):
        if platform_socket is not None:
            raise ConfigError(f"no platform service answers at {platform_socket}")
        service = start_service(state, socket_path=sock)
    server = Agent(
        AgentConfig(
            state=state,
            listen=parse_address(listen),
            platform_socket=sock,
            identity=identity,
            work_dir=work_dir or state / "agent" / "work",
            keep_images=keep_images,
            images_in_ram=images_in_ram,
            spend_images=spend_images,
            enclave_huge_pages=enclave_huge_pages,
            min_protocol=min_protocol,
            containers=ContainerSettings.load(state),
        )
    )
    try:
        host, port = server.bind()
        signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
        if metrics is not None:
            m_host, m_port = server.serve_metrics(*parse_address(metrics))
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


def register(cli: click.Group) -> None:
    """Add the ``agent`` group to the ``migsgx`` group."""

    cli.add_command(agent)
