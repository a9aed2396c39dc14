"""One bounded call on a source enclave, with a real process at the other end.

The process answers runtime calls the way an enclave's reader does (one ``ret``
per ``ecall``, same id) and, asked ``__mig_release``, answers, notes it in a
file and exits, as a committed enclave wipes itself and exits.  It is stopped
(SIGSTOP: alive, its connection open, no answer), continued and killed; every
cell asserts what became of the calls, never how long they took (the bound is
shortened here so that the cells cost a second).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.agent import enclave_ask
from migsgx.agent.enclave_ask import ask
from migsgx.agent.handback import commit_rest
from migsgx.agent.redeliver import HeldEnclave, HeldSource
from migsgx.host.client import EnclaveInfo

#: The stand-in for an enclave: serves frames on descriptor ``argv[2]`` until end of file.
_ENCLAVE = """
import sys
from pathlib import Path
import socket
from migsgx.channel import ECALL, ECALL_FRAME_MAX
from migsgx.errors import MigSGXError
from migsgx.wire import recv_frame, send_frame

sock = socket.socket(fileno=int(sys.argv[2]))
marks = Path(sys.argv[1])
while True:
    try:
        msg = recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX)
    except (MigSGXError, OSError):
        break
    with marks.open("a") as out:
        out.write(msg["fn"] + "\\n")
    send_frame(sock, {"t": "ret", "id": msg["id"], "value": None}, max_size=ECALL_FRAME_MAX)
    if msg["fn"] == "__mig_release":
        break  # (wiped: it exits)
"""

WAIT = 0.5


@pytest.fixture
def enclave(tmp_path: Path) -> Iterator[tuple[socket.socket, subprocess.Popen[bytes], Path]]:
    ours, theirs = socket.socketpair()
    marks = tmp_path / "calls"
    marks.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", _ENCLAVE, str(marks), str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    try:
        yield ours, proc, marks
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()
        ours.close()


def _called(marks: Path) -> list[str]:
    return marks.read_text().split()


def _until(check: object, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_answered_hung_then_dead(
    enclave: tuple[socket.socket, subprocess.Popen[bytes], Path],
) -> None:
    sock, proc, marks = enclave
    assert ask(sock, "__mig_status", [], WAIT).state == "answered"
    os.kill(proc.pid, signal.SIGSTOP)
    stopped = ask(sock, "__mig_held", [b"n"], WAIT)
    assert (stopped.state, stopped.msg) == ("hung", None)  # alive, open: never "dead"
    os.kill(proc.pid, signal.SIGCONT)
    # The late answer of the call that timed out is not taken for the next one's.
    again = ask(sock, "__mig_unhold", [], WAIT * 20)
    assert again.state == "answered"
    assert _called(marks) == ["__mig_status", "__mig_held", "__mig_unhold"]
    proc.kill()
    proc.wait()
    assert ask(sock, "__mig_status", [], WAIT).state == "dead"


def test_a_hung_enclave_is_not_said_gone_by_the_roll_forward(
    enclave: tuple[socket.socket, subprocess.Popen[bytes], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, a stopped enclave's commit was given up after 30 s and logged as
    "gone before it committed: its state went with it"."""

    sock, proc, marks = enclave
    monkeypatch.setattr(enclave_ask, "HUNG_WAIT", WAIT)
    said: list[str] = []
    os.kill(proc.pid, signal.SIGSTOP)
    commit_rest({0: sock}, [0], said.append)
    assert len(said) == 1 and "not answering" in said[0], said
    assert "gone" not in said[0]
    os.kill(proc.pid, signal.SIGCONT)  # it reads the COMMIT asked, and commits then
    _until(lambda: _called(marks) == ["__mig_commit"], "the queued commit to be read")


def test_a_hung_committed_enclave_keeps_its_state_until_released_for_certain(
    enclave: tuple[socket.socket, subprocess.Popen[bytes], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the release waited 30 s on a stopped enclave and said nothing: the
    caller forgot its holders as if it had been released."""

    sock, proc, marks = enclave
    monkeypatch.setattr(enclave_ask, "HUNG_WAIT", WAIT)
    info = EnclaveInfo(proc.pid, bytes(32), bytes(32), 1, 1, False, 4096, 1, ())
    held = HeldSource({0: HeldEnclave(sock, info, {})})
    os.kill(proc.pid, signal.SIGSTOP)
    notes = held.release()
    assert notes is not None and len(notes) == 1, notes
    assert f"enclave 0 (pid {proc.pid}) is not answering" in notes[0], notes
    assert "keeps its committed state" in notes[0], notes
    # Nothing was dropped on the timeout: the process lives, its connection is open.
    assert proc.poll() is None and sock.fileno() >= 0
    assert _called(marks) == []
    os.kill(proc.pid, signal.SIGCONT)  # back: it reads the release asked, and only then goes
    assert proc.wait(30) == 0
    assert _called(marks) == ["__mig_release"]
    assert ask(sock, "__mig_status", [], WAIT).state == "dead"
