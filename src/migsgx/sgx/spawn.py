"""Starting the platform service as a child process: ``migsgx platform serve``.

The agent starts its host's service this way when asked to; the demo, the
benchmarks and the integration tests do too (through :mod:`migsgx.lab.hosts`).
An operator runs ``migsgx platform serve`` under their own supervisor instead.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, PlatformError
from .listener import (
    Listener,
    default_socket,
    held_by_systemd,
    listener_pid,
    platform_socket_alive,
)

__all__ = ["ServiceProcess", "start_service", "wait_for_unit"]

#: How long an agent waits for the service of a systemd unit that holds the socket
#: (``RestartSec=1``, then the service's start).
UNIT_WAIT = 30.0


@dataclass
class ServiceProcess:
    state: Path
    socket: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_service(
    state: Path,
    *,
    socket_path: Path | None = None,
    prefix: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float = 20.0,
    notify: bool = True,
) -> ServiceProcess:
    """Start ``migsgx platform serve`` (optionally under ``prefix``, e.g. ``ip netns exec``)
    and return once it accepts on its socket.

    The socket file may be there before (a keeper holds it for a restart, or a
    crashed service left it), so its presence says nothing: the service says
    ``READY=1`` on ``$NOTIFY_SOCKET``, as it would to systemd (``Type=notify``).
    ``notify`` False: a service of a release before that (a mixed-release test
    runs one) is up once the socket's listener is the started process
    (``SO_PEERCRED``), as a connection shows.
    """

    sock = Path(socket_path or default_socket(state))
    log = open(Path(state) / "service.log", "ab")  # noqa: SIM115
    ready_dir = tempfile.mkdtemp(prefix="migsgx-ready-")
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        ready.bind(os.path.join(ready_dir, "n"))
        env = {**os.environ, "NOTIFY_SOCKET": os.path.join(ready_dir, "n")}
        proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-P",
                "-m",
                "migsgx",
                "platform",
                "serve",
                "--state",
                str(state),
                "--socket",
                str(sock),
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=env,
        )
        _wait_ready(ready, proc, state, timeout, None if notify else sock)
    finally:
        log.close()
        ready.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(ready_dir, "n"))
        with contextlib.suppress(OSError):
            os.rmdir(ready_dir)
    return ServiceProcess(Path(state), sock, proc)


def _wait_ready(
    ready: socket.socket,
    proc: subprocess.Popen[bytes],
    state: Path,
    timeout: float,
    listened: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        readable, _, _ = select.select([ready], [], [], 0.05)
        if readable and b"READY=1" in ready.recv(4096).split(b"\n"):
            return
        if listened is not None and listener_pid(listened) == proc.pid:
            return
        if proc.poll() is not None:
            raise PlatformError(
                f"platform service for {state} exited with {proc.returncode}; "
                f"see {state}/service.log"
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise PlatformError(f"platform service for {state} did not start in {timeout} s")


def wait_for_unit(state: Path, sock: Path, timeout: float = UNIT_WAIT) -> bool:
    """Whether a systemd socket unit holds ``sock`` (:func:`.listener.held_by_systemd`);
    if it does, return once its service listens.  Between a crash of that service
    and its restart (``RestartSec=``) nothing listens, yet a service started by
    anyone else would take the socket from the unit: wait for the unit's instead.
    ``ConfigError`` when it is not back within ``timeout`` seconds."""

    marker = Listener(state, sock, group=None).systemd_path
    if not held_by_systemd(marker, sock):
        return False
    deadline = time.monotonic() + timeout
    while not platform_socket_alive(sock):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"a systemd socket unit holds {sock}, but its service did not listen within"
                f" {timeout:g} s (systemctl status migsgx-platform.service)"
            )
        time.sleep(0.1)
    return True
