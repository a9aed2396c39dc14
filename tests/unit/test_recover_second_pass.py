"""``migsgx recover`` after a pass that found a source enclave hung, or beside a guardian
that still asks: never a source given back beside an enclave that has not aborted.

The enclaves are stand-ins on socket pairs that answer runtime calls as a source
enclave's reader does (one answer per call, same id), from a script: ``__mig_abort``
answered ``aborted`` with a frame, refused ``group-unchecked`` (its platform store
could not check its group: alive, still frozen), or not at all (hung).  The
destination agent's answer is given (``_deliver`` patched, as in
``test_recover.py``); the fenced source is a real stopped process.  Integration
cells with real enclaves, agents and CRIU: ``tests/integration/test_recover_after_hung.py``.
"""

from __future__ import annotations

import contextlib
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

from migsgx.agent import enclave_ask, recover_orphans, recover_resolve
from migsgx.agent import recover as recover_module
from migsgx.agent.ckpt_journal import start_time
from migsgx.agent.guardian_aborts import mark_aborted
from migsgx.agent.journal import Journal
from migsgx.agent.recover import recover
from migsgx.agent.recover_records import not_aborted
from migsgx.agent.recover_resolve import resolve
from migsgx.agent.redeliver import HeldEnclave, HeldSource
from migsgx.agent.tls import AgentIdentity
from migsgx.channel import ECALL, ECALL_FRAME_MAX
from migsgx.errors import MigSGXError
from migsgx.host.client import EnclaveInfo
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.platform import COUNTERS
from migsgx.sgx.store_types import Decision
from migsgx.wire import recv_frame, send_frame

OWNER = b"S" + bytes(34)
#: The bound on one answer, shortened so that a hung stand-in costs a fraction of a second.
WAIT = 0.3
HUNG, UNCHECKED = "hung", "group-unchecked"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    (tmp_path / "agent").mkdir()
    return tmp_path


@pytest.fixture(autouse=True)
def short_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enclave_ask, "HUNG_WAIT", WAIT)
    monkeypatch.setattr(recover_module, "HUNG_WAIT", WAIT)


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


class Enclave:
    """A stand-in source enclave: ``abort`` is its answer to ``__mig_abort``."""

    def __init__(self, abort: str, frame: bytes = b"") -> None:
        self.ours, self._theirs = socket.socketpair()
        self.abort, self.frame = abort, frame
        self.calls: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                msg = recv_frame(self._theirs, ECALL, max_size=ECALL_FRAME_MAX)
            except (MigSGXError, OSError):
                return
            self.calls.append(msg["fn"])
            if msg["fn"] == "__mig_abort" and self.abort == HUNG:
                continue  # (alive, its connection open: no answer)
            reply: dict[str, Any] = {"t": "ret", "id": msg["id"], "value": None}
            if msg["fn"] == "__mig_abort" and self.abort == UNCHECKED:
                reply = {"t": "err", "id": msg["id"], "code": UNCHECKED, "message": "no store"}
            elif msg["fn"] in ("__mig_abort", "__mig_abort_frame"):
                reply["value"] = self.frame or None
            send_frame(self._theirs, reply, max_size=ECALL_FRAME_MAX)

    def held(self) -> HeldEnclave:
        """What a ``recover`` takes back: a duplicate of the connection (it closes its own)."""

        info = EnclaveInfo(os.getpid(), bytes(32), bytes(32), 1, 1, False, 4096, 1, ())
        return HeldEnclave(socket.socket(fileno=os.dup(self.ours.fileno())), info, {})

    def close(self) -> None:
        for sock in (self.ours, self._theirs):
            with contextlib.suppress(OSError):
                sock.close()


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


def _journal(state: Path, mids: list[bytes], source: int, **fields: Any) -> Journal:
    """A migration whose tool died past its fence; each enclave a live recorded holder
    (this process: alive, its start time recorded)."""

    journal = Journal.start(state / "agent", os.urandom(16), ("10.0.0.2", 7070), 1, "-")
    me = [os.getpid(), 3, start_time(os.getpid())]
    journal.update(
        enclave_mids=[m.hex() for m in mids], fenced=[source], phase="fenced",
        tool_pid=2**22 + 1, fenced_starts=[start_time(source)],
        holders=[me for _ in mids], enclaves=["00" for _ in mids], **fields,
    )  # fmt: skip
    return journal


