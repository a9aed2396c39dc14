"""``__mig_watch``: the driver's re-read of who holds an enclave connection replaces the
set named with the hold.

The enclave's :class:`~migsgx.enclave.hold.Hold` on one end of a socket pair, the
driver's end passing real pidfds of real child processes with ``SCM_RIGHTS``; the
wire checked with hypothesis (whatever comes, a clear refusal, every descriptor
closed, the set unchanged); the refusal of a committed enclave through its
:class:`~migsgx.enclave.app_channel.AppChannel`; the driver's scan of ``/proc``.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migsgx.agent.holders import _running, connection_holders, watch_holders
from migsgx.channel import ECALL, ECALL_FRAME_MAX, HOLD_WATCHED, WATCH_BYTE
from migsgx.enclave.app_channel import AppChannel
from migsgx.enclave.hold import Hold, NotThisHoldError
from migsgx.errors import ProtocolError
from migsgx.wire import recv_frame

NONCE = b"n" * 16


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    enclave, driver = socket.socketpair()
    yield enclave, driver
    enclave.close()
    driver.close()


@pytest.fixture
def spawn() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _send(
    driver: socket.socket, pids: list[int], extra: Sequence[int] = (), data: bytes = b"H"
) -> None:
    pidfds = [os.pidfd_open(pid) for pid in pids]
    try:
        socket.send_fds(driver, [data], [*extra, *pidfds])
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


def _held(
    enclave: socket.socket,
    driver: socket.socket,
    pids: list[int],
    log: Callable[[str], None] = lambda _: None,
    may_let_go: Callable[[], bool] = lambda: True,
) -> Hold:
    hold = Hold(log, may_let_go)
    _send(driver, pids, [driver.fileno()])
    hold.take(enclave, [NONCE])
    return hold


def _until(check: Callable[[], bool]) -> bool:
    """Whether ``check`` holds within 10 s (the watch looks every second)."""

    for _ in range(200):
        if check():
            return True
        time.sleep(0.05)
    return False


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_new_set_replaces_the_one_named_with_the_hold(
    pair: tuple[socket.socket, socket.socket], spawn: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """Named with the hold: a parent that lets the connection go; re-read: two processes
    that hold it.  After the abort the parent's exit is not looked at, the first real
    holder's exit is reported with one still live, and the last one's lets go."""

    enclave, driver = pair
    logs: list[str] = []
    parent, forked, other = spawn(), spawn(), spawn()
    hold = _held(enclave, driver, [parent.pid], logs.append)
    _send(driver, [forked.pid, other.pid], data=WATCH_BYTE)
    assert hold.rewatch(enclave, [NONCE]) == 2
    hold.kept_after_abort()
    parent.kill()
    parent.wait()
    other.kill()
    other.wait()
    assert _until(lambda: bool(logs)), "the watch reported nothing"
    assert "1 named still live" in logs[0], logs  # (the parent was not watched)
    assert hold.held
    forked.kill()
    forked.wait()
    assert _until(lambda: not hold.held)


def test_a_set_sent_after_the_abort_is_followed_at_once(
    pair: tuple[socket.socket, socket.socket], spawn: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """The driver's order: abort (the watch starts on the hold's set), then the re-read,
    then the tree continues.  The re-read's set takes over from the running watch."""

    enclave, driver = pair
    logs: list[str] = []
    parent, forked = spawn(), spawn()
    hold = _held(enclave, driver, [parent.pid], logs.append)
    hold.kept_after_abort()
    _send(driver, [forked.pid], data=WATCH_BYTE)
    assert hold.rewatch(enclave, [NONCE]) == 1
    parent.kill()  # named with the hold only: its exit lets nothing go
    parent.wait()
    forked_gone = spawn()  # (a third process, killed, to see the watch look)
    _send(driver, [forked.pid, forked_gone.pid], data=WATCH_BYTE)
    assert hold.rewatch(enclave, [NONCE]) == 2
    forked_gone.kill()
    forked_gone.wait()
    assert _until(lambda: bool(logs)), "the watch reported nothing"
    assert "1 named still live" in logs[0], logs
    assert hold.held
    forked.kill()
    forked.wait()
    assert _until(lambda: not hold.held)


