"""``migsgx recover``: from the journal and the recorded decisions to one runnable copy.

The destination agent is not under test here: its answer is given (``_deliver``
patched, as CLI tests patch the library call); the integration fault matrix
runs recover against real agents.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from migsgx import cli
from migsgx.agent import recover_records, recover_resolve
from migsgx.agent.ckpt_journal import start_time
from migsgx.agent.journal import Journal
from migsgx.agent.recover import recover
from migsgx.agent.recover_resolve import resolve
from migsgx.agent.redeliver import HeldEnclave, HeldSource
from migsgx.agent.tls import AgentIdentity
from migsgx.errors import InDoubtError, LostAfterCommitError
from migsgx.host.client import EnclaveInfo
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.platform import COUNTERS
from migsgx.sgx.store_types import Decision

OWNER = b"S" + bytes(34)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    (tmp_path / "agent").mkdir()
    return tmp_path


def _journal(state: Path, mids: list[bytes], *, phase: str, fenced: list[int]) -> Journal:
    journal = Journal.start(state / "agent", os.urandom(16), ("10.0.0.2", 7070), 1, "-")
    journal.update(
        enclave_mids=[m.hex() for m in mids], fenced=fenced, phase=phase, tool_pid=2**22 + 1
    )
    return journal


def _decide(state: Path, mid: bytes, kind: str, frame: bytes) -> None:
    CounterStore(state / COUNTERS).decide(OWNER, Decision(mid, kind, frame))


class Agent:
    """The destination agent's answers, given; what was delivered to it, recorded."""

    def __init__(self) -> None:
        self.answers: list[str] = []
        self.sent: list[tuple[str, list[bytes]]] = []
        self.decisions: list[str | None] = []

    def deliver(
        self,
        journal: Journal,
        identity: AgentIdentity,
        frames: list[bytes],
        decision: str | None = None,
    ) -> tuple[str, str]:
        self.sent.append((journal.data["mid"], list(frames)))
        self.decisions.append(decision)
        return self.answers.pop(0), ""


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Agent:
    fake = Agent()
    monkeypatch.setattr(recover_resolve, "_deliver", fake.deliver)
    return fake


def _sleeper() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(proc.pid, signal.SIGSTOP)  # fenced
    return proc


def test_recorded_commit_is_delivered_and_the_fenced_source_removed(
    state: Path, agent: Agent
) -> None:
    mids = [os.urandom(16), os.urandom(16)]
    source = _sleeper()
    try:
        journal = _journal(state, mids, phase="committed", fenced=[source.pid])
        for i, mid in enumerate(mids):
            _decide(state, mid, "commit", b"token-%d" % i)
        agent.answers.append("resumed")
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert (result.decision, result.outcome) == ("commit", "moved")
        assert agent.sent == [(journal.data["mid"], [b"token-0", b"token-1"])]
        assert source.wait(timeout=10) == -signal.SIGKILL
        # Idempotent: done now, nothing delivered again.
        again = resolve(Journal.load(journal.path), state, AgentIdentity.of_state(state))
        assert again.outcome == "done" and len(agent.sent) == 1
    finally:
        source.kill()
        source.wait()