def _decide(state: Path, mid: bytes, kind: str, frame: bytes) -> None:
    CounterStore(state / COUNTERS).decide(OWNER, Decision(mid, kind, frame))


def _kind(state: Path, mid: bytes) -> str:
    found = CounterStore(state / COUNTERS).decision(mid)
    return found.kind if found is not None else "none"


@contextlib.contextmanager
def _taken_back(monkeypatch: pytest.MonkeyPatch, enclaves: list[Enclave]) -> Iterator[list[str]]:
    """``recover`` takes these back from the enclaves (as :mod:`.holders` would); what it
    hands back to the application is recorded, never sent."""

    def take_back(cls: type[HeldSource], journal: Journal, hung: object = None) -> HeldSource:
        return HeldSource({i: e.held() for i, e in enumerate(enclaves)})

    handed: list[str] = []

    def hand_back(journal: Journal, held: HeldSource, recorded: int) -> str:
        handed.append(journal.data["mid"])
        return "enclaves handed back"

    monkeypatch.setattr(HeldSource, "take_back", classmethod(take_back))
    monkeypatch.setattr(recover_orphans, "_hand_back", hand_back)
    try:
        yield handed
    finally:
        for enclave in enclaves:
            enclave.close()


def test_a_second_recover_asks_the_enclave_an_earlier_one_left_unasked(
    state: Path, agent: Agent, monkeypatch: pytest.MonkeyPatch, source: subprocess.Popen[bytes]
) -> None:
    """The first ``recover`` found enclave 0 hung and asked nothing more; continued, it read
    that abort and aborted (recorded).  Before, the second saw a decision and asked no
    abort: enclave 1, never asked, went back to the application still frozen."""

    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, source.pid)
    _decide(state, mids[0], "abort", b"abort-0")
    enclaves = [Enclave("aborted", b"abort-0"), Enclave("aborted", b"abort-1")]
    with _taken_back(monkeypatch, enclaves) as handed:
        result = recover_orphans.resolve_orphaned(journal, state, AgentIdentity.of_state(state))
    assert result is not None and (result.decision, result.outcome) == ("abort", "stayed")
    assert "__mig_abort" in enclaves[1].calls  # asked, and it aborted
    assert handed == [journal.data["mid"]]
    assert agent.sent == [[b"abort-0", b"abort-1"]]  # the recorded one, the returned one
    assert not _stopped(source.pid)
    assert Journal.load(journal.path).phase == "done"


def test_an_unchecked_abort_is_no_abort_the_source_stays_stopped(
    state: Path, agent: Agent, monkeypatch: pytest.MonkeyPatch, source: subprocess.Popen[bytes]
) -> None:
    """Enclave 1's platform service is gone: its abort cannot be checked against its
    group (``group-unchecked``), so it is still frozen.  In doubt, named; nothing handed
    back, the source stopped, nothing delivered; the next ``recover`` (the service back)
    finishes."""

    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, source.pid)
    _decide(state, mids[0], "abort", b"abort-0")
    enclaves = [Enclave("aborted"), Enclave(UNCHECKED)]
    with _taken_back(monkeypatch, enclaves) as handed:
        result = recover_orphans.resolve_orphaned(journal, state, AgentIdentity.of_state(state))
        assert result is not None and result.outcome == "in-doubt", result
        assert f"enclave 1 (pid {os.getpid()}) is still frozen" in result.detail
        assert "group-unchecked" in result.detail
        assert handed == [] and agent.sent == []
        assert _stopped(source.pid)
        assert Journal.load(journal.path).phase == "fenced"
        # Its platform service is back: asked again, it aborts; then one copy, the source.
        enclaves[1].abort, enclaves[1].frame = "aborted", b"abort-1"
        journal = Journal.load(journal.path)
        again = recover_orphans.resolve_orphaned(journal, state, AgentIdentity.of_state(state))
    assert again is not None and (again.decision, again.outcome) == ("abort", "stayed"), again
    assert handed == [journal.data["mid"]]
    assert not _stopped(source.pid)


