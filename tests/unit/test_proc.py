"""``migsgx._proc``: processes read from ``/proc``, with real processes of this test.

Each read is tried on a live process, a zombie, and one that is gone, and the
scans on a process that exits between the listing of ``/proc`` and the reads
that follow it (made to exit there, not raced for).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from migsgx import _proc


def _sleeper() -> subprocess.Popen[bytes]:
    """A ``sleep`` child, once its ``exec`` finished: ``Popen`` returns while the kernel
    still sets the new program's arguments up (its ``cmdline`` is empty until then)."""

    proc = subprocess.Popen(["sleep", "300"])
    assert _until(lambda: _proc.argv(proc.pid) == [b"sleep", b"300"])
    return proc


def _until(done: Callable[[], bool]) -> bool:
    """Whether ``done`` came true within 10 s (a child's first steps)."""

    deadline = time.monotonic() + 10
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = _sleeper()
    yield proc
    _end(proc)


@pytest.fixture
def gone() -> int:
    """A pid that named a process of this test, reaped: nothing there now (pids are not
    reused this quickly)."""

    proc = _sleeper()
    _end(proc)
    return proc.pid


@pytest.fixture
def zombie() -> Iterator[int]:
    """A child that exited and is not reaped yet."""

    proc = _sleeper()
    os.kill(proc.pid, signal.SIGKILL)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # (exited, still a zombie)
    yield proc.pid
    proc.wait()


def test_a_live_process_reads_as_itself(sleeper: subprocess.Popen[bytes]) -> None:
    pid = sleeper.pid
    assert pid in _proc.pids()
    assert _proc.parent(pid) == os.getpid()
    assert _proc.state(pid) in ("R", "S")
    assert _proc.alive(pid)
    assert _proc.argv(pid) == [b"sleep", b"300"]
    assert _proc.comm(pid) == "sleep"
    assert _proc.status_field(pid, "PPid") == str(os.getpid())
    assert _proc.status_field(pid, "NoSuchLine") is None
    started = _proc.start_time(pid)
    assert started >= _proc.start_time(os.getpid()) > 0
    assert _proc.start_time(pid) == started  # (names the one process for good)


def test_a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() -> None:
    """``stat``'s fields follow the command name, which a process may set to anything."""

    code = "open('/proc/self/comm', 'w').write(') R 1 (x'); import time; time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert _until(lambda: _proc.comm(proc.pid) == ") R 1 (x")
        assert _proc.parent(proc.pid) == os.getpid()
        assert _proc.state(proc.pid) in ("R", "S")
    finally:
        _end(proc)


def test_a_zombie_is_not_alive_and_has_no_command_line(zombie: int) -> None:
    assert _proc.state(zombie) == "Z"
    assert not _proc.alive(zombie)
    assert _proc.parent(zombie) == os.getpid()
    assert _proc.argv(zombie) == []
    assert list(_proc.fd_links(zombie)) == []


def test_a_process_that_is_gone_reads_as_gone_everywhere(gone: int) -> None:
    assert gone not in _proc.pids()
    assert _proc.stat(gone) is None
    assert _proc.state(gone) == ""
    assert not _proc.alive(gone)
    assert _proc.parent(gone) is None
    assert _proc.start_time(gone) == 0
    assert _proc.argv(gone) == []
    assert _proc.comm(gone) == ""
    assert _proc.status_field(gone, "PPid") is None
    assert _proc.children(gone) == []
    assert _proc.scanned_children(gone) == []
    assert _proc.descendants(gone) == []
    assert list(_proc.fd_links(gone)) == []
    assert _proc.socket_inodes([gone]) == set()
    assert not _proc.holds(gone, "socket:[1]")
    with pytest.raises(OSError):
        list(_proc.fd_links(gone, gone_ok=False))


def test_children_and_descendants_of_a_tree() -> None:
    """sh (child) -> sleep (grandchild): children lists one level, descendants all."""

    shell = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
    try:
        assert _until(lambda: bool(_proc.children(shell.pid)))
        (grandchild,) = _proc.children(shell.pid)
        assert _until(lambda: _proc.argv(grandchild) == [b"sleep", b"300"])  # (its exec done)
        assert shell.pid in _proc.children(os.getpid())
        assert shell.pid in _proc.scanned_children(os.getpid())
        assert _proc.scanned_children(shell.pid) == [grandchild]
        below = _proc.descendants(os.getpid())
        assert shell.pid in below and grandchild in below
        assert below.index(shell.pid) < below.index(grandchild)
    finally:
        for pid in _proc.children(shell.pid):
            os.kill(pid, signal.SIGKILL)
        _end(shell)


def test_a_process_that_exits_mid_scan_is_left_out(
    monkeypatch: pytest.MonkeyPatch, sleeper: subprocess.Popen[bytes]
) -> None:
    """The victim is listed in ``/proc``, then ends and is reaped before its ``stat`` is read."""

    victim = _sleeper()
    listed: list[int] = []
    real_pids = _proc.pids

    def pids_then_exit() -> list[int]:
        found = real_pids()
        listed.extend(found)
        _end(victim)
        return found

    monkeypatch.setattr(_proc, "pids", pids_then_exit)
    mine = _proc.scanned_children(os.getpid())
    assert victim.pid in listed
    assert sleeper.pid in mine
    assert victim.pid not in mine


def test_a_descriptor_closed_mid_scan_is_passed_over() -> None:
    """``fd_links`` lists the descriptors first: one closed after that is skipped, not an error."""

    a, b = socket.socketpair()
    inode = {a.fileno(): os.fstat(a.fileno()).st_ino, b.fileno(): os.fstat(b.fileno()).st_ino}
    links = _proc.fd_links(os.getpid())
    first, _ = next(links)
    later = b if first != b.fileno() else a
    later_fd = later.fileno()
    later.close()
    rest = dict(links)
    assert later_fd not in rest
    other = a if later is b else b
    assert first == other.fileno() or rest[other.fileno()] == f"socket:[{inode[other.fileno()]}]"
    other.close()


def test_sockets_held_are_found_by_inode() -> None:
    a, b = socket.socketpair()
    with a, b:
        ino = os.fstat(a.fileno()).st_ino
        assert ino in _proc.socket_inodes([os.getpid()])
        assert _proc.holds(os.getpid(), f"socket:[{ino}]")
    assert ino not in _proc.socket_inodes([os.getpid()])
    assert not _proc.holds(os.getpid(), f"socket:[{ino}]")
