"""The platform service's listening socket: where it is, who may use it, and how it
outlives a restart of the service.

Three ways to the socket, in this order (:meth:`Listener.open`):

1. **systemd socket activation** (``LISTEN_PID``/``LISTEN_FDS``, as ``sd_listen_fds``):
   systemd holds the socket (``deploy/systemd/migsgx-platform.socket``) and passes
   the same one to every start of the service.
2. **Taken back from the keeper** (:mod:`.keeper`) that a killed service of this
   socket left: the same socket, the same inode, with the connections that
   queued while no service ran.
3. **Bound fresh**, then handed to a new keeper, which the service watches and
   replaces when it ends (:mod:`.keepers`).  Never over a socket a systemd unit
   holds (:func:`held_by_systemd`): its service is restarting.

One service per socket: an exclusive ``flock`` on ``STATE/serve-<tag>.lock``,
held while the service runs (released by the kernel when it dies), refuses a
second one before it touches the socket.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Final

from .. import _proc
from ..errors import ConfigError
from .keepers import KeeperLink, take_back

SOCKET_NAME: Final = "enclave.sock"
#: The directory of the service's socket in its state directory, holding nothing else.
SOCKET_DIR: Final = "run"
#: The longest path a Unix socket address holds (``sun_path``, less its final NUL).
SUN_PATH_MAX: Final = 107
BACKLOG: Final = 64
#: How long a keeper holds the socket of a service that died, by default (seconds).
KEEP_FOR: Final = 300.0
#: How long a restarted service waits for a keeper's answer.
_TAKE_TIMEOUT: Final = 10.0
_SD_LISTEN_FDS_START: Final = 3


def default_socket(state_dir: Path) -> Path:
    """``STATE/run/enclave.sock``: in a directory of its own, which containers may
    bind-mount (or they mount the file: it is kept across restarts, :mod:`.keeper`)."""

    return Path(state_dir) / SOCKET_DIR / SOCKET_NAME


def make_socket_dir(directory: Path, group: int | None) -> None:
    """The socket's directory, made for it when missing: 0700, or 0750 and ``group``
    (who may use the socket must reach it; nobody else even sees its name).  An
    existing directory (an operator's ``--socket``) is left as it is.  Its parents are
    not made: their modes decide who reaches the socket, which only the operator knows,
    so a missing one is a :class:`ConfigError` that names it (not an ``OSError`` at bind)."""

    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        return
    except FileNotFoundError as exc:
        missing = directory.parent
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent
        raise ConfigError(
            f"the socket's directory {directory} cannot be made: {missing} does not exist"
            " (make it first, with the modes who uses the socket needs)"
        ) from exc
    if group is not None:
        os.chown(directory, -1, group)
    os.chmod(directory, 0o750 if group is not None else 0o700)  # (mkdir's mode met the umask)


def socket_tag(state_dir: Path, path: Path) -> str:
    """Names one platform's socket on its keeper's command line and its lock file."""

    where = os.fsencode(Path(state_dir).resolve()) + b"\0" + os.fsencode(_absolute(path))
    return hashlib.sha256(b"migsgx socket " + where).hexdigest()[:32]


def _absolute(path: Path) -> Path:
    return Path(path).parent.resolve() / Path(path).name


class Listener:
    """The listening socket of one service, and what keeps it when the service dies."""

    def __init__(
        self, state_dir: Path, path: Path, *, group: int | None, keep_for: float = KEEP_FOR
    ) -> None:
        self.path = _absolute(path)
        self.group = group
        self.keep_for = keep_for
        self.tag = socket_tag(state_dir, self.path)
        self.lock_path = Path(state_dir) / f"serve-{self.tag[:16]}.lock"
        #: What the service says of its socket (:meth:`status`).
        self.status_path = Path(state_dir) / f"serve-{self.tag[:16]}.json"
        #: Left by a service that systemd passed the socket (:func:`held_by_systemd`).
        self.systemd_path = Path(state_dir) / f"serve-{self.tag[:16]}.systemd"
        self.sock: socket.socket | None = None
        #: ``systemd``, ``kept`` (taken back from a keeper) or ``bound`` (fresh).
        self.origin = ""
        self._lock_fd: int | None = None
        self._keeper: KeeperLink | None = None
        self._status_lock = threading.Lock()

    def open(self) -> socket.socket:
        if len(os.fsencode(self.path)) > SUN_PATH_MAX:
            raise ConfigError(
                f"the platform socket path {self.path} is longer than a Unix socket "
                f"address can be ({SUN_PATH_MAX} bytes): choose a shorter state directory"
            )
        take_notify_socket()
        self._lock()
        try:
            sock = self._open()
        except BaseException:
            if self.origin == "kept":
                # (a restart that failed after the take-back, its mode or group say: the
                # keeper keeps the socket for the next service, as after a crash)
                if self._keeper is not None:
                    self._keeper.close(end=False)
                    self._keeper = None
                self.origin = ""
            self.close()
            raise
        # listen() again: connections name this service as the socket's owner
        # (SO_PEERCRED), not the one that bound it.
        sock.listen(BACKLOG)
        self.sock = sock
        self.write_status()
        return sock

    def _open(self) -> socket.socket:
        make_socket_dir(self.path.parent, self.group)
        sock = _from_systemd(self.path)
        if sock is not None:
            self.origin = "systemd"
            self._mark_systemd()
        else:
            kept = self._take_back()
            if kept is not None:
                sock = kept
                self.origin = "kept"
                self._set_mode(self.path)
            else:
                if held_by_systemd(self.systemd_path, self.path):
                    raise ConfigError(
                        f"systemd's socket unit holds {self.path}: its service starts at the"
                        " next connection or restart (systemctl start migsgx-platform.service)"
                    )
                sock = self._bind_fresh()
                with contextlib.suppress(FileNotFoundError):
                    self.systemd_path.unlink()
                self.origin = "bound"
                if self.keep_for > 0:
                    self._start_keeper(sock)
        return sock

    def close(self) -> None:
        """The service ends for good: remove the socket, end its keeper (idempotent)."""

        if self.origin in ("kept", "bound"):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.origin:
            with contextlib.suppress(FileNotFoundError):
                self.status_path.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- one service per socket ------------------------------------------------------
    def _lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise ConfigError(
                f"another platform service serves {self.path} for this state directory"
                f" (it holds {self.lock_path})"
            ) from exc
        self._lock_fd = fd

    def _mark_systemd(self) -> None:
        with contextlib.suppress(OSError):
            self.systemd_path.write_text(_mark_file(self.path))

    # --- a fresh socket --------------------------------------------------------------
    def _set_mode(self, path: Path) -> None:
        # Like /dev/sgx_enclave: the service's user and a configured group, nobody else.
        if self.group is not None:
            os.chown(path, -1, self.group)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)

    def _bind_fresh(self) -> socket.socket:
        """Bound under a temporary name and renamed once listening, so the socket is
        never reachable with looser permissions, nor visible before it accepts.  The
        temporary name is no longer than the socket's own: any path that fits binds."""

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging = self.path.with_name(f".s{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        old = os.umask(0o177)
        try:
            sock.bind(str(staging))
        finally:
            os.umask(old)
        self._set_mode(staging)
        sock.listen(BACKLOG)
        os.replace(staging, self.path)
        return sock

    # --- the keeper ------------------------------------------------------------------
    def _take_back(self) -> socket.socket | None:
        kept = take_back(self.tag, self.path)
        if kept is None:
            return None
        sock, channel, pid = kept
        self._keeper = KeeperLink(self.tag, self.path, self.keep_for, self.write_status)
        self._keeper.adopt(sock, channel, pid)
        return sock

    def _start_keeper(self, sock: socket.socket) -> None:
        self._keeper = KeeperLink(self.tag, self.path, self.keep_for, self.write_status)
        self._keeper.start(sock)

    # --- what the service says of its socket -----------------------------------------
    def status(self) -> dict[str, object]:
        """The socket's health: where it came from and who keeps it for a restart
        (``keeper``: ``running``, ``starting``, ``missing``; ``none`` when nothing
        keeps it by design: systemd holds it, or ``--keep-socket 0``)."""

        out: dict[str, object] = {"service_pid": os.getpid(), "socket": str(self.path),
                                  "origin": self.origin}  # fmt: skip
        if self._keeper is not None:
            out.update(self._keeper.status())
        else:
            out.update({"keeper": "none", "keeper_pid": None, "keeper_restarts": 0})
        return out

    def write_status(self) -> None:
        """``STATE/serve-<tag>.json`` (:func:`read_status`), and systemd's ``STATUS=``."""

        status = self.status()
        with self._status_lock, contextlib.suppress(OSError):  # (the keeper's watch writes too)
            tmp = self.status_path.with_name(self.status_path.name + ".tmp")
            tmp.write_text(json.dumps(status) + "\n")
            tmp.replace(self.status_path)
        keeper_state = status["keeper"]
        notify(f"STATUS=serving {self.path}; socket keeper: {keeper_state}")


def read_status(state_dir: Path, path: Path) -> dict[str, object] | None:
    """What the service of ``path`` last said of its socket (:meth:`Listener.status`),
    with ``running``: whether it still runs (it holds its lock); None if none ever ran."""

    listener = Listener(state_dir, path, group=None)
    try:
        status = json.loads(listener.status_path.read_text())
        pid = int(status["service_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    argv = _proc.argv(pid)
    status["running"] = _proc.alive(pid) and b"serve" in argv and b"platform" in argv
    return dict(status)


def _from_systemd(path: Path) -> socket.socket | None:
    """The socket systemd passed (``sd_listen_fds``), checked to be this path's; None if none.

    The variables are removed, so that no child takes them for its own.
    """

    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or count is None or count == "0":
        return None
    if count != "1":
        raise ConfigError(f"systemd passed {count} sockets; the platform service takes one")
    os.set_inheritable(_SD_LISTEN_FDS_START, False)
    try:
        sock = socket.socket(fileno=_SD_LISTEN_FDS_START)
    except OSError as exc:
        raise ConfigError(f"systemd passed a descriptor that is no socket ({exc})") from exc
    if (
        sock.family != socket.AF_UNIX
        or sock.type != socket.SOCK_STREAM
        or not _same_file(sock.getsockname(), path)
    ):
        name = sock.getsockname() if sock.family == socket.AF_UNIX else "another kind of socket"
        sock.close()
        raise ConfigError(
            f"systemd passed {name!s}, not a stream socket at {path}: make the socket"
            " unit's ListenStream= the service's --socket"
        )
    return sock


def _same_file(name: str, path: Path) -> bool:
    """Whether the socket address ``name`` (as ListenStream= wrote it: its parent
    directories may be symbolic links) names the file at ``path``."""

    try:
        a, b = os.stat(name), os.stat(path)
    except (OSError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# --- systemd ----------------------------------------------------------------------------
def _mark_file(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev} {st.st_ino}\n"


def held_by_systemd(marker: Path, path: Path) -> bool:
    """Whether a systemd socket unit holds the socket at ``path``: a service it passed
    the socket to left ``marker`` naming this very file, and something listens on it
    (systemd: its service starts at the next connection, or after ``RestartSec=``).  A
    service or an agent starting its own would take the socket from the unit."""

    try:
        if marker.read_text() != _mark_file(path):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(2.0)
            sock.connect(str(path))
        except OSError:
            return False  # (nothing listens: the unit is stopped, the file is stale)
    return True


_notify_address: list[str] = []


def take_notify_socket() -> None:
    """Take ``$NOTIFY_SOCKET`` out of the environment, for :func:`notify` alone, before
    the service starts any process (a keeper, an enclave): none may say ``READY=1``."""

    where = os.environ.pop("NOTIFY_SOCKET", None)
    if where:
        _notify_address[:] = ["\0" + where[1:] if where.startswith("@") else where]


def notify(message: str) -> None:
    """Say ``message`` (``READY=1``, ``STATUS=...``) to systemd, as ``sd_notify``."""

    take_notify_socket()
    if not _notify_address:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(f"{message}\nMAINPID={os.getpid()}".encode(), _notify_address[0])


def notify_ready() -> None:
    """``READY=1`` (systemd's ``Type=notify``; :mod:`.spawn` waits for it too): the
    service accepts now."""

    notify("READY=1")


def platform_socket_alive(path: Path) -> bool:
    """Whether a platform service listens on ``path``: a connection alone does not
    tell (a keeper holds the socket of a service that died, for its restart; a child
    the service forked may hold it a moment after the service died), so the process
    that listened (``SO_PEERCRED``) must be alive too, and not a zombie."""

    pid = listener_pid(path)
    return pid is not None and _proc.alive(pid)


def listener_pid(path: Path) -> int | None:
    """The pid that last listened on the socket at ``path`` (``SO_PEERCRED``, as a
    connection shows); None if nothing accepts there."""

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(2.0)
            sock.connect(str(path))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return None
    return int.from_bytes(creds[:4], "little")
