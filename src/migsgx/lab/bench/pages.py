"""The CRIU-alone baselines' plumbing: a page server on the destination, images around it.

``bench process`` and ``bench container`` compare migsgx with CRIU (or runc)
doing a stop-and-copy alone: ``criu page-server`` on the destination host takes
the dump's pages over one TCP connection, the other images are copied after the
dump.  Both baselines do exactly that, so it is here once.
"""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path
from types import TracebackType

from ...criu.pageserver import PageServer
from ...errors import MigSGXError
from ...system.process import in_netns
from ..netns import Host

__all__ = ["PageServerOn", "copy_images", "image_bytes"]

ACCEPT_TIMEOUT = 30.0


class PageServerOn:
    """``criu page-server`` on ``host`` for one dump, on a port the OS chose.

    The listener lives in the host's network namespace; the one connection the
    dumping CRIU makes is accepted in a thread and handed to the page server.
    """

    def __init__(
        self,
        host: Host,
        criu_binary: Path,
        images: Path,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``tls``: (CA, certificate, key) for CRIU's own TLS on the page stream."""

        self._tls = tls
        self._server: PageServer | None = None
        self._error: BaseException | None = None
        self._listener = in_netns(f"/run/netns/{host.netns}", lambda: socket.socket())
        try:
            self._listener.bind((host.address, 0))
            self._listener.listen(1)
        except BaseException:
            self._listener.close()
            raise
        self.address: tuple[str, int] = (host.address, self._listener.getsockname()[1])
        self._acceptor = threading.Thread(
            target=self._accept, args=(criu_binary, images), name="migsgx-bench-pages",
            daemon=True,
        )  # fmt: skip
        self._acceptor.start()

    def _accept(self, criu_binary: Path, images: Path) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn:
                self._server = PageServer(criu_binary, images, conn, tls=self._tls)
        except (OSError, MigSGXError) as exc:
            self._error = exc

    def wait(self, timeout: float) -> None:
        """After the dump: the page server has every page (it exits when the dump ends)."""

        self._acceptor.join(ACCEPT_TIMEOUT)
        if self._server is None:
            raise MigSGXError(f"the page server never got the dump's connection: {self._error}")
        self._server.wait(timeout)

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> PageServerOn:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def copy_images(dump_dir: Path, images: Path) -> None:
    """The dump's images besides the pages, as a copy to the destination would move them."""

    for path in dump_dir.iterdir():
        if path.name != "dump.log":
            shutil.copyfile(path, images / path.name)


def image_bytes(images: Path) -> tuple[int, int]:
    """(page bytes, other image bytes) of an images directory."""

    pages = sum(p.stat().st_size for p in images.glob("pages-*.img"))
    other = sum(p.stat().st_size for p in images.iterdir() if not p.name.startswith("pages-"))
    return pages, other