def test_a_hung_enclave_does_not_leave_the_others_unasked(
    state: Path, agent: Agent, monkeypatch: pytest.MonkeyPatch, source: subprocess.Popen[bytes]
) -> None:
    """Nothing decided, enclave 0 hung: the others are asked all the same (before, the
    first hung one ended the round and the rest were never asked).  In doubt, named;
    nothing handed back."""

    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, source.pid)
    enclaves = [Enclave(HUNG), Enclave("aborted", b"abort-1")]
    with _taken_back(monkeypatch, enclaves) as handed:
        result = recover_orphans.resolve_orphaned(journal, state, AgentIdentity.of_state(state))
    assert result is not None and result.outcome == "in-doubt", result
    assert f"enclave 0 (pid {os.getpid()}) is not answering (__mig_abort" in result.detail
    assert enclaves[1].calls[:1] == ["__mig_abort"]
    assert Journal.load(journal.path).aborts == [b"", b"abort-1"]  # kept for the next
    assert handed == [] and agent.sent == [] and _stopped(source.pid)


@pytest.mark.parametrize("holder", ["live", "dead"])
def test_resolve_never_gives_the_source_back_beside_a_live_enclave_that_did_not_abort(
    state: Path, agent: Agent, source: subprocess.Popen[bytes], holder: str
) -> None:
    """One ABORT recorded, the other enclave undecided: while its process lives it may be
    frozen in the migration, and the source stays stopped (in doubt).  Its process gone,
    it holds nothing: the source is given back as before (its state is lost)."""

    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, source.pid)
    if holder == "dead":
        journal.update(holders=[journal.holders[0], [2**22 + 5, 3, "1"]])
    _decide(state, mids[0], "abort", b"abort-0")
    result = resolve(journal, state, AgentIdentity.of_state(state), tool_gone=True)
    if holder == "live":
        assert (result.decision, result.outcome) == ("abort", "in-doubt"), result
        assert "enclave(s) 1 have not aborted" in result.detail
        assert _stopped(source.pid) and agent.sent == []
    else:
        assert (result.decision, result.outcome) == ("abort", "stayed"), result
        assert not _stopped(source.pid)


def test_a_guardian_that_saw_every_enclave_abort_says_so_in_the_journal(state: Path) -> None:
    mids = [os.urandom(16)]
    journal = _journal(state, mids, os.getpid())
    assert not_aborted(journal, [None]) == [0]
    mark_aborted([str(journal.path)])
    assert Journal.load(journal.path).phase == "aborted"
    assert not_aborted(Journal.load(journal.path), [None]) == []
    committed = _journal(state, mids, os.getpid())
    committed.update(phase="committed")
    mark_aborted([str(committed.path)])
    assert Journal.load(committed.path).phase == "committed"  # (never over a commit)


#: A stand-in guardian (its command line names the guardian's module): on SIGUSR1 it
#: asks "again" and, as a real one whose enclave answered, records that enclave's ABORT
#: (argv: store, mid), writes the journal ``aborted`` and then ``done``; else it waits.
_GUARDIAN = """
import signal, sys, time
from pathlib import Path
from migsgx.agent.journal import Journal
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.store_types import Decision
woken = []
signal.signal(signal.SIGUSR1, lambda *_: woken.append(1))
store, mid, path, answers = sys.argv[2], bytes.fromhex(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
Path(path.with_suffix(".ready")).write_text("ready")
while not woken:
    time.sleep(0.01)
Path(path.with_suffix(".woken")).write_text("woken")
if answers == "answers":
    CounterStore(Path(store)).decide(b"S" + bytes(34), Decision(mid, "abort", b"abort-1"))
    Journal.load(path).update(phase="aborted")
    Journal.load(path).update(phase="done", holders=[])
time.sleep(60)
"""


