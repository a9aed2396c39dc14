"""``migsgx platform status``: what a host's platform service says of its socket.

The service writes its socket's health (where the socket came from, and whether a
keeper holds it for a restart: :meth:`migsgx.sgx.listener.Listener.status`) to
``STATE/serve-<tag>.json`` at each change; this prints it, with whether the
service still runs.  Its fields: ``docs/operations.md``, "The platform socket's
keeper".
"""

from __future__ import annotations

from pathlib import Path

import click

from .cli_output import emit
from .errors import ConfigError

__all__ = ["platform_status"]


@click.command("status")
@click.option("--state", type=click.Path(path_type=Path), required=True)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=None)
def platform_status(state: Path, socket_path: Path | None) -> None:
    """Print the platform service's socket health as JSON (``keeper``: ``running``,
    ``starting``, ``missing`` or ``none``; ``running``: whether the service runs)."""

    from .sgx.listener import default_socket, read_status

    sock = socket_path or default_socket(state)
    status = read_status(state, sock)
    if status is None:
        raise ConfigError(f"no platform service runs for {sock} (none said anything of it)")
    emit(status)
