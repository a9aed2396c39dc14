"""Post-copy of process pages: CRIU lazy pages in mutual TLS, and the window it opens.

The source dumps with ``lazy_pages``: CRIU writes every image except the
contents of private anonymous memory, runs ``post-dump`` (the images are
complete, the tree frozen), then serves the missing pages on a TCP port until
the destination has pulled all of them, and only then kills the tree.  The
destination runs ``criu lazy-pages`` (which connects to that port) and
``criu restore --lazy-pages``: the tree runs at once and each first touch of a
page is a userfaultfd fault the daemon answers with a page from the source,
while it also pulls the rest in the background.

From the restore until the daemon has every page, the destination depends on
the source: *the post-copy window*.  If the source goes away inside it, the
daemon exits, the kernel would drop its userfaultfd registrations and the
tree would read zeros where its memory was.  :class:`PostCopyRestore`
prevents that silent corruption: it holds duplicates of the daemon's
userfaultfds (``pidfd_getfd``), so an unserved fault blocks instead of
zero-filling, kills the tree, and only then lets the descriptors go; the
caller gets :class:`~migsgx.errors.SourceLostError` (exit status 9).

Both ends speak CRIU's own TLS (GnuTLS) with the agent identities: the page
stream is never plain, and either side refuses a peer without a certificate
of the deployment's CA.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .. import _proc
from .._fds import tcp_connections
from ..criu import Criu, Enter, NotifyCallback, log_excerpt
from ..errors import CriuError, PostCopyUnavailableError, SourceLostError
from ..system.process import continue_tree, kill_tree, wait_stopped
from .base import ContainerError

__all__ = [
    "PIPE_MAX_SIZE_NEEDED",
    "PIPE_MAX_SIZE_PATH",
    "PostCopyRestore",
    "WindowReport",
    "check_pipe_max_size",
    "lazy_dump",
    "served_port",
    "uncork",
]

#: CRIU's lazy dump splices pages through pipes of up to 4 MiB; without
#: CAP_SYS_RESOURCE it may not grow a pipe beyond ``fs.pipe-max-size``.
PIPE_MAX_SIZE_NEEDED: Final = 4 << 20
PIPE_MAX_SIZE_PATH: Final = Path("/proc/sys/fs/pipe-max-size")

_SYS_PIDFD_OPEN: Final = 434
_SYS_PIDFD_GETFD: Final = 438
_UFFD_LINK: Final = "anon_inode:[userfaultfd]"
# CRIU logs the port it bound when asked for any port (after listen()).
_PORT_LINE: Final = re.compile(rb"Using (\d+) port")

Tls = tuple[Path, Path, Path]  # (CA certificate, certificate, key)


def check_pipe_max_size(path: Path = PIPE_MAX_SIZE_PATH, needed: int = PIPE_MAX_SIZE_NEEDED) -> int:
    """Raise :class:`PostCopyUnavailableError` naming the fix if pipes are too small.

    Checked at run time, before anything is frozen, because a host can lose
    the set-up's sysctl (a reboot, another tool): CRIU would otherwise fail
    half-way through the dump with an opaque ``F_SETPIPE_SZ`` error.
    """

    try:
        value = int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise PostCopyUnavailableError(f"cannot read {path}: {exc}") from exc
    if value < needed:
        raise PostCopyUnavailableError(
            f"fs.pipe-max-size is {value}, post-copy needs at least {needed}: run "
            f"'sysctl -w fs.pipe-max-size={needed}' (scripts/setup.sh does this at set-up)",
            pipe_max_size=value,
            needed=needed,
        )
    return value


def _tls_args(tls: Tls | None) -> list[str]:
    if tls is None:
        return []
    ca, cert, key = tls
    return ["--tls", "--tls-cacert", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]


def lazy_dump(
    criu: Criu,
    pid: int,
    images_dir: Path,
    *,
    tls: Tls | None,
    port: int = 0,
    notify: NotifyCallback | None = None,
    enter: Enter | None = None,
) -> None:
    """Dump ``pid`` lazily and serve its memory until the destination has it.

    Blocks until the destination pulled every page (or the transfer failed:
    :class:`CriuError`).  ``notify`` sees ``post-dump`` once the images are
    complete: that is when they can move.  With ``port`` 0 the kernel picks
    the port, in the tree's own network namespace, and :func:`served_port`
    reads it from the dump log.  ``tls`` None is for tests only; a migration
    always passes the agent identities.
    """

    check_pipe_max_size()
    extra: dict[str, bool | str] = {}
    if tls is not None:
        ca, cert, key = tls
        extra.update(tls=True, tls_cacert=str(ca), tls_cert=str(cert), tls_key=str(key))
    criu.dump(
        pid,
        images_dir,
        lazy_pages=True,
        page_server=("", port),  # in lazy mode CRIU listens on the port (any address)
        notify=notify,
        enter=enter,
        extra=extra,
    )


def served_port(
    images_dir: Path, *, timeout: float, alive: Callable[[], bool], log_file: str = "dump.log"
) -> int:
    """The port a lazy dump serves pages on, once it listens.

    ``alive`` tells whether the dump still runs: a dump that failed before
    listening ends the wait with :class:`CriuError` instead of a timeout.
    """

    log = images_dir / log_file
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            found = _PORT_LINE.search(log.read_bytes())
            if found:
                return int(found.group(1))
        if not alive() or time.monotonic() > deadline:
            raise CriuError(
                f"the lazy dump did not start serving pages: {log_excerpt(log)}",
                action="dump",
                log_path=str(log),
            )
        time.sleep(0.01)


@dataclass(frozen=True)
class WindowReport:
    """How long the destination depended on the source for process pages."""

    window_seconds: float  # from the restored tree's start to the last page pulled
    restore_seconds: float


def _syscall(number: int, *args: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    ret = int(libc.syscall(number, *args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _hold_uffds(pid: int) -> list[int]:
    """Duplicates of every userfaultfd ``pid`` holds, taken with ``pidfd_getfd``."""

    held: list[int] = []
    pidfd = _syscall(_SYS_PIDFD_OPEN, pid, 0)
    try:
        for fd, link in _proc.fd_links(pid, gone_ok=False):
            if link == _UFFD_LINK:
                with contextlib.suppress(OSError):
                    held.append(_syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
    finally:
        os.close(pidfd)
    return held


def uncork(pid: int) -> int:
    """Push every TCP connection of CRIU process ``pid`` at once from now on; how many.

    CRIU corks its page connections (``TCP_CORK``) and pushes after each batch
    of pages, but not after the close request, its answer, or TLS's
    ``close_notify``: each of those waits out the kernel's 200 ms cork limit.
    The lazy-pages daemon reads no userfaultfd event while it waits there, and
    a restored tree that unmaps memory (Python does, on its first steps) blocks
    until the daemon exits: twice 200 ms of downtime in every post-copy
    migration whose pages all arrived before its enclaves were attached.
    The option is cleared on a duplicate (``pidfd_getfd``) of CRIU's own
    socket, which is the same socket; nothing else of the stream changes.
    Best effort: a CRIU that ended meanwhile leaves nothing to push.
    """

    count = 0
    with contextlib.suppress(OSError):  # (CRIU ended: nothing to push)
        for sock in tcp_connections(pid):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                count += 1
    return count


class PostCopyRestore:
    """The destination half: ``criu lazy-pages`` and ``criu restore --lazy-pages``.

    Use :meth:`restore`, then :meth:`wait` to close the window (or learn that
    the source was lost: the tree is dead by then), and :meth:`close` always.
    """

    def __init__(
        self,
        criu: Criu,
        images_dir: Path,
        source: tuple[str, int],
        *,
        tls: Tls | None,
        enter: Enter | None = None,
    ) -> None:
        check_pipe_max_size()
        self.criu = criu
        self.images_dir = images_dir
        self.enter = enter
        self.log = images_dir / "lazy-pages.log"
        self.root: int | None = None
        self._held: list[int] = []
        self._started = 0.0
        ready_r, ready_w = os.pipe()
        argv = [*(enter.argv_prefix() if enter else []), str(criu.binary), "lazy-pages"]
        argv += ["--images-dir", str(images_dir), "--page-server"]
        argv += ["--address", source[0], "--port", str(source[1])]
        argv += ["--status-fd", str(ready_w), "--log-file", self.log.name, "-v4"]
        argv += _tls_args(tls)
        try:
            self.daemon = subprocess.Popen(
                argv,
                pass_fds=(ready_w,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            os.close(ready_r)
            raise CriuError(f"cannot start criu lazy-pages: {exc}", action="lazy-pages") from exc
        finally:
            os.close(ready_w)
        # The daemon writes to the status pipe once its socket in the images
        # directory listens; a restore started earlier would find no daemon.
        with os.fdopen(ready_r, "rb") as ready:
            if not ready.read(1):
                self.daemon.wait()
                raise CriuError(
                    f"criu lazy-pages did not start: {log_excerpt(self.log)}",
                    action="lazy-pages",
                    log_path=str(self.log),
                )

    def restore(
        self,
        notify: NotifyCallback | None = None,
        *,
        run: bool = True,
        file_locks: bool = False,
        tcp_close: bool = False,
        by: Callable[[], int] | None = None,
    ) -> int:
        """Restore the tree and let it run; returns its root pid.  The window opens here.

        CRIU leaves the tree stopped; the daemon's userfaultfds are taken
        before it runs, so no instant exists in which a lost source could make
        it read zeros.  If the daemon is already gone, the tree never runs.
        With ``run`` False the tree stays held (a migration commits first) and
        :meth:`run` lets it go.  ``by`` restores instead of CRIU's RPC (a
        container engine's ``restore --lazy-pages``, leaving the tree stopped);
        it returns the root pid.
        """

        t0 = time.monotonic()
        try:
            if by is not None:
                pid = by()
            else:
                pid = self.criu.restore(
                    self.images_dir,
                    lazy_pages=True,
                    restore_detached=True,
                    log_file="restore.log",
                    notify=notify,
                    enter=self.enter,
                    file_locks=file_locks,
                    extra={"leave_stopped": True, **({"tcp_close": True} if tcp_close else {})},
                )
        except (CriuError, ContainerError) as exc:
            # CRIU killed what it had restored.  If the daemon failed too, it
            # could not reach the source: say so, not just "restore failed".
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(timeout=10)
            code = self.daemon.poll()
            self.close()
            if code:
                raise SourceLostError(
                    f"the source did not serve process pages (criu lazy-pages status {code}: "
                    f"{log_excerpt(self.log)}); the restore was undone, the destination "
                    "tree was killed",
                    log_path=str(self.log),
                ) from exc
            raise
        self.root = pid
        wait_stopped(pid)
        if self.daemon.poll() is None:
            try:
                self._held = _hold_uffds(self.daemon.pid)
            except OSError as exc:
                self._lose(None)
                raise CriuError(f"cannot hold the lazy-pages daemon's userfaultfds: {exc}") from exc
        if self.daemon.poll() is not None and self.daemon.returncode != 0:
            self._lose(None)
            raise SourceLostError(
                f"the source stopped serving process pages before the tree ran "
                f"(criu lazy-pages status {self.daemon.returncode}: {log_excerpt(self.log)}); "
                "the destination tree was killed",
                log_path=str(self.log),
            )
        self._restore_seconds = time.monotonic() - t0
        if run:
            self.run()
        return pid

    def run(self) -> None:
        """Let the held tree run: from here its missing pages come from the source."""

        assert self.root is not None
        if self.daemon.poll() is None:
            uncork(self.daemon.pid)  # (connected to the source since the restore)
        self._started = time.monotonic()
        continue_tree(self.root)

    @property
    def serving(self) -> bool:
        """Whether the daemon still runs or ended with every page (not on an error)."""

        return self.daemon.poll() in (None, 0)

    def wait(self, timeout: float, *, on_lost: Callable[[], None] | None = None) -> WindowReport:
        """Wait until every page arrived; the window closes.

        If the daemon fails first (the source died, the connection broke, a
        peer without the right certificate), the tree is killed while its
        userfaultfds are still held here, and :class:`SourceLostError` is raised.
        """

        try:
            code = self.daemon.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._lose(on_lost)
            raise SourceLostError(
                f"process pages still missing after {timeout} s; the destination tree was killed",
                log_path=str(self.log),
            ) from None
        if code != 0:
            self._lose(on_lost)
            raise SourceLostError(
                f"the source stopped serving process pages (criu lazy-pages status {code}: "
                f"{log_excerpt(self.log)}); the destination tree was killed",
                log_path=str(self.log),
            )
        window = time.monotonic() - self._started
        self._release()
        return WindowReport(window_seconds=window, restore_seconds=self._restore_seconds)

    def _lose(self, on_lost: Callable[[], None] | None) -> None:
        if self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        if self.root is not None:
            with contextlib.suppress(Exception):
                kill_tree(self.root)
        if on_lost is not None:
            on_lost()
        self._release()

    def _release(self) -> None:
        for fd in self._held:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held = []

    def close(self) -> None:
        if self.daemon.poll() is None:
            self.daemon.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(timeout=5)
        self._release()