def test_a_committed_source_ends_through_only_the_engine_record_that_is_its_own(
    state: Path, agent: Agent, tmp_path: Path
) -> None:
    """The journal's ``runc``, ``podman`` and ``containerd`` notes name the engine record
    a committed source leaves: a damaged note is skipped, and a record its engine does
    not know (or that runs another tree) is never removed; the fenced tree is killed
    all the same."""

    from migsgx.agent.source_host import _engine_records
    from migsgx.containers.committed import CommittedRecord

    mid = os.urandom(16)
    source = _sleeper()
    root = tmp_path / "runc-root"
    root.mkdir()
    record = {"id": "gone-1", "root": str(root), "bundle": "/nowhere", "made": ""}
    # (no containerd listens there: its record is unknown, as one removed since)
    ctrd = {"id": "gone-2", "address": str(tmp_path / "no.sock"), "namespace": "ns",
            "created": "2026-12-06T00:00:00Z"}  # fmt: skip
    try:
        journal = _journal(state, [mid], phase="committed", fenced=[source.pid])
        damaged = ["runc {not json", 'runc {"id": "x"}', 'podman {"name": "x", "id": 1}',
                   'containerd ["id"]',
                   "runc " + json.dumps({**record, "id": "--force"})]  # fmt: skip
        notes = [*damaged, "runc " + json.dumps(record), "containerd " + json.dumps(ctrd)]
        journal.update(undo=notes)
        assert _engine_records(Journal.load(journal.path)) == [
            CommittedRecord("runc", record), CommittedRecord("containerd", ctrd)
        ]  # fmt: skip
        _decide(state, mid, "commit", b"token")
        agent.answers.append("resumed")
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert (result.decision, result.outcome) == ("commit", "moved")
        assert source.wait(timeout=10) == -signal.SIGKILL
    finally:
        source.kill()
        source.wait()


def test_engine_notes_carry_exactly_their_fields() -> None:
    """A driver's note is read back whole; a note missing a field is refused when written."""

    from migsgx.containers.engine_notes import engine_note, engine_records

    note = engine_note("podman", name="kv", id="ab" * 32, root="", storage="vfs")
    assert engine_records([note, "thaw /x", "netup /y"]) == [
        ("podman", {"name": "kv", "id": "ab" * 32, "root": "", "storage": "vfs"})
    ]
    with pytest.raises(ValueError):
        engine_note("containerd", id="kv", address="/run/c.sock", namespace="default")


def test_a_fenced_pid_reused_since_is_never_signalled(state: Path, agent: Agent) -> None:
    """The journal names the fenced tree's pids with their start times: a pid that
    another process holds now (the tree ended, the number came round again) is
    neither killed after the commit nor continued, though it is stopped too."""

    mid = os.urandom(16)
    source, other = _sleeper(), _sleeper()
    try:
        journal = _journal(state, [mid], phase="committed", fenced=[other.pid, source.pid])
        # (``other`` stands for a process that got the number of an ended fenced task)
        journal.update(fenced_starts=[str(int(start_time(other.pid)) - 1), start_time(source.pid)])
        assert Journal.load(journal.path).fenced_now() == [source.pid]
        _decide(state, mid, "commit", b"token")
        agent.answers.append("resumed")
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert (result.decision, result.outcome) == ("commit", "moved")
        assert source.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for proc in (source, other):
            proc.kill()
            proc.wait()


def test_commit_not_confirmed_stays_in_doubt_and_the_source_stays_stopped(
    state: Path, agent: Agent
) -> None:
    mid = os.urandom(16)
    source = _sleeper()
    try:
        journal = _journal(state, [mid], phase="committed", fenced=[source.pid])
        _decide(state, mid, "commit", b"token")
        agent.answers.append("waiting")
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert result.in_doubt
        assert source.poll() is None  # never killed, never continued while in doubt
        assert Journal.load(journal.path).phase == "committed"
    finally:
        source.kill()
        source.wait()


