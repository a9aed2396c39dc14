"""What the roll-back, the guardian and ``migsgx recover`` say must be true.

* An abort the tool's roll-back could not confirm is never taken for one: the
  journal names it (``unconfirmed``), ``recover`` counts that enclave as not
  aborted, and only an abort asked again and answered clears it.
* ``recover`` never acts beside a live guardian that may still give the source
  back: it waits on the guardian's pidfd, bounded, then says so in doubt.
* A gate that could not be opened stays noted (``closed_gates``) until it is,
  under a ``done`` journal too; ``recover`` tries it again and reports it.
* The gate's namespace is entered through the very descriptor whose inode was
  checked, never through its path again.
* A boolean is no integer in a peer's shapes (``isinstance(True, int)``).

The destination agent's answers are given (``_deliver`` patched, as in
``test_recover.py``); the enclaves are stand-ins on socket pairs; the guardian a
stand-in process whose command line names the guardian's module.  Integration
cells with real enclaves, agents and CRIU: ``tests/integration/test_rollback_truth.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from migsgx.agent import abort_confirm, recover_resolve, source_host
from migsgx.agent import recover as recover_module
from migsgx.agent.ckpt_journal import start_time
from migsgx.agent.guardian_aborts import mark_aborted, mark_handed_back
from migsgx.agent.incoming import IncomingMigration
from migsgx.agent.journal import Journal
from migsgx.agent.protocol import enclave_indices
from migsgx.agent.recover import recover
from migsgx.agent.recover_records import not_aborted
from migsgx.agent.tls import AgentIdentity
from migsgx.channel import ECALL, ECALL_FRAME_MAX
from migsgx.containers import gate
from migsgx.containers.admission import SpecRefused, check_shape
from migsgx.errors import MigSGXError, ProtocolError
from migsgx.wire import recv_frame, send_frame

NOTE = "ungate /proc/self/ns/net 7000 4026531840"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    (tmp_path / "agent").mkdir()
    return tmp_path


class Agent:
    """The destination agent's answers, given; what was delivered to it, recorded."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def deliver(
        self, journal: Journal, identity: AgentIdentity, frames: list[bytes], decision: Any = None
    ) -> tuple[str, str]:
        self.sent.append(list(frames))
        return "aborted", ""


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Agent:
    fake = Agent()
    monkeypatch.setattr(recover_resolve, "_deliver", fake.deliver)
    return fake


@pytest.fixture
def source() -> Iterator[subprocess.Popen[bytes]]:
    """The fenced source: a process stopped as the tool's fence stops it."""

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _journal(state: Path, source: int, **fields: Any) -> Journal:
    """A migration of one enclave whose tool died in its roll-back; the enclave a live
    recorded holder (this process)."""

    journal = Journal.start(state / "agent", os.urandom(16), ("10.0.0.2", 7070), 1, "-")
    me = [os.getpid(), 3, start_time(os.getpid())]
    values: dict[str, Any] = {
        "enclave_mids": [os.urandom(16).hex()], "fenced": [source], "phase": "aborted",
        "tool_pid": 2**22 + 1, "fenced_starts": [start_time(source)], "holders": [me],
    }  # fmt: skip
    journal.update(**{**values, **fields})
    return journal


# --- 1. an unconfirmed abort is no abort ----------------------------------------------------
def test_an_unconfirmed_abort_counts_as_not_aborted_until_one_is_answered(state: Path) -> None:
    """Before, an ``aborted`` journal made every enclave count as aborted, whatever the
    roll-back saw: ``recover`` then gave the source back beside a frozen enclave."""

    journal = _journal(state, os.getpid(), unconfirmed=[0])
    assert not_aborted(journal, [None]) == [0]
    journal.update(holders=[[2**22 + 3, 3, "1"]])  # (its process is gone: lost, not frozen)
    assert not_aborted(journal, [None]) == []
    journal.update(holders=[[os.getpid(), 3, start_time(os.getpid())]])
    mark_aborted([str(journal.path)])  # (the guardian saw every live one answer its abort)
    assert Journal.load(journal.path).unconfirmed == []
    assert not_aborted(Journal.load(journal.path), [None]) == []


