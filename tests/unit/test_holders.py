"""Taking a held connection back: only from the recorded enclave process, only its own.

Real processes and sockets; ``pidfd_getfd`` needs root (``CAP_SYS_PTRACE``).  The
"enclave" here is a sleeping process whose command line names the enclave
runtime: what the check reads, so that the socket check is what decides.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from migsgx.agent import holders
from migsgx.agent.ckpt_journal import start_time
from migsgx.agent.holders import peer_inode, take_held

# The process says it runs once the interpreter does: until exec has finished, its command
# line reads empty (the kernel closes the spawner's close-on-exec pipe, and so lets Popen
# return, before it sets the new argument area), and the runtime check would refuse it.
_SLEEP = "import sys, time; print('up', flush=True); time.sleep(60)"


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _enclave_like_process(*fds: int) -> subprocess.Popen[bytes]:
    """A sleeping process named as an enclave runtime holding ``fds``, once it runs."""

    proc = subprocess.Popen(
        [sys.executable, "-c", _SLEEP, "migsgx.enclave.runtime"],
        pass_fds=fds,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    if proc.stdout.readline() != b"up\n":
        _stop(proc)
        raise AssertionError("the enclave-like process did not start")
    return proc


def test_the_kernel_names_the_other_end_of_a_connection() -> None:
    a, b = socket.socketpair()
    with a, b, socket.socket(socket.AF_UNIX) as lone:
        assert peer_inode(_inode(a)) == _inode(b) and peer_inode(_inode(b)) == _inode(a)
        assert peer_inode(_inode(lone)) == 0


@pytest.fixture
def enclave_like() -> Iterator[tuple[subprocess.Popen[bytes], socket.socket, socket.socket]]:
    """A process named as an enclave runtime, holding both ends of a connection."""

    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd needs root")
    own, held = socket.socketpair()
    proc = _enclave_like_process(own.fileno(), held.fileno())
    try:
        yield proc, own, held
    finally:
        _stop(proc)
        own.close()
        held.close()


def test_a_duplicate_whose_other_end_the_enclave_holds_is_taken(
    enclave_like: tuple[subprocess.Popen[bytes], socket.socket, socket.socket],
) -> None:
    proc, _own, held = enclave_like
    taken = take_held([[proc.pid, held.fileno(), start_time(proc.pid)]])
    assert list(taken) == [0] and _inode(taken[0]) == _inode(held)
    taken[0].close()


def test_a_socket_whose_other_end_is_elsewhere_is_never_taken() -> None:
    """A forged fd (the enclave's end of its application connection, its platform
    channel): writing into it would reach another process.  Left alone."""

    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd needs root")
    mine, theirs = socket.socketpair()
    proc = _enclave_like_process(theirs.fileno())
    try:
        assert take_held([[proc.pid, theirs.fileno(), start_time(proc.pid)]]) == {}
        mine.setblocking(False)
        with pytest.raises(BlockingIOError):
            mine.recv(1)
    finally:
        _stop(proc)
        mine.close()
        theirs.close()


def test_a_recorded_start_time_that_differs_is_never_touched(
    enclave_like: tuple[subprocess.Popen[bytes], socket.socket, socket.socket],
) -> None:
    proc, _own, held = enclave_like
    assert take_held([[proc.pid, held.fileno(), "1"], [proc.pid, held.fileno()], "x"]) == {}


def test_the_other_end_is_found_in_the_namespace_the_socket_lives_in() -> None:
    """An enclave runtime has a network namespace of its own; so may its connection."""

    if os.geteuid() != 0:
        pytest.skip("unshare(CLONE_NEWNET) needs root")
    code = (
        "import ctypes, socket, sys\n"
        "assert ctypes.CDLL(None).unshare(0x40000000) == 0\n"
        "x, y = socket.socketpair()\n"
        "back = socket.socket(fileno=int(sys.argv[1]))\n"
        "socket.send_fds(back, [b'x'], [x.fileno(), y.fileno()])\n"
    )
    a, b = socket.socketpair()
    with a, b:
        subprocess.run([sys.executable, "-c", code, str(b.fileno())], pass_fds=[b.fileno()],
                       check=True, timeout=30)  # fmt: skip
        _, fds, _, _ = socket.recv_fds(a, 1, 2)
    x, y = (socket.socket(fileno=fd) for fd in fds)
    with x, y:
        assert holders._peer_of(x) == _inode(y) and holders._peer_of(y) == _inode(x)
        assert peer_inode(_inode(x)) == 0  # (asked from this namespace: not found)
