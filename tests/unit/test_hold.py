"""The duplicate an aborted enclave keeps, the watch on its application, and its nonce.

Both ends in this process (the enclave's :class:`~migsgx.enclave.hold.Hold` on
one end of a socket pair, the driver's end passed with ``SCM_RIGHTS``), the
application a real child process named by a real pidfd.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from migsgx.enclave import hold as hold_module
from migsgx.enclave.hold import Hold, NotThisHoldError, State
from migsgx.errors import ProtocolError


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    enclave, driver = socket.socketpair()
    yield enclave, driver
    enclave.close()
    driver.close()


@pytest.fixture
def app() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child
    child.kill()
    child.wait()


def _hold(hold: Hold, enclave: socket.socket, driver: socket.socket, pid: int | None,
          nonce: bytes = b"") -> int:  # fmt: skip
    fds = [driver.fileno()]
    pidfd = os.pidfd_open(pid) if pid is not None else None
    if pidfd is not None:
        fds.append(pidfd)
    try:
        socket.send_fds(driver, [b"H"], fds)
        return hold.take(enclave, [nonce] if nonce else [])
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _let_go(hold: Hold) -> bool:
    """Whether the hold is let go within 10 s (the watch looks every second)."""

    for _ in range(200):
        if not hold.held:
            return True
        time.sleep(0.05)
    return False


def test_an_aborted_hold_is_let_go_when_the_application_exits(
    pair: tuple[socket.socket, socket.socket], app: subprocess.Popen[bytes]
) -> None:
    enclave, driver = pair
    hold = Hold(lambda _: None)
    number = _hold(hold, enclave, driver, app.pid)
    assert number > 2 and hold.held
    hold.kept_after_abort()
    app.kill()
    app.wait()
    assert _let_go(hold)
    with pytest.raises(OSError):
        os.fstat(number)  # closed: the driver's end is ours no more


def test_no_watch_before_the_abort_nor_for_a_live_application(
    pair: tuple[socket.socket, socket.socket], app: subprocess.Popen[bytes]
) -> None:
    """The application frozen, dumped, or even gone during the migration: the hold stays
    until an abort keeps it; a live application's hold stays after the abort too."""

    enclave, driver = pair
    hold = Hold(lambda _: None)
    _hold(hold, enclave, driver, app.pid)
    app.kill()
    app.wait()
    time.sleep(1.5)
    assert hold.held  # no abort yet: a migration may be under way
    hold.kept_after_abort()
    assert _let_go(hold)  # (it exited before the abort: let go at once)

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _hold(hold, enclave, driver, live.pid)
        hold.kept_after_abort()
        time.sleep(1.5)
        assert hold.held
        hold.drop()  # __mig_unhold
        assert not hold.held
    finally:
        live.kill()
        live.wait()


def test_a_new_hold_is_not_let_go_by_the_old_watch(
    pair: tuple[socket.socket, socket.socket], app: subprocess.Popen[bytes]
) -> None:
    """The first hold's watch names another process; the second hold names none."""

    enclave, driver = pair
    hold = Hold(lambda _: None)
    _hold(hold, enclave, driver, app.pid)
    hold.kept_after_abort()
    _hold(hold, enclave, driver, None)  # a new migration: no abort yet
    app.kill()
    app.wait()
    time.sleep(1.5)
    assert hold.held


def test_the_nonce_names_the_hold(pair: tuple[socket.socket, socket.socket]) -> None:
    enclave, driver = pair
    hold = Hold(lambda _: None)
    with pytest.raises(NotThisHoldError):
        hold.check([b"first"])  # none held
    _hold(hold, enclave, driver, None, b"first")
    hold.check([b"first"])
    _hold(hold, enclave, driver, None, b"second")  # a later migration's
    with pytest.raises(NotThisHoldError, match="another migration"):
        hold.check([b"first"])
    hold.check([b"second"])
    with pytest.raises(ProtocolError):
        hold.check([])
    socket.send_fds(driver, [b"H"], [driver.fileno()])  # (its descriptor comes: no wait)
    with pytest.raises(ProtocolError, match="a nonce of at most 64 bytes"):
        hold.take(enclave, [b"x" * 65])
    hold.check([b"second"])  # the refused call changed nothing


