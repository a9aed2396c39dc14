"""Starting the platform service as a child process: ``migsgx platform serve``.

The agent starts its host's service this way when asked to; the demo, the
benchmarks and the integration tests do too (through :mod:`migsgx.lab.hosts`).
An operator runs ``migsgx platform serve`` under their own supervisor instead.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import PlatformError
from .service import default_socket

__all__ = ["ServiceProcess", "start_service"]


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
) -> ServiceProcess:
    """Start ``migsgx platform serve`` (optionally under ``prefix``, e.g. ``ip netns exec``)."""

    sock = Path(socket_path or default_socket(state))
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    log = open(Path(state) / "service.log", "ab")  # noqa: SIM115
    try:
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
        )
    finally:
        log.close()
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None:
            raise PlatformError(
                f"platform service for {state} exited with {proc.returncode}; "
                f"see {state}/service.log"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise PlatformError(f"platform service for {state} did not start in {timeout} s")
        time.sleep(0.02)
    return ServiceProcess(Path(state), sock, proc)
