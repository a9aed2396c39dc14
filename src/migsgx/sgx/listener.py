"""The platform service's listening socket: where it is, who may use it, and how it
outlives a restart of the service.

Three ways to the socket, in this order (:meth:`Listener.open`):

1. **systemd socket activation** (``LISTEN_PID``/``LISTEN_FDS``, as ``sd_listen_fds``):
   systemd holds the socket (``deploy/systemd/migsgx-platform.socket``) and passes
   the same one to every start of the service.
2. **Taken back from the keeper** (:mod:`.keeper`) that a killed service of this
   socket left: the same socket, the same inode, with the connections that
   queued while no service ran.
3. **Bound fresh**, then handed to a new keeper.

One service per socket: an exclusive ``flock`` on ``STATE/serve-<tag>.lock``,
held while the service runs (released by the kernel when it dies), refuses a
second one before it touches the socket.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Final

from .. import _proc
from .._fds import take_descriptor
from ..errors import ConfigError
from . import keeper

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
        self.sock: socket.socket | None = None
        #: ``systemd``, ``kept`` (taken back from a keeper) or ``bound`` (fresh).
        self.origin = ""
        self._lock_fd: int | None = None
        self._control: socket.socket | None = None

    def open(self) -> socket.socket:
        if len(os.fsencode(self.path)) > SUN_PATH_MAX:
            raise ConfigError(
                f"the platform socket path {self.path} is longer than a Unix socket "
                f"address can be ({SUN_PATH_MAX} bytes): choose a shorter state directory"
            )
        self._lock()
        try:
            sock = self._open()
        except BaseException:
            if self.origin == "kept":
                # (a restart that failed after the take-back, its mode or group say: the
                # keeper keeps the socket for the next service, as after a crash)
                if self._control is not None:
                    self._control.close()
                    self._control = None
                self.origin = ""
            self.close()
            raise
        # listen() again: connections name this service as the socket's owner
        # (SO_PEERCRED), not the one that bound it.
        sock.listen(BACKLOG)
        self.sock = sock
        return sock

    def _open(self) -> socket.socket:
        make_socket_dir(self.path.parent, self.group)
        sock = _from_systemd(self.path)
        if sock is not None:
            self.origin = "systemd"
        else:
            kept = self._take_back()
            if kept is not None:
                sock, self._control = kept
                self.origin = "kept"
                self._set_mode(self.path)
            else:
                sock = self._bind_fresh()
                self.origin = "bound"
                if self.keep_for > 0:
                    self._start_keeper(sock)
        return sock

    def close(self) -> None:
        """The service ends for good: remove the socket, end its keeper (idempotent)."""

        if self.origin in ("kept", "bound"):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.send(keeper.END)
            self._control.close()
            self._control = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
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
    def _start_keeper(self, sock: socket.socket) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reserve, reserve_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (sock.fileno(), theirs.fileno(), reserve.fileno(), reserve_peer.fileno())
        argv = [sys.executable, "-P", "-m", keeper.MODULE,
                "--listener", str(fds[0]), "--control", str(fds[1]),
                "--reserve", str(fds[2]), "--reserve-peer", str(fds[3]),
                "--socket-tag", self.tag, "--path", str(self.path),
                "--keep-for", str(self.keep_for)]  # fmt: skip
        try:
            # Output to nowhere: a keeper must not hold the service's stdout or stderr
            # (a pipe its reader waits on) after the service died.
            # Started in the background by a shell that exits at once: the keeper is
            # no child of the service, whose children stay its enclaves alone.
            starter = subprocess.Popen(
                ["/bin/sh", "-c", '"$@" &', "migsgx-keeper", *argv],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            starter.wait()
        except OSError:
            ours.close()  # no keeper: the socket lives as long as this service
        else:
            self._control = ours
        finally:
            theirs.close()
            reserve.close()
            reserve_peer.close()

    def _take_back(self) -> tuple[socket.socket, socket.socket] | None:
        """The socket a keeper of this path holds, and the keeper's channel; None if none.

        The keeper must run as this service's user, answer on its reserve channel,
        and hand over a listening Unix socket bound to this path whose file is the
        one at the path now.  Anything else is not adopted (a foreign socket).
        """

        for pid, peer_fd in _keepers_of(self.tag):
            if not _same_user(pid) or not _same_pid_namespace(pid):
                continue
            try:
                channel = take_descriptor(pid, peer_fd)
            except OSError:
                continue  # gone, or not ours to take
            got = _ask(channel, self.path)
            if got is not None:
                return got, channel
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


def _ask(channel: socket.socket, path: Path) -> socket.socket | None:
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
        if len(msg) == keeper.GIVE_LAYOUT.size and _is_ours(sock, path, msg):
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _is_ours(sock: socket.socket, path: Path, msg: bytes) -> bool:
    kind, dev, ino = keeper.GIVE_LAYOUT.unpack(msg)
    st = os.stat(path)
    return (
        kind == keeper.GIVE
        and stat.S_ISSOCK(st.st_mode)
        and (st.st_dev, st.st_ino) == (dev, ino)
        and sock.family == socket.AF_UNIX
        and sock.type == socket.SOCK_STREAM
        and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        # (bound under its temporary name in the same directory, then renamed)
        and os.path.dirname(sock.getsockname()) == str(_absolute(path).parent)
    )


def _keepers_of(tag: str) -> list[tuple[int, int]]:
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


def notify_ready() -> None:
    """``READY=1`` to ``$NOTIFY_SOCKET`` (systemd's ``Type=notify``; :mod:`.spawn` waits
    for it too): the service accepts now.  Removed from the environment, as systemd's
    ``sd_notify`` does when asked, so that no enclave inherits it."""

    where = os.environ.pop("NOTIFY_SOCKET", None)
    if not where:
        return
    address = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(f"READY=1\nMAINPID={os.getpid()}".encode(), address)


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