def test_recover_gives_no_source_back_beside_an_unconfirmed_abort(
    state: Path, agent: Agent, source: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _journal(state, source.pid, unconfirmed=[0])
    monkeypatch.setattr(recover_module, "resolve_orphaned", lambda *a: None)  # (none taken)
    [result] = recover(state, AgentIdentity(state / "agent"))
    assert result.outcome == "in-doubt", result
    assert "enclave(s) 0 have not aborted" in result.detail
    assert _stopped(source.pid) and agent.sent == []
    assert Journal.load(journal.path).phase == "aborted"


class Enclave:
    """A stand-in source enclave answering ``__mig_abort`` with ``answer``."""

    def __init__(self, answer: str) -> None:
        self.ours, self._theirs = socket.socketpair()
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                msg = recv_frame(self._theirs, ECALL, max_size=ECALL_FRAME_MAX)
            except (MigSGXError, OSError):
                return
            if self.answer == "hung":
                continue
            if self.answer == "dead":
                self._theirs.close()
                return
            reply: dict[str, Any] = {"t": "ret", "id": msg["id"], "value": b"frame"}
            if self.answer != "aborted":
                reply = {"t": "err", "id": msg["id"], "code": self.answer, "message": "no"}
            elif msg["fn"] == "__mig_abort":
                reply["value"] = None  # (aborted before: its frame asked again)
            send_frame(self._theirs, reply, max_size=ECALL_FRAME_MAX)

    def close(self) -> None:
        for sock in (self.ours, self._theirs):
            with contextlib.suppress(OSError):
                sock.close()


@pytest.mark.parametrize(
    "answer, expected",
    [("aborted", ("aborted", b"frame")), ("group-unchecked", ("unconfirmed", b"")),
     ("protocol", ("unconfirmed", b"")), ("hung", ("unconfirmed", b"")),
     ("dead", ("dead", b""))],
)  # fmt: skip
def test_an_abort_asked_again_is_confirmed_only_by_a_return(
    answer: str, expected: tuple[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(abort_confirm, "ask", _short_ask)
    enclave = Enclave(answer)
    try:
        assert abort_confirm.confirm_abort(enclave.ours, b"m" * 16, True, "x") == expected
    finally:
        enclave.close()


def _short_ask(sock: socket.socket, fn: str, args: list[object], wait: float | None = None) -> Any:
    from migsgx.agent.enclave_ask import ask

    return ask(sock, fn, args, 0.3)


# --- 2. recover never acts beside a live guardian -------------------------------------------
#: A stand-in guardian (its command line names the guardian's module) that gives the
#: source back: on SIGUSR1 it writes ``aborted``, and ``done`` once PATH exists.
_GUARDIAN = """
import signal, sys, time
from pathlib import Path
from migsgx.agent.journal import Journal
woken = []
signal.signal(signal.SIGUSR1, lambda *_: woken.append(1))
path, go = Path(sys.argv[2]), Path(sys.argv[3])
path.with_suffix(".ready").write_text("ready")
while not woken:
    time.sleep(0.01)
# ("hand": it gave the source back and then only tells a destination that never answers)
Journal.load(path).update(phase="aborted", **({"handed_back": True} if sys.argv[4:] else {}))
while not go.exists():
    time.sleep(0.01)
Journal.load(path).update(phase="done", holders=[])
time.sleep(60)
"""


@contextlib.contextmanager
def _guardian(journal: Journal, go: Path, *mode: str) -> Iterator[subprocess.Popen[bytes]]:
    guardian = subprocess.Popen(
        [sys.executable, "-c", _GUARDIAN, "migsgx.agent.guardian", str(journal.path), str(go),
         *mode]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not journal.path.with_suffix(".ready").exists():
            assert time.monotonic() < deadline and guardian.poll() is None
            time.sleep(0.01)
        journal.update(guardian_pid=guardian.pid)
        yield guardian
    finally:
        guardian.kill()
        guardian.wait()


def test_recover_beside_a_guardian_that_still_gives_back_waits_then_says_so_and_does_nothing(
    state: Path,
    agent: Agent,
    source: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, ``recover`` gave the source back itself (SIGCONT, ABORT delivered) while the
    guardian was still doing it: at once for an ``aborted`` journal, else after 30 s."""

    monkeypatch.setattr(recover_module, "GUARDIAN_BOUND", 1.0)
    monkeypatch.setattr(recover_module, "PROGRESS_EVERY", 0.2)
    journal = _journal(state, source.pid, phase="fenced")
    with _guardian(journal, state / "never"):
        with caplog.at_level(logging.WARNING, "migsgx.recover"):
            [result] = recover(state, AgentIdentity(state / "agent"))
        assert result.outcome == "in-doubt", result
        assert "nothing was done here" in result.detail and "still gives the source back" in (
            result.detail
        )
        assert "waiting for its guardian" in caplog.text
        assert _stopped(source.pid) and agent.sent == []  # (no SIGCONT, no ABORT from here)


def test_recover_waits_for_the_guardians_hand_back_and_says_the_guardian_did_it(
    state: Path, agent: Agent, source: subprocess.Popen[bytes]
) -> None:
    journal = _journal(state, source.pid, phase="fenced")
    go = state / "go"
    with _guardian(journal, go):
        timer = threading.Timer(1.0, go.write_text, ("go",))
        timer.start()
        try:
            [result] = recover(state, AgentIdentity(state / "agent"))
        finally:
            timer.cancel()
        assert (result.outcome, result.phase) == ("stayed", "done"), result
        assert "the guardian (pid" in result.detail and agent.sent == []


@pytest.mark.parametrize("when", ["before", "while waiting"])
def test_recover_does_not_wait_for_a_guardian_that_gave_the_source_back(
    state: Path,
    agent: Agent,
    source: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """Once the guardian says the source runs again (``handed_back``), all it still does
    is tell the destination, for as long as its agent is away: ``recover`` resolves the
    journal beside it (here nothing is recorded in the store: ``stayed``).  Before, every
    ``recover`` on the host waited the whole bound for each such guardian, of any
    migration, and said in doubt."""

    monkeypatch.setattr(recover_module, "GUARDIAN_BOUND", 3.0)
    monkeypatch.setattr(recover_module, "TELLING_WAIT", 0.5)
    if when == "before":
        journal = _journal(state, source.pid, handed_back=True)
    else:
        journal = _journal(state, source.pid, phase="fenced")
    with _guardian(journal, state / "never", "hand"):
        [result] = recover(state, AgentIdentity(state / "agent"))
        assert (result.outcome, result.phase) == ("stayed", "done"), result
        assert not _stopped(source.pid)


def test_a_guardian_marks_the_hand_back_only_under_aborted(state: Path) -> None:
    aborted = _journal(state, 1)
    fenced = _journal(state, 1, phase="fenced")
    mark_handed_back([str(aborted.path), str(fenced.path), str(state / "gone.json")])
    assert Journal.load(aborted.path).data.get("handed_back") is True
    assert "handed_back" not in Journal.load(fenced.path).data


# --- 3. a gate that stays closed stays noted --------------------------------------------------
def test_a_gate_that_could_not_be_opened_is_kept_tried_again_and_reported(
    state: Path, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, ``open_gate``'s False was logged and the journal ended ``done``: no later
    ``recover`` tried the gate again, nothing reported it."""

    tried: list[str] = []
    reachable = [False]

    def open_gate(netns: str, ports: list[int], inode: int = 0) -> bool:
        tried.append(netns)
        return reachable[0]

    monkeypatch.setattr(source_host, "open_gate", open_gate)
    journal = _journal(state, os.getpid(), undo=[NOTE], holders=[])
    [first] = recover(state, AgentIdentity(state / "agent"))
    assert Journal.load(journal.path).phase == "done" and tried
    assert Journal.load(journal.path).closed_gates == [NOTE]
    assert first.in_doubt and first.closed_gates, first
    assert "nsenter --net=" in first.closed_gates[0]["message"]
    assert "iptables -D INPUT -p tcp --syn --dport 7000 -j DROP" in first.detail
    tried.clear()
    [again] = recover(state, AgentIdentity(state / "agent"))  # (a done journal: tried again)
    assert tried and again.in_doubt
    reachable[0] = True
    [opened] = recover(state, AgentIdentity(state / "agent"))
    assert not opened.in_doubt and not opened.closed_gates, opened
    assert Journal.load(journal.path).closed_gates == []


# --- 4. the namespace checked is the namespace entered --------------------------------------
def test_the_gate_opens_in_the_namespace_whose_descriptor_was_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the check and ``nsenter``, the noted path comes to name another namespace
    (a reused pid, a name mounted over); here a file renamed over it.  Before, nsenter
    resolved the path again and changed the rules of whatever it named then."""

    noted, other = tmp_path / "noted", tmp_path / "other"
    noted.write_text("the namespace the gate was closed in")
    other.write_text("another namespace")
    inode = noted.stat().st_ino
    entered: list[int] = []

    def swapped_then_entered(argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        os.replace(other, noted) if other.exists() else None  # (the path names another now)
        where = next(a for a in argv if a.startswith("--net=")).partition("=")[2]
        if where.startswith("/proc/self/fd/"):
            fd = int(where.rpartition("/")[2])
            assert fd in pass_fds
            entered.append(os.fstat(fd).st_ino)
        else:
            entered.append(os.stat(where).st_ino)

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        swapped_then_entered(list(argv), tuple(kw.get("pass_fds", ())))
        return subprocess.CompletedProcess(argv, 0, "", "")

    def run_engine(argv: list[str], **kw: Any) -> tuple[int, str, str]:  # (before: by path)
        swapped_then_entered(list(argv))
        return 0, "", ""

    monkeypatch.setattr(gate.subprocess, "run", run)
    monkeypatch.setattr(gate, "run_engine", run_engine, raising=False)
    assert gate.open_gate(str(noted), [7000], inode) is True
    assert entered == [inode]


# --- 5. a boolean is no integer -------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, field",
    [({"process": {"user": {"uid": True}}}, "process.user.uid"),
     ({"process": {"user": {"additionalGids": [0, False]}}}, "process.user.additionalGids[1]"),
     ({"process": {"rlimits": [{"type": "RLIMIT_NOFILE", "soft": True, "hard": 1}]}},
      "process.rlimits[0].soft")],
)  # fmt: skip
def test_a_bool_is_no_integer_in_a_peers_container_spec(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecRefused) as refused:
        check_shape(spec)
    assert refused.value.field == field


def test_a_bool_is_no_enclave_index_in_a_tools_abort() -> None:
    """``source_lost: [true]`` named enclave 1, whose loaded copy then ended."""

    ended: list[int] = []
    enclaves = [
        SimpleNamespace(
            index=i, engine=SimpleNamespace(source_gone=lambda i=i: ended.append(i)),
            decided=threading.Event(),
        )
        for i in range(2)
    ]  # fmt: skip
    session = SimpleNamespace(tag="t", enclaves=enclaves, _pass_on=lambda frames: None)
    with pytest.raises(ProtocolError):
        IncomingMigration._abort_request(  # type: ignore[arg-type]
            session, {"t": "abort", "reason": "x", "frames": [], "source_lost": [True]}
        )
    assert ended == []
    with pytest.raises(ProtocolError):
        enclave_indices([0, False], 2)
    assert enclave_indices([0, 1], 2) == [0, 1]