@pytest.mark.parametrize("answers", ["answers", "hung"])
def test_recover_waits_for_a_guardian_that_still_asks_and_never_gives_the_source_back_first(
    state: Path, agent: Agent, source: subprocess.Popen[bytes], answers: str
) -> None:
    """The tool died (or ended in doubt: its platform service went away inside the first
    COMMIT); its guardian asks enclave 1 to abort until its platform service checks it.
    Before, ``recover`` saw enclave 0's ABORT and gave the source back at once, beside an
    enclave still frozen.  Now it wakes the guardian and waits (bounded): the guardian
    gives the source back once every enclave aborted (``stayed``), or the enclave still
    has not aborted (in doubt, the guardian named; the source stays stopped)."""

    mids = [os.urandom(16), os.urandom(16)]
    journal = _journal(state, mids, source.pid)
    _decide(state, mids[0], "abort", b"abort-0")
    guardian = subprocess.Popen(
        [sys.executable, "-c", _GUARDIAN, "migsgx.agent.guardian", str(state / COUNTERS),
         mids[1].hex(), str(journal.path), answers],
    )  # fmt: skip
    try:
        ready = journal.path.with_suffix(".ready")
        deadline = time.monotonic() + 30
        while not ready.exists():  # (its SIGUSR1 handler is set)
            assert time.monotonic() < deadline and guardian.poll() is None
            time.sleep(0.01)
        journal.update(guardian_pid=guardian.pid)
        [result] = recover(state)
        assert journal.path.with_suffix(".woken").exists()  # SIGUSR1: it asks at once
        if answers == "answers":
            assert (result.decision, result.outcome) == ("abort", "stayed"), result
            assert f"the guardian (pid {guardian.pid}) gave the source back" in result.detail
        else:
            assert (result.decision, result.outcome) == ("abort", "in-doubt"), result
            assert f"the guardian (pid {guardian.pid}) holds them" in result.detail
            assert "enclave(s) 1 have not aborted yet" in result.detail
            assert _stopped(source.pid) and _kind(state, mids[1]) == "none"
        assert agent.sent == []  # (the guardian tells the destination, not this recover)
    finally:
        guardian.kill()
        guardian.wait()


class _Migrator:
    """What the application channel asks of a source enclave's migrator here: its
    answer to ``__mig_abort`` is the error ``code`` (or a frame, with ``code`` "")."""

    exit_after_reply = False
    discarded = False
    committed = False

    def __init__(self, code: str) -> None:
        self.code = code
        # (a refusal of nothing under way: no role; otherwise a source in its migration)
        self.role = None if code == "protocol" else "source"
        self.instance = SimpleNamespace(retired=False)

    def call(self, name: str, args: list[object]) -> object:
        if self.code:
            raise _Refused(self.code)
        return b"abort-frame"


class _Refused(MigSGXError):
    def __init__(self, code: str) -> None:
        super().__init__("refused")
        self.code = code


@pytest.mark.parametrize(
    "code, kept",
    [("group-unchecked", True), ("group-decided", True), ("committed", True),
     ("protocol", False)],
)  # fmt: skip
def test_an_enclave_still_in_its_migration_keeps_its_duplicate_after_an_abort_asked(
    code: str, kept: bool
) -> None:
    """Before, any refused ``__mig_abort`` let the duplicate of the connection go: a
    source enclave whose abort its platform store could not check (``group-unchecked``)
    stayed frozen, and the death of the guardian that asked ended it with the only copy
    of its state, so no ``recover`` found it once the service was back.  Only an abort
    of nothing under way (any other refusal) lets it go."""

    from migsgx.enclave.app_channel import AppChannel

    app, enclave = socket.socketpair()
    channel = AppChannel(enclave)
    driver, spare = socket.socketpair()
    try:
        channel.migrator = _Migrator(code)  # type: ignore[assignment]
        channel.hold._held = driver  # (as ``__mig_hold`` left it)
        channel._run_runtime_call(7, "__mig_abort", ["the tool died"])
        reply = recv_frame(app, ECALL, max_size=ECALL_FRAME_MAX)
        assert (reply["t"], reply.get("code")) == ("err", code)
        assert channel.hold.held is kept
    finally:
        channel.hold.drop()
        for sock in (app, enclave, spare):
            sock.close()