def test_a_hold_whose_descriptors_never_come_is_refused_after_its_wait(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    enclave, driver = pair
    monkeypatch.setattr(hold_module, "HOLD_WAIT", 0.2)
    hold = Hold(lambda _: None)
    with pytest.raises(ProtocolError, match="comes with its descriptors"):
        hold.take(enclave, [b"first"])
    assert not hold.held
    driver.sendall(b"x")  # anything but its descriptors: left unread, refused the same
    with pytest.raises(ProtocolError, match="comes with its descriptors"):
        hold.take(enclave, [b"first"])
    assert enclave.recv(1) == b"x" and not hold.held


def test_a_hold_naming_several_processes_is_let_go_with_the_last(
    pair: tuple[socket.socket, socket.socket], app: subprocess.Popen[bytes]
) -> None:
    """A parent and the child it forked, which holds the connection too: the parent's
    exit keeps the duplicate (the child may go on using the enclave), the child's lets
    it go."""

    enclave, driver = pair
    logs: list[str] = []
    hold = Hold(logs.append)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pidfds = [os.pidfd_open(app.pid), os.pidfd_open(child.pid)]
        try:
            socket.send_fds(driver, [b"H"], [driver.fileno(), *pidfds])
            hold.take(enclave, [])
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        hold.kept_after_abort()
        app.kill()
        app.wait()
        for _ in range(200):  # (the watch reports the first exit)
            if logs:
                break
            time.sleep(0.05)
        assert logs and "the duplicate stays" in logs[0], logs
        assert hold.held
        child.kill()
        child.wait()
        assert _let_go(hold)
    finally:
        child.kill()
        child.wait()


def test_an_abort_asked_again_arms_no_second_watch(
    pair: tuple[socket.socket, socket.socket], app: subprocess.Popen[bytes]
) -> None:
    """A stopped enclave asked to abort many times answers them all once continued:
    one watch per hold, not one thread and a set of duplicated pidfds per answer."""

    enclave, driver = pair
    hold = Hold(lambda _: None)
    _hold(hold, enclave, driver, app.pid)
    before = os.listdir("/proc/self/fd")
    for _ in range(20):
        hold.kept_after_abort()
    watches = [t for t in threading.enumerate() if t.name == "hold-watch"]
    assert len(watches) == 1
    assert len(os.listdir("/proc/self/fd")) == len(before) + 1  # (one pidfd duplicated)
    app.kill()
    app.wait()
    assert _let_go(hold)


def test_a_destination_hold_is_let_go_once_its_tree_is_gone_even_undecided(
    pair: tuple[socket.socket, socket.socket], app: subprocess.Popen[bytes]
) -> None:
    """A destination's hold (W3), armed from the hold on: its tree gone, the duplicate
    goes though the state is undecided (a source's stays then: the next cell)."""

    enclave, driver = pair
    state: list[State] = ["busy"]
    hold = Hold(lambda _: None, state=lambda: state[0])
    _hold(hold, enclave, driver, app.pid, b"n" * 16)
    hold.kept_after_abort(destination=True)
    app.kill()
    app.wait()
    assert _let_go(hold)


def test_a_source_hold_is_kept_while_busy_though_its_application_is_gone(
    pair: tuple[socket.socket, socket.socket], app: subprocess.Popen[bytes]
) -> None:
    enclave, driver = pair
    logs: list[str] = []
    hold = Hold(logs.append, state=lambda: "busy")
    _hold(hold, enclave, driver, app.pid, b"n" * 16)
    hold.kept_after_abort()
    app.kill()
    app.wait()
    for _ in range(200):  # (the watch says so once it looked)
        if any("its duplicate stays" in line for line in logs):
            break
        time.sleep(0.05)
    assert hold.held and any("its duplicate stays" in line for line in logs)