def test_recorded_abort_continues_the_source_and_ends_the_destination_copy(
    state: Path, agent: Agent
) -> None:
    mids = [os.urandom(16), os.urandom(16)]
    source = _sleeper()
    try:
        journal = _journal(state, mids, phase="fenced", fenced=[source.pid])
        journal.update(holders=[[source.pid, 3, "1"], [source.pid, 4, "1"]])
        _decide(state, mids[0], "abort", b"abort-frame")  # the other never decided
        agent.answers.append("aborted")
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert (result.decision, result.outcome) == ("abort", "stayed")
        assert agent.sent[0][1] == [b"abort-frame", b""]
        assert agent.decisions == ["abort"]  # a tree held for a lost copy goes too
        # An enclave that aborted let its duplicate go: its number is never taken again.
        assert Journal.load(journal.path).holders == []
        with open(f"/proc/{source.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T"  # continued
    finally:
        source.kill()
        source.wait()


@pytest.mark.parametrize("mids", [0, 1], ids=["no-enclave", "undecided-enclave"])
def test_an_aborted_journal_with_nothing_decided_continues_the_source_before_done(
    state: Path, agent: Agent, mids: int
) -> None:
    """A tool killed in its roll-back (``tool.rolled-back``) left the fenced source
    stopped and the journal ``aborted``: ``done`` only once the source runs again."""

    source = _sleeper()
    try:
        journal = _journal(state, [os.urandom(16) for _ in range(mids)], phase="aborted",
                           fenced=[source.pid])  # fmt: skip
        journal.update(fenced_starts=[start_time(source.pid)])
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert (result.decision, result.outcome) == ("none", "stayed")
        assert Journal.load(journal.path).phase == "done"
        with open(f"/proc/{source.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T"  # continued
        assert agent.sent == []  # (no decision to carry)
    finally:
        source.kill()
        source.wait()


def _state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize(
    "answer, outcome",
    [("resumed", "moved"), ("unknown", "stayed"), ("aborted", "stayed"),
     ("unreachable", "in-doubt"), ("waiting", "in-doubt")],
)  # fmt: skip
def test_a_fenced_tree_without_enclaves_goes_where_the_destination_says(
    state: Path, agent: Agent, answer: str, outcome: str
) -> None:
    """No enclave, no recorded decision: the destination's resume was the commit point.

    Before, ``recover`` took such a fenced journal for finished (``stayed``)
    without asking: the source stayed stopped for good while nothing ran, or it
    was reported back while the destination ran.  Now the destination's answer
    decides, and without one the source stays stopped, in doubt.
    """

    source = _sleeper()
    try:
        journal = _journal(state, [], phase="fenced", fenced=[source.pid])
        journal.update(fenced_starts=[start_time(source.pid)])
        agent.answers.append(answer)
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert result.outcome == outcome, result
        assert agent.sent == [(journal.data["mid"], [])]  # asked, with nothing to carry
        phase = Journal.load(journal.path).phase
        if outcome == "moved":
            assert source.wait(timeout=10) == -signal.SIGKILL
            assert phase == "done"
        elif outcome == "stayed":
            assert _state_of(source.pid) != "T"  # continued
            assert phase == "done"
        else:
            assert result.in_doubt and _state_of(source.pid) == "T"  # neither way
            assert phase == "fenced"  # a later recover asks again
    finally:
        source.kill()
        source.wait()


def test_recorded_abort_gives_a_container_back_as_the_guardian_would(
    state: Path, agent: Agent, tmp_path: Path
) -> None:
    """The journal's undo notes are applied and checked: a stale pid that is no runc or
    CRIU is not killed, a "freezer" outside the cgroup tree is not written (the
    integration test gives a real runc container back), the fenced source continues."""

    mid = os.urandom(16)
    source = _sleeper()
    freezer = tmp_path / "cgroup.freeze"
    freezer.write_text("1\n")
    try:
        journal = _journal(state, [mid], phase="aborted", fenced=[source.pid])
        # (the sleeper is no runc or CRIU: a reused pid is left alone)
        journal.update(undo=[f"criu {source.pid}", f"thaw {freezer}"])
        assert Journal.load(journal.path).undo == [f"criu {source.pid}", f"thaw {freezer}"]
        _decide(state, mid, "abort", b"abort-frame")
        agent.answers.append("aborted")
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert (result.decision, result.outcome) == ("abort", "stayed")
        assert freezer.read_text().strip() == "1"  # not a freezer control file
        assert source.poll() is None
        with open(f"/proc/{source.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T"  # continued
    finally:
        source.kill()
        source.wait()


def test_an_abort_the_store_did_not_record_is_carried_from_the_journal(
    state: Path, agent: Agent
) -> None:
    """The platform service died with the tool, outside a group: the enclaves aborted
    but the store recorded nothing.  The frames their ``__mig_abort`` returned (kept
    in the journal by the guardian) go as an ABORT, so the destination's copy ends."""

    mids = [os.urandom(16), os.urandom(16)]
    source = _sleeper()
    try:
        journal = _journal(state, mids, phase="fenced", fenced=[source.pid])
        recover_records.keep_aborts(journal, {0: b"abort-0", 1: b"abort-1"})
        assert Journal.load(journal.path).aborts == [b"abort-0", b"abort-1"]
        agent.answers.append("aborted")
        result = resolve(Journal.load(journal.path), state, AgentIdentity.of_state(state))
        assert (result.decision, result.outcome) == ("abort", "stayed")
        assert agent.sent == [(journal.data["mid"], [b"abort-0", b"abort-1"])]
        assert agent.decisions == ["abort"]
        assert Journal.load(journal.path).phase == "done"
        with open(f"/proc/{source.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T"  # continued
    finally:
        source.kill()
        source.wait()


def test_a_stored_decision_wins_over_a_returned_abort(state: Path, agent: Agent) -> None:
    """A recorded frame is carried as recorded; and beside a recorded COMMIT a returned
    ABORT is never carried (the first COMMIT is the commit point)."""

    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, phase="fenced", fenced=[])
    _decide(state, mids[0], "abort", b"stored")
    recover_records.keep_aborts(journal, {0: b"returned", 1: b"abort-1"})
    agent.answers.append("aborted")
    resolve(Journal.load(journal.path), state, AgentIdentity.of_state(state))
    assert agent.sent[0][1] == [b"stored", b"abort-1"]

    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, phase="committed", fenced=[])
    _decide(state, mids[0], "commit", b"token")
    recover_records.keep_aborts(journal, {1: b"abort-1"})
    result = resolve(Journal.load(journal.path), state, AgentIdentity.of_state(state))
    assert (result.decision, result.in_doubt) == ("mixed", True)
    assert len(agent.sent) == 1  # nothing delivered for it


def test_a_journal_with_bad_abort_frames_is_refused(state: Path) -> None:
    journal = _journal(state, [os.urandom(16)], phase="fenced", fenced=[])
    data = json.loads(journal.path.read_text())
    data["aborts"] = ["not hex"]
    journal.path.write_text(json.dumps(data))
    with pytest.raises(ValueError):
        Journal.load(journal.path)
    data["aborts"] = ["00", "11"]  # not one per enclave: none is carried
    journal.path.write_text(json.dumps(data))
    assert Journal.load(journal.path).aborts == []


def test_a_journal_with_a_bad_undo_list_is_refused(state: Path) -> None:
    journal = _journal(state, [], phase="fenced", fenced=[])
    data = json.loads(journal.path.read_text())
    data["undo"] = "thaw /x"
    journal.path.write_text(json.dumps(data))
    with pytest.raises(ValueError):
        Journal.load(journal.path)


def test_commit_and_abort_mixed_are_left_to_an_operator(state: Path, agent: Agent) -> None:
    """Only where an abort was recorded outside the group rule (an older record, or a
    store that could not be reached then): neither way is whole."""

    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, phase="committed", fenced=[])
    _decide(state, mids[0], "commit", b"t")
    _decide(state, mids[1], "abort", b"a")
    result = resolve(journal, state, AgentIdentity.of_state(state))
    assert (result.decision, result.in_doubt) == ("mixed", True)
    assert agent.sent == []  # nothing delivered


def test_recover_cli_exit_status_tells_doubt(
    state: Path,
    agent: Agent,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mid = os.urandom(16)
    _journal(state, [mid], phase="committed", fenced=[])
    _decide(state, mid, "commit", b"token")
    agent.answers.extend(["unreachable", "resumed"])
    with pytest.raises(SystemExit) as first:
        cli.main(["recover", "--state", str(state), "--json"])
    out, err = capsys.readouterr()
    assert first.value.code == cli.EXIT_IN_DOUBT
    assert json.loads(out)[0]["outcome"] == "in-doubt"
    assert err.startswith("migsgx: error [in-doubt]: ")
    with pytest.raises(SystemExit) as second:
        cli.main(["recover", "--state", str(state), "--json"])
    assert second.value.code == cli.EXIT_OK
    assert [r.outcome for r in recover(state)] == ["done"]


@pytest.mark.parametrize("answer", ["unknown", "aborted"])
def test_committed_without_a_destination_copy_is_lost_and_says_what_remains(
    state: Path,
    agent: Agent,
    capsys: pytest.CaptureFixture[str],
    answer: str,
) -> None:
    """W2 (c): no session (or its loaded copies died before their claim), ids unclaimed."""

    mid = os.urandom(16)
    source = _sleeper()
    try:
        journal = _journal(state, [mid], phase="committed", fenced=[source.pid])
        _decide(state, mid, "commit", b"token")
        agent.answers.extend([answer, answer])
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert (result.decision, result.outcome, result.in_doubt) == ("commit", "lost", False)
        assert "no copy runs" in result.detail and str(source.pid) in result.detail
        assert source.poll() is None  # never continued: the decision stands
        assert Journal.load(journal.path).phase == "committed"  # reported again next time
        with pytest.raises(SystemExit) as exited:
            cli.main(["recover", "--state", str(state), "--json"])
        out, err = capsys.readouterr()
        assert exited.value.code == cli.EXIT_LOST_AFTER_COMMIT
        assert json.loads(out)[0]["outcome"] == "lost"
        assert err.startswith("migsgx: error [lost-after-commit]: ")
    finally:
        source.kill()
        source.wait()


def test_claimed_then_lost_is_final_and_the_source_goes(state: Path, agent: Agent) -> None:
    mid = os.urandom(16)
    source = _sleeper()
    try:
        journal = _journal(state, [mid], phase="committed", fenced=[source.pid])
        _decide(state, mid, "commit", b"token")
        agent.answers.append("lost-after-commit")
        result = resolve(journal, state, AgentIdentity.of_state(state))
        assert (result.decision, result.outcome) == ("commit", "lost")
        assert source.wait(timeout=10) == -signal.SIGKILL
        assert Journal.load(journal.path).phase == "done"
    finally:
        source.kill()
        source.wait()


def test_lost_after_commit_is_neither_doubt_nor_a_failed_migration() -> None:
    code = cli._exit_code(LostAfterCommitError("x"))
    assert code == cli.EXIT_LOST_AFTER_COMMIT
    assert code not in (cli.EXIT_OK, cli.EXIT_IN_DOUBT, cli.EXIT_MIGRATION, cli.EXIT_ERROR)


def test_in_doubt_is_not_a_failed_migration() -> None:
    assert cli._exit_code(InDoubtError("x")) == cli.EXIT_IN_DOUBT != cli.EXIT_MIGRATION


def test_migrate_without_a_target_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "--to", "10.0.0.2:7070", "--state", "/nonexistent"])
    assert exited.value.code == cli.EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err


