"""The service's side of its socket keeper (:mod:`.keeper`): starting one, knowing that
it runs, starting another when it ends, and taking the socket back from the keeper
a killed service left.

A keeper says ``HELLO`` and its pid once it holds the socket; the service then
watches it through a pidfd (and its control channel).  A keeper that never says
hello, or ends while the service runs (the OOM killer, an operator's ``kill``),
would leave the socket unkept without a word: the service says so in its log
and its status file (:meth:`KeeperLink.status`), and starts a new keeper
holding a duplicate of its listener, which is still its own.

A listener is taken back only from a keeper of the service's user and pid
namespace, and only when the kernel (``sock_diag``, :mod:`.sockdiag`) says it is
bound to the file at the socket's path.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .. import _proc
from .._fds import take_descriptor
from . import keeper
from .sockdiag import bound_file, same_file

__all__ = ["KeeperLink", "child_environment", "keepers_of", "take_back"]

#: How long a started keeper has to say ``HELLO``.
HELLO_TIMEOUT: Final = 10.0
#: How soon a service without a keeper tries to start one again: at first, then twice
#: as long each time (a keeper that cannot start costs a process each time), at most.
RETRY: Final = 5.0
RETRY_MAX: Final = 60.0
#: How long a restarted service waits for a keeper's answer.
_TAKE_TIMEOUT: Final = 10.0
#: systemd's variables for the service alone: no process it starts may take them for its own.
SERVICE_ONLY_ENV: Final = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def child_environment() -> dict[str, str]:
    """The environment of a process the service starts (a keeper, an enclave): the
    service's own, less ``NOTIFY_SOCKET`` and ``LISTEN_*`` (a child that said
    ``READY=1``, or took descriptor 3 for systemd's socket, would act as the service)."""

    return {k: v for k, v in os.environ.items() if k not in SERVICE_ONLY_ENV}


def _log(line: str) -> None:
    sys.stderr.write(f"platform: {line}\n")
    sys.stderr.flush()


