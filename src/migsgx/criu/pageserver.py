"""``criu page-server`` on a connection its caller accepted and checked.

Used by the destination agent and the process and container benchmarks; it sits
with CRIU, below both the agent and the container drivers.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from pathlib import Path

from ..errors import CriuError
from .keeplog import log_excerpt

__all__ = ["PageServer", "page_bytes"]


class PageServer:
    """``criu page-server`` on an already accepted connection (``--ps-socket``).

    The agent accepts the source CRIU's connection on a per-session port and
    checks who it comes from; CRIU then writes the pages it receives straight
    into the session's images directory.
    """

    def __init__(
        self,
        binary: Path,
        images_dir: Path,
        conn: socket.socket,
        *,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``tls``: (CA certificate, certificate, key) for CRIU's mutual TLS (GnuTLS)."""

        self.images_dir = images_dir
        self.log = images_dir / "page-server.log"
        argv = [
            str(binary),
            "page-server",
            "--images-dir",
            str(images_dir),
            "--ps-socket",
            str(conn.fileno()),
            "--log-file",
            self.log.name,
            "-v4",
        ]
        if tls is not None:
            ca, cert, key = tls
            argv += ["--tls", "--tls-cacert", str(ca), "--tls-cert", str(cert)]
            argv += ["--tls-key", str(key)]
        try:
            self.proc = subprocess.Popen(
                argv,
                pass_fds=(conn.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise CriuError(f"cannot start criu page-server: {exc}", action="page-server") from exc

    def wait(self, timeout: float) -> None:
        """Wait until the dump closed the stream; a failure raises :class:`CriuError`."""

        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise CriuError(
                f"criu page-server did not finish within {timeout} s", action="page-server"
            ) from exc
        if code != 0:
            raise CriuError(
                f"criu page-server failed with status {code}: {log_excerpt(self.log)}",
                action="page-server",
                log_path=str(self.log),
            )

    def ended(self, timeout: float) -> bool:
        """Whether the page server ended, waited for up to ``timeout`` seconds (a
        step of a longer wait; :meth:`wait` then reads how it ended)."""

        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        return self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def page_bytes(images_dir: Path) -> int:
    return sum(p.stat().st_size for p in images_dir.glob("pages-*.img"))