def test_a_lost_copy_gets_the_state_again_from_the_guardian(state: Path, agent: Agent) -> None:
    """W2 without the tool: the destination kept its tree for the state again."""

    mids = [os.urandom(16), os.urandom(16)]
    source = _sleeper()
    asked: list[list[bytes]] = []

    def redeliver(journal: Journal, identity: AgentIdentity, frames: list[bytes]) -> list[bytes]:
        asked.append(list(frames))
        return [frames[0], b"fresh-token"]  # enclave 1's copy was replaced

    try:
        journal = _journal(state, mids, phase="committed", fenced=[source.pid])
        for i, mid in enumerate(mids):
            _decide(state, mid, "commit", b"token-%d" % i)
        agent.answers.extend(["copy-lost", "resumed"])
        result = resolve(journal, state, AgentIdentity.of_state(state), redeliver=redeliver)
        assert (result.decision, result.outcome) == ("commit", "moved")
        assert "delivered again" in result.detail
        assert asked == [[b"token-0", b"token-1"]]
        assert agent.sent[1][1] == [b"token-0", b"fresh-token"]
        assert source.wait(timeout=10) == -signal.SIGKILL
    finally:
        source.kill()
        source.wait()


def test_a_failed_delivery_of_the_state_changes_nothing(state: Path, agent: Agent) -> None:
    mid = os.urandom(16)
    source = _sleeper()

    def redeliver(journal: Journal, identity: AgentIdentity, frames: list[bytes]) -> list[bytes]:
        raise InDoubtError("no fresh copy")

    try:
        journal = _journal(state, [mid], phase="committed", fenced=[source.pid])
        _decide(state, mid, "commit", b"token")
        agent.answers.append("copy-lost")
        result = resolve(journal, state, AgentIdentity.of_state(state), redeliver=redeliver)
        assert result.in_doubt and "no fresh copy" in result.detail
        assert source.poll() is None  # still stopped: the decision stands
        assert Journal.load(journal.path).phase == "committed"
    finally:
        source.kill()
        source.wait()