class KeeperLink:
    """The keeper of one service's listener, watched while the service runs.

    ``state``: ``starting`` (started, no hello yet), ``running`` (it said hello
    and lives), ``missing`` (none holds the socket: it could not start, or ended
    and the next one is not up yet).  ``on_change`` is called on every change.
    """

    def __init__(
        self,
        tag: str,
        path: Path,
        keep_for: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.tag = tag
        self.path = path
        self.keep_for = keep_for
        self.on_change = on_change
        self.state = "missing"
        self.pid: int | None = None
        self.restarts = 0
        self._listener: socket.socket | None = None
        self._control: socket.socket | None = None
        self._pidfd: int | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._said_missing = False
        self._retry = RETRY

    # --- starting and stopping ---------------------------------------------------------
    def start(self, listener: socket.socket) -> None:
        """Start a keeper holding a duplicate of ``listener``, and watch it."""

        self._listener = listener
        self._spawn()
        self._watch()

    def adopt(self, listener: socket.socket, channel: socket.socket, pid: int) -> None:
        """Watch the keeper ``listener`` was taken back from (``channel``: its control now)."""

        self._listener = listener
        self._control = channel
        self._running(pid)
        self._watch()

    def close(self, *, end: bool = True) -> None:
        """Stop watching; ``end``: the service ends for good, so does the keeper (``END``).
        Without ``end`` the keeper keeps the socket for the next service.  Idempotent."""

        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self._control is not None:
            if end:
                with contextlib.suppress(OSError):
                    self._control.send(keeper.END)
            self._control.close()
            self._control = None
        self._close_pidfd()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def status(self) -> dict[str, object]:
        return {"keeper": self.state, "keeper_pid": self.pid, "keeper_restarts": self.restarts}

    # --- the watch ---------------------------------------------------------------------
    def _watch(self) -> None:
        self._thread = threading.Thread(target=self._run, name="migsgx-keeper-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._control is None:
                if self._wait(self._retry):
                    return
                self._retry = min(self._retry * 2, RETRY_MAX)
                self._spawn()
            elif self._pidfd is None:
                self._await_hello(self._control)
            elif self._ready([self._pidfd, self._control.fileno()], None):
                if self._stop.is_set():
                    return
                _log(
                    f"WARNING: the socket keeper (pid {self.pid}) ended: {self.path} is not kept"
                    " across a restart of this service until a new keeper holds it; starting one"
                )
                self._lost()
                self.restarts += 1
                self._spawn()

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless told to stop: True when stopped."""

        self._ready([], seconds)
        return self._stop.is_set()

    def _ready(self, fds: list[int], timeout: float | None) -> bool:
        """Whether one of ``fds`` became readable (not the wake pipe) within ``timeout``."""

        readable, _, _ = select.select([self._wake_r, *fds], [], [], timeout)
        return any(fd != self._wake_r for fd in readable)

    def _await_hello(self, control: socket.socket) -> None:
        got = b""
        if self._ready([control.fileno()], HELLO_TIMEOUT):
            with contextlib.suppress(OSError):
                control.settimeout(1.0)
                got = control.recv(keeper.HELLO_LAYOUT.size)
                control.settimeout(None)
        if self._stop.is_set():
            return
        if len(got) == keeper.HELLO_LAYOUT.size:
            kind, pid = keeper.HELLO_LAYOUT.unpack(got)
            if kind == keeper.HELLO and self._running(pid):
                return
        self._lost()
        if not self._said_missing:
            self._said_missing = True
            _log(
                f"WARNING: the socket keeper did not start: {self.path} is not kept across a"
                f" restart of this service; trying again in {RETRY:g} s, then less often"
            )

    def _running(self, pid: int) -> bool:
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        if self.tag.encode() not in _proc.argv(pid):
            self._close_pidfd()  # (no keeper of this socket: a pid that is not one)
            return False
        self.pid, self.state = pid, "running"
        if self._said_missing or self.restarts:
            _log(f"a new socket keeper (pid {pid}) holds {self.path}")
        self._said_missing = False
        self._retry = RETRY
        self.on_change()
        return True

    def _lost(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        self._close_pidfd()
        self.pid, self.state = None, "missing"
        self.on_change()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _spawn(self) -> None:
        """Start a keeper (no child of the service: a shell starts it and exits)."""

        listener = self._listener
        if listener is None or self._stop.is_set():
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reserve, reserve_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (listener.fileno(), theirs.fileno(), reserve.fileno(), reserve_peer.fileno())
        argv = [sys.executable, "-P", "-m", keeper.MODULE,
                "--listener", str(fds[0]), "--control", str(fds[1]),
                "--reserve", str(fds[2]), "--reserve-peer", str(fds[3]),
                "--socket-tag", self.tag, "--path", str(self.path),
                "--keep-for", str(self.keep_for)]  # fmt: skip
        try:
            # Output to nowhere: a keeper must not hold the service's stdout or stderr
            # (a pipe its reader waits on) after the service died.
            starter = subprocess.Popen(
                ["/bin/sh", "-c", '"$@" &', "migsgx-keeper", *argv],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                env=child_environment(),
            )
            starter.wait()
        except OSError as exc:
            ours.close()
            self.state = "missing"
            if not self._said_missing:
                self._said_missing = True
                _log(
                    f"WARNING: the socket keeper cannot be started ({exc}): {self.path} is not"
                    " kept across a restart of this service; trying again in"
                    f" {RETRY:g} s, then less often"
                )
            self.on_change()
        else:
            self._control = ours
            self.state = "starting"
        finally:
            theirs.close()
            reserve.close()
            reserve_peer.close()


# --- taking the socket back -----------------------------------------------------------
def take_back(tag: str, path: Path) -> tuple[socket.socket, socket.socket, int] | None:
    """The socket a keeper of ``path`` holds, the keeper's channel and pid; None if none.

    The keeper must run as this service's user in its pid namespace, answer on its
    reserve channel, and hand over a listening Unix socket that the kernel says is
    bound to the file at ``path`` now.  Anything else is not adopted (a foreign socket).
    """

    for pid, peer_fd in keepers_of(tag):
        if not _same_user(pid) or not _same_pid_namespace(pid):
            continue
        try:
            channel = take_descriptor(pid, peer_fd)
        except OSError:
            continue  # gone, or not ours to take
        got = _ask(channel, path, pid)
        if got is not None:
            return got, channel, pid
        channel.close()
    return None


def _same_pid_namespace(pid: int) -> bool:
    """Whether ``pid`` runs in this service's pid namespace, as the keeper it started
    does.  Root inside a container without a user namespace has this service's uid
    but its own pid namespace: a "keeper" there is not adopted."""

    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def _same_user(pid: int) -> bool:
    uids = (_proc.status_field(pid, "Uid") or "").split()
    return len(uids) == 4 and set(uids) == {str(os.geteuid())}


def _ask(channel: socket.socket, path: Path, pid: int = 0) -> socket.socket | None:
    """``TAKE`` on a keeper's reserve channel: the listener it gives, if it is ``path``'s."""

    channel.settimeout(_TAKE_TIMEOUT)
    try:
        channel.sendall(keeper.TAKE)
        msg, fds, _flags, _addr = socket.recv_fds(channel, keeper.GIVE_LAYOUT.size, 1)
    except OSError:
        return None
    channel.settimeout(None)
    if not fds:
        return None
    for extra in fds[1:]:
        os.close(extra)
    try:
        sock = socket.socket(fileno=fds[0])
    except OSError:  # (not a socket: a pipe, a file)
        os.close(fds[0])
        return None
    try:
        if len(msg) == keeper.GIVE_LAYOUT.size and _is_ours(sock, path, msg, pid):
            return sock
    except OSError as exc:
        _log(f"refused the socket a keeper (pid {pid}) offered for {path}: {exc}")
    sock.close()
    return None


def _is_ours(sock: socket.socket, path: Path, msg: bytes, pid: int) -> bool:
    kind, dev, ino = keeper.GIVE_LAYOUT.unpack(msg)
    st = os.stat(path)
    if not (
        kind == keeper.GIVE
        and stat.S_ISSOCK(st.st_mode)
        and (st.st_dev, st.st_ino) == (dev, ino)
        and sock.family == socket.AF_UNIX
        and sock.type == socket.SOCK_STREAM
        and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        # (bound under its temporary name in the same directory, then renamed)
        and os.path.dirname(sock.getsockname()) == str(path.parent)
    ):
        return False
    # What the socket and the keeper say is a claim; the kernel knows the file.
    bound = bound_file(sock)
    if same_file(bound, st):
        return True
    where = "no file" if bound is None else f"{bound.name} (device {bound.dev}, inode {bound.ino})"
    _log(
        f"refused the socket a keeper (pid {pid}) offered for {path}: the kernel says it is"
        f" bound to {where}, not to {path} (device {st.st_dev}, inode {st.st_ino}); binding"
        " a fresh socket"
    )
    return False


def keepers_of(tag: str) -> list[tuple[int, int]]:
    """(pid, reserve peer descriptor) of every keeper naming ``tag``."""

    found = []
    for pid in _proc.pids():
        argv = _proc.argv(pid)
        if keeper.MODULE.encode() not in argv or b"--socket-tag" not in argv:
            continue
        try:
            if argv[argv.index(b"--socket-tag") + 1].decode() != tag:
                continue
            found.append((pid, int(argv[argv.index(b"--reserve-peer") + 1])))
        except (ValueError, IndexError):
            continue
    return found
