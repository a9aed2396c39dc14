"""What a restarted platform service adopts from a "keeper": only a listening Unix
socket at its own path, from its own pid namespace; anything else is refused and
closed, never an error that stops the service."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from migsgx.sgx import keeper
from migsgx.sgx.keepers import _ask, _same_pid_namespace
from migsgx.sgx.listener import _from_systemd, _same_file
from migsgx.sgx.sockdiag import bound_file, same_file


def _open_to(fd: int) -> int:
    """How many of this process's descriptors name what ``fd`` names."""

    target = os.readlink(f"/proc/self/fd/{fd}")
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == target
        except OSError:
            pass
    return count


def _keeper_giving(fd: int, dev: int, ino: int) -> socket.socket:
    """The service's end of a channel whose other end answers one TAKE with ``fd``."""

    ours, theirs = socket.socketpair()

    def answer() -> None:
        assert theirs.recv(1) == keeper.TAKE
        socket.send_fds(theirs, [keeper.GIVE_LAYOUT.pack(keeper.GIVE, dev, ino)], [fd])
        theirs.close()

    threading.Thread(target=answer, daemon=True).start()
    return ours


def test_a_pipe_given_for_the_listener_is_refused_and_closed(tmp_path: Path) -> None:
    path = tmp_path / "enclave.sock"
    path.touch()
    st = os.stat(path)
    r, w = os.pipe()
    channel = _keeper_giving(r, st.st_dev, st.st_ino)
    assert _ask(channel, path) is None  # (before: OSError ENOTSOCK out of the service's start)
    assert _open_to(r) == 2  # our two ends only: the received duplicate is closed
    channel.close()
    os.close(r)
    os.close(w)


def test_a_listener_elsewhere_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "enclave.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(tmp_path / "other.sock"))
    other.listen()
    path.touch()  # (a file at the path, not this listener's)
    st = os.stat(path)
    channel = _keeper_giving(other.fileno(), st.st_dev, st.st_ino)
    assert _ask(channel, path) is None
    channel.close()
    other.close()


def test_the_pid_namespace_is_the_services() -> None:
    assert _same_pid_namespace(os.getpid())
    assert not _same_pid_namespace(2**22 + 1)  # (no such process)


def test_systemd_socket_named_through_a_symbolic_link_is_the_same_file(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "link" / "enclave.sock"))  # (as ListenStream= wrote it)
        assert _same_file(sock.getsockname(), real / "enclave.sock")
        assert not _same_file(sock.getsockname(), tmp_path / "other.sock")


def test_no_socket_from_systemd_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert _from_systemd(Path("/nonexistent/enclave.sock")) is None
    assert "LISTEN_FDS" not in os.environ


def test_a_lookalike_listener_is_refused_on_the_kernel_s_word(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A "keeper" of the service's uid and pid namespace offers a listener bound in the
    socket's directory and names the file at the path (its device and inode), but the
    listener is bound to another file: ``sock_diag`` says which, and it is refused."""

    run = tmp_path / "run"
    run.mkdir()
    path = run / "enclave.sock"
    real = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    real.bind(str(path))
    lookalike = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lookalike.bind(str(run / ".s4242"))  # (as a service's temporary name, never renamed)
    lookalike.listen()
    st = os.stat(path)
    channel = _keeper_giving(lookalike.fileno(), st.st_dev, st.st_ino)
    assert _ask(channel, path) is None
    assert "the kernel says it is bound to" in capsys.readouterr().err
    channel.close()
    lookalike.close()
    real.close()


def test_the_listener_bound_to_the_path_is_adopted(tmp_path: Path) -> None:
    """Bound under a temporary name and renamed (as the service binds): the kernel says
    it is bound to the file at the path, and it is adopted."""

    run = tmp_path / "run"
    run.mkdir()
    path = run / "enclave.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(run / ".s1"))
    sock.listen()
    os.replace(run / ".s1", path)
    st = os.stat(path)
    bound = bound_file(sock)
    assert bound is not None and same_file(bound, st) and bound.name == str(run / ".s1")
    channel = _keeper_giving(sock.fileno(), st.st_dev, st.st_ino)
    adopted = _ask(channel, path)
    assert adopted is not None
    adopted.close()
    channel.close()
    sock.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        assert bound_file(unbound) is None