def test_recover_without_the_guardian_says_the_state_is_gone(
    state: Path, agent: Agent, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the guardian holds the committed source enclaves; without it, lost."""

    mid = os.urandom(16)
    journal = _journal(state, [mid], phase="committed", fenced=[])
    journal.update(guardian_pid=2**22 + 3)  # not running
    _decide(state, mid, "commit", b"token")
    agent.answers.append("copy-lost")
    with pytest.raises(SystemExit) as exited:
        cli.main(["recover", "--state", str(state), "--json"])
    out, _ = capsys.readouterr()
    assert exited.value.code == cli.EXIT_LOST_AFTER_COMMIT
    [result] = json.loads(out)
    assert result["outcome"] == "lost" and "guardian that held them is gone" in result["detail"]


def test_a_recycled_guardian_pid_gets_no_signal(state: Path, agent: Agent) -> None:
    """The recorded guardian is gone and its pid now names another process: left alone."""

    mid = os.urandom(16)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        journal = _journal(state, [mid], phase="committed", fenced=[])
        journal.update(guardian_pid=other.pid)
        _decide(state, mid, "commit", b"token")
        agent.answers.append("copy-lost")
        [result] = recover(state)
        assert result.outcome == "lost"
        assert other.poll() is None  # SIGUSR1 would have ended it
    finally:
        other.kill()
        other.wait()


def test_a_forged_holder_gets_no_byte(state: Path, agent: Agent) -> None:
    """The journal is no order to root: a holder that is no enclave runtime is never touched.

    The journal names a live process (right pid, right start time) and one of its
    sockets as the committed source enclave's duplicate; recover, with the tool
    and the guardian gone, takes nothing from it and writes nothing into it.
    """

    mine, theirs = socket.socketpair()
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[theirs.fileno()]
    )
    try:
        mid = os.urandom(16)
        journal = _journal(state, [mid], phase="committed", fenced=[])
        info = EnclaveInfo(other.pid, bytes(32), bytes(32), 1, 1, False, 4096, 1, ())
        described = HeldEnclave(mine, info, {"enclave.py": b""}).describe()
        journal.update(guardian_pid=2**22 + 3, enclaves=[described],
                       holders=[[other.pid, theirs.fileno(), start_time(other.pid)]])  # fmt: skip
        _decide(state, mid, "commit", b"token")
        agent.answers.append("copy-lost")
        [result] = recover(state)
        assert result.outcome == "lost" and "guardian that held them is gone" in result.detail
        mine.setblocking(False)
        with pytest.raises(BlockingIOError):
            mine.recv(1)  # not a byte reached the process the journal named
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        mine.close()
        theirs.close()


def test_one_recover_at_a_time_takes_the_enclaves_back(state: Path, agent: Agent) -> None:
    """Two recovers must never drive the same enclave connection: the second waits its turn."""

    mid = os.urandom(16)
    journal = _journal(state, [mid], phase="committed", fenced=[])
    journal.update(guardian_pid=2**22 + 3, enclaves=["00"], holders=[[2**22 + 5, 3, "1"]])
    _decide(state, mid, "commit", b"token")
    lock = os.open(journal.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        [result] = recover(state)
        assert result.in_doubt and "another migsgx recover" in result.detail
        assert agent.sent == []  # nothing delivered, nothing taken
    finally:
        os.close(lock)


def test_undecided_enclaves_of_a_committed_migration_are_rolled_forward(
    state: Path, agent: Agent
) -> None:
    """The tool died between two commits: the first COMMIT is the commit point, the
    guardian commits the rest, and every token goes to the destination."""

    mids = [os.urandom(16), os.urandom(16), os.urandom(16)]
    source = _sleeper()
    try:
        journal = _journal(state, mids, phase="committed", fenced=[source.pid])
        _decide(state, mids[0], "commit", b"t0")
        asked: list[list[int]] = []

        def roll_forward(indexes: list[int]) -> None:
            asked.append(indexes)
            for i in indexes:  # (the enclaves write their own decisions)
                _decide(state, mids[i], "commit", f"t{i}".encode())

        agent.answers.append("resumed")
        result = resolve(journal, state, AgentIdentity.of_state(state), tool_gone=True,
                         roll_forward=roll_forward)  # fmt: skip
        assert asked == [[1, 2]]
        assert (result.decision, result.outcome) == ("commit", "moved")
        assert agent.sent == [(journal.data["mid"], [b"t0", b"t1", b"t2"])]
        assert source.wait(timeout=10) == -signal.SIGKILL
    finally:
        source.kill()
        source.wait()


def test_a_roll_forward_that_cannot_commit_yet_stays_in_doubt(state: Path, agent: Agent) -> None:
    """The source platform service is gone: the undecided enclave cannot commit yet;
    nothing is delivered and nothing aborts (the guardian tries again)."""

    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, phase="committed", fenced=[])
    _decide(state, mids[0], "commit", b"t0")
    result = resolve(journal, state, AgentIdentity.of_state(state), tool_gone=True,
                     roll_forward=lambda indexes: None)  # fmt: skip
    assert (result.decision, result.outcome) == ("mixed", "in-doubt")
    assert "enclave(s) 1" in result.detail
    assert agent.sent == []
    assert CounterStore(state / COUNTERS).decision(mids[1]) is None


def test_recover_without_the_guardian_leaves_a_mixed_migration_in_doubt(
    state: Path, agent: Agent
) -> None:
    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, phase="committed", fenced=[])
    journal.update(guardian_pid=2**22 + 3)  # not running
    _decide(state, mids[0], "commit", b"t0")
    [result] = recover(state)
    assert (result.decision, result.outcome) == ("mixed", "in-doubt")
    assert "no guardian holds them" in result.detail
    assert agent.sent == []


def test_holders_under_a_done_journal_are_taken_only_after_a_commit(
    state: Path, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``done`` journal's holders are taken back (and released) only if it committed.

    After an abort its enclaves went back to the application and let their
    duplicates go: the recorded number may name a later migration's duplicate.
    """

    taken: list[str] = []

    def take_back(cls: type[HeldSource], journal: Journal, hung: object = None) -> None:
        taken.append(journal.data["mid"])

    monkeypatch.setattr(HeldSource, "take_back", classmethod(take_back))
    aborted, committed = os.urandom(16), os.urandom(16)
    for mid, kind in ((aborted, "abort"), (committed, "commit")):
        journal = _journal(state, [mid], phase="done", fenced=[])
        journal.update(guardian_pid=2**22 + 3, enclaves=["00"], holders=[[2**22 + 5, 3, "1"]])
        _decide(state, mid, kind, b"frame")
        if kind == "commit":
            wanted = journal.data["mid"]
    results = recover(state)
    assert [r.outcome for r in results] == ["done", "done"]
    assert taken == [wanted]
    assert agent.sent == []  # a done migration is never delivered again


def test_a_dead_tools_images_directory_named_by_its_journal_goes(
    state: Path, tmp_path: Path, agent: Agent
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    images = tmp_path / f"migsgx-dump-{dead.pid}-12345-abcdefgh"
    images.mkdir()
    (images / "pages-1.img").write_bytes(b"\0" * 4096)
    work = tmp_path / "work"  # a --work-dir is never in the journal, and never ours
    work.mkdir()
    journal = _journal(state, [], phase="done", fenced=[])
    journal.update(dump_dir=str(images))
    recover(state)
    assert not images.exists() and work.is_dir()
    assert Journal.load(journal.path).dump_dir == images


def test_the_source_is_handed_back_first_only_where_it_stays(state: Path) -> None:
    """``recover`` hands enclaves it took back to the application before it forgets
    their holders, and only where the resolution gives the migration to the source:
    an ABORT recorded or returned and no COMMIT, or nothing decided before the fence."""

    stays = recover_records.stays
    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, phase="fenced", fenced=[])
    assert not stays(journal, state)  # nothing decided after the fence: in doubt
    journal.update(phase="begun")
    assert stays(journal, state)
    journal.update(phase="fenced")
    recover_records.keep_aborts(journal, {1: b"abort-1"})
    assert stays(journal, state)  # a returned ABORT (its record failed)
    _decide(state, mids[0], "commit", b"token-0")
    assert not stays(journal, state)  # never beside a COMMIT
    other = [os.urandom(16)]
    recorded = _journal(state, other, phase="fenced", fenced=[])
    _decide(state, other[0], "abort", b"abort-0")
    assert stays(recorded, state)


# --- a post-copy tree killed after the COMMIT: revoked on the destination's refusal ----------
def test_a_refusable_destination_has_the_commit_revoked_by_whoever_holds_the_enclaves(
    state: Path, agent: Agent
) -> None:
    mids = [os.urandom(16)]
    journal = _journal(state, mids, phase="committed", fenced=[])
    _decide(state, mids[0], "commit", b"token")
    store = CounterStore(state / COUNTERS)
    asked: list[list[str]] = []

    def revoke(j: Journal, identity: AgentIdentity, kinds: list[str]) -> str:
        asked.append(kinds)
        store.revoke(OWNER, mids[0])  # (what the source enclave does on the proof)
        return "enclaves handed back"

    released: list[bool] = []
    # recover without the enclaves: in doubt, for the guardian (nothing released).
    agent.answers.append("refusable")
    held_elsewhere = resolve(journal, state, AgentIdentity.of_state(state),
                             release=lambda: released.append(True))  # fmt: skip
    assert held_elsewhere.outcome == "in-doubt" and "can never run" in held_elsewhere.detail
    assert not released
    # The holder revokes and gives the source back: done, the source stays.
    agent.answers.append("refusable")
    result = resolve(Journal.load(journal.path), state, AgentIdentity.of_state(state),
                     revoke=revoke, release=lambda: released.append(True))  # fmt: skip
    assert (result.decision, result.outcome) == ("revoked", "stayed"), result
    assert asked == [["commit"]] and not released
    assert Journal.load(journal.path).phase == "done"


def test_a_failed_revocation_changes_nothing_and_stays_in_doubt(state: Path, agent: Agent) -> None:
    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, phase="committed", fenced=[])
    for mid in mids:
        _decide(state, mid, "commit", b"token")
    CounterStore(state / COUNTERS).revoke(OWNER, mids[0])  # (one revoked before: a retry)

    def fails(j: Journal, identity: AgentIdentity, kinds: list[str]) -> str:
        assert kinds == ["revoked", "commit"]
        raise InDoubtError("enclave 1: the destination does not refuse")

    result = resolve(journal, state, AgentIdentity.of_state(state), revoke=fails)
    assert result.outcome == "in-doubt" and "does not refuse" in result.detail
    # One revoked, one committed: said as such, for an operator.
    assert result.decision == "mixed", result
    assert "enclave(s) 0 revoked, 1 still committed" in result.detail, result.detail
    assert "operator decides" in result.detail, result.detail
    assert Journal.load(journal.path).phase == "committed" and not agent.sent
    # Without the enclaves: in doubt too, never "lost" (the revoked one runs again).
    alone = resolve(journal, state, AgentIdentity.of_state(state))
    assert alone.outcome == "in-doubt"