def test_a_committed_enclave_never_lets_its_duplicate_go(
    pair: tuple[socket.socket, socket.socket], spawn: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """A lying set naming only exited processes, after an abort, on an enclave that
    committed since: the duplicate stays (the state may be the only copy)."""

    enclave, driver = pair
    logs: list[str] = []
    gone = spawn()
    hold = _held(enclave, driver, [gone.pid], logs.append, may_let_go=lambda: False)
    hold.kept_after_abort()
    gone.kill()
    gone.wait()
    assert _until(lambda: bool(logs))
    assert "committed" in logs[0] and hold.held, logs


def test_a_committed_enclave_refuses_the_call(
    pair: tuple[socket.socket, socket.socket], spawn: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """Through the enclave's reader: ``committed``, its descriptors read and closed, the
    connection still in step (the next answer decodes)."""

    enclave, driver = pair
    channel = AppChannel(enclave)
    channel.migrator = SimpleNamespace(committed=True)  # type: ignore[assignment]
    proc = spawn()
    before = _open_fds()
    _send(driver, [proc.pid], data=WATCH_BYTE)
    channel._hold(5, "__mig_watch", [NONCE])
    reply = recv_frame(driver, ECALL, max_size=ECALL_FRAME_MAX)
    assert reply["t"] == "err" and reply["code"] == "committed" and reply["id"] == 5
    assert _open_fds() == before
    channel.migrator = SimpleNamespace(committed=False)  # type: ignore[assignment]
    _send(driver, [proc.pid], data=WATCH_BYTE)
    channel._hold(6, "__mig_watch", [NONCE])  # no hold: refused, in step
    reply = recv_frame(driver, ECALL, max_size=ECALL_FRAME_MAX)
    assert reply["t"] == "err" and reply["code"] == "not-this-hold" and reply["id"] == 6


def test_only_the_holds_driver_may_send_it(
    pair: tuple[socket.socket, socket.socket], spawn: Callable[[], subprocess.Popen[bytes]]
) -> None:
    enclave, driver = pair
    proc = spawn()
    hold = Hold(lambda _: None)
    _send(driver, [proc.pid], data=WATCH_BYTE)
    with pytest.raises(NotThisHoldError, match="holds no duplicate"):
        hold.rewatch(enclave, [NONCE])
    _send(driver, [], [driver.fileno()])
    hold.take(enclave, [])  # a hold without a nonce: nobody can prove it is its driver
    _send(driver, [proc.pid], data=WATCH_BYTE)
    with pytest.raises(NotThisHoldError, match="another hold"):
        hold.rewatch(enclave, [NONCE])
    _send(driver, [proc.pid], [driver.fileno()])
    hold.take(enclave, [NONCE])
    _send(driver, [proc.pid], data=WATCH_BYTE)
    with pytest.raises(NotThisHoldError, match="another hold"):
        hold.rewatch(enclave, [b"m" * 16])


_ARG = st.one_of(
    st.binary(max_size=80), st.text(max_size=8), st.integers(), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=2), st.just(NONCE),
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    args=st.lists(_ARG, max_size=3),
    count=st.integers(0, HOLD_WATCHED + 2),
    data=st.sampled_from([WATCH_BYTE, b"H", b"\x00"]),
)
def test_garbage_is_refused_clearly_and_leaks_nothing(
    args: list[object], count: int, data: bytes
) -> None:
    """Any args, any number of descriptors, any byte: a ProtocolError or
    NotThisHoldError (or the call taken, when everything is right), every
    descriptor received closed on a refusal, the set left as it was."""

    enclave, driver = socket.socketpair()
    with enclave, driver:
        hold = Hold(lambda _: None)
        _send(driver, [os.getpid()], [driver.fileno()])
        hold.take(enclave, [NONCE])
        named = list(hold._apps)
        before = _open_fds()
        pidfds = [os.pidfd_open(os.getpid()) for _ in range(count)]
        try:
            socket.send_fds(driver, [data], pidfds) if pidfds else driver.send(data)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        good = args == [NONCE] and 1 <= count <= HOLD_WATCHED and data == WATCH_BYTE
        try:
            taken = hold.rewatch(enclave, args)
        except (ProtocolError, NotThisHoldError) as exc:
            assert not good, exc
            assert hold._apps == named
            assert _open_fds() == before
        else:
            assert good and taken == count
            assert _open_fds() == before + count - len(named)
        hold.drop()


def test_the_driver_finds_every_process_that_holds_the_connection() -> None:
    """One scan of /proc: a process that holds the socket is found wherever it is; one
    that holds only the other end is not."""

    ours, theirs = socket.socketpair()
    with ours, theirs:
        inode = os.fstat(ours.fileno()).st_ino
        script = "import sys, time; print('up', flush=True); time.sleep(60)"
        holder = subprocess.Popen([sys.executable, "-c", script], pass_fds=[ours.fileno()],
                                  stdout=subprocess.PIPE)  # fmt: skip
        other = subprocess.Popen([sys.executable, "-c", script], pass_fds=[theirs.fileno()],
                                 stdout=subprocess.PIPE)  # fmt: skip
        try:
            for proc in (holder, other):
                assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
            found = connection_holders({inode})
            assert sorted(found[inode]) == sorted([os.getpid(), holder.pid])
        finally:
            for proc in (holder, other):
                proc.kill()
                proc.wait()
                assert proc.stdout is not None
                proc.stdout.close()
        assert connection_holders({inode}) == {inode: [os.getpid()]}


def _sleeper(fd: int) -> subprocess.Popen[bytes]:
    script = "import sys, time; print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], pass_fds=[fd], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def test_no_watch_while_a_holder_outside_the_fence_can_write() -> None:
    """A process that holds the application's end and is not stopped (a child forked
    after the hold whose parent exited is outside the fenced tree) could write an
    ECALL between the watch's frame and its descriptor message: nothing is sent, the
    enclave keeps the set named with its hold.  Stopped, it is no longer a reason."""

    app_end, enclave_end = socket.socketpair()
    with app_end, enclave_end:
        enclave = _sleeper(enclave_end.fileno())
        holder = _sleeper(app_end.fileno())
        try:
            record = [[enclave.pid, enclave_end.fileno(), 0, NONCE.hex()]]
            assert watch_holders([app_end], record, None) == []
            with pytest.raises(BlockingIOError):
                enclave_end.recv(1, socket.MSG_DONTWAIT)  # nothing was written
            assert _running([holder.pid]) == [holder.pid]
            os.kill(holder.pid, signal.SIGSTOP)
            assert _running([holder.pid]) == []  # (the stop shows within the settle time)
        finally:
            _end(enclave)
            _end(holder)
        assert _running([holder.pid]) == []  # gone: nothing can write


def test_a_watch_with_a_descriptor_that_is_no_pidfd_is_refused(
    pair: tuple[socket.socket, socket.socket], spawn: Callable[[], subprocess.Popen[bytes]]
) -> None:
    enclave, driver = pair
    proc = spawn()
    hold = _held(enclave, driver, [proc.pid])
    named = list(hold._apps)
    reader, writer = os.pipe()
    try:
        _send(driver, [proc.pid], [reader], data=WATCH_BYTE)
        before = _open_fds()
        with pytest.raises(ProtocolError, match="must be pidfds"):
            hold.rewatch(enclave, [NONCE])
        assert hold._apps == named and _open_fds() == before
    finally:
        os.close(reader)
        os.close(writer)
        hold.drop()


def test_a_failed_duplicate_leaves_the_set_as_it_was(
    pair: tuple[socket.socket, socket.socket],
    spawn: Callable[[], subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After an abort the watch duplicates the new set; a dup that fails (no descriptor
    left) refuses the call with nothing changed and nothing leaked."""

    enclave, driver = pair
    first, second = spawn(), spawn()
    hold = _held(enclave, driver, [first.pid])
    hold.kept_after_abort()
    named = list(hold._apps)
    _send(driver, [second.pid, first.pid], data=WATCH_BYTE)
    before = _open_fds()
    real_dup, calls = os.dup, []

    def dup(fd: int) -> int:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_dup(fd)

    monkeypatch.setattr(os, "dup", dup)
    with pytest.raises(OSError, match="Too many"):
        hold.rewatch(enclave, [NONCE])
    monkeypatch.setattr(os, "dup", real_dup)
    assert hold._apps == named
    assert _open_fds() == before  # the two received and the one duplicated closed
    hold.drop()
