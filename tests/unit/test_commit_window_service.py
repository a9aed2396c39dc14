"""The platform service refuses the request of an enclave that hung up, under the store's lock.

An enclave that sent its COMMIT and died before the answer: the request is in
the service's channel, and a service that wrote it whenever it got there could
write after a reader (the tool, after the enclave's end) had read "no COMMIT".
Now every store operation made for an enclave checks, right after it took the
store's lock, whether that enclave's channel hung up, and refuses if so: a
write that began before the death is the decision, one that had not is refused
for good (``docs/spec/commit.md``, section 5).  The enclaves here are real
processes holding their end of a real socket pair, SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_fixtures import World, make_image

from migsgx.agent.enclave_loss import committed_in_store, ended, wait_ended
from migsgx.errors import EnclaveLostError
from migsgx.sgx.counters import COUNTERS, CounterStore
from migsgx.sgx.platform import LocalServices
from migsgx.sgx.record_store import for_requester
from migsgx.sgx.service_requests import hung_up, reply_to
from migsgx.sgx.store_types import Decision

OWNER = b"S" + bytes(32) + b"\x01\x00"


class Enclave:
    """A process holding the far end of a channel, as an enclave runtime holds its own."""

    def __init__(self) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # (threads too: a process whose first thread exited is a zombie before it ended)
        code = "import threading,time\n[threading.Thread(target=time.sleep,args=(60,)).start() for _ in range(3)]\ntime.sleep(60)"  # noqa: E501
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()])
        theirs.close()

    def gone(self) -> bool:
        return hung_up(self.ours)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        assert self.gone() and ended(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.ours.close()


@pytest.fixture
def enclave() -> Iterator[Enclave]:
    e = Enclave()
    yield e
    e.close()


def _mid(n: int) -> bytes:
    return bytes([n]) * 16


def test_a_request_of_a_live_enclave_is_written_one_of_a_dead_one_never(
    tmp_path: Path, enclave: Enclave
) -> None:
    store = CounterStore(tmp_path / COUNTERS)
    with for_requester(enclave.gone):
        assert store.decide(OWNER, Decision(_mid(1), "commit", b"t")).kind == "commit"
    enclave.kill()
    with for_requester(enclave.gone), pytest.raises(EnclaveLostError, match="refused for good"):
        store.decide(OWNER, Decision(_mid(2), "commit", b"t"))
    assert store.decision(_mid(2)) is None
    # (anyone else's operations go on: the refusal is the dead enclave's alone)
    assert store.decide(OWNER, Decision(_mid(2), "abort", b"")).kind == "abort"


def test_a_commit_queued_behind_the_lock_when_its_enclave_died_is_refused_for_good(
    tmp_path: Path, enclave: Enclave
) -> None:
    """The race itself: the service's thread has the request and waits for the store's
    lock; the enclave dies; a reader takes the lock after that death and reads "no
    COMMIT"; then the service gets the lock: it refuses, so the reading stays true."""

    path = tmp_path / COUNTERS
    service, reader = CounterStore(path), CounterStore(path)  # (two users of one file)
    outcome: list[object] = []

    def serve() -> None:
        with for_requester(enclave.gone):
            try:
                outcome.append(service.decide(OWNER, Decision(_mid(3), "commit", b"t")))
            except EnclaveLostError as exc:
                outcome.append(exc)

    blocker = CounterStore(path)
    with blocker._locked():  # (held elsewhere: the service's request waits for the lock)
        thread = threading.Thread(target=serve)
        thread.start()  # (wherever it is, it cannot write before the lock is let go)
        enclave.kill()
        assert not outcome
    assert committed_in_store(tmp_path, _mid(3), enclave.proc.pid) is False
    thread.join(10)
    assert isinstance(outcome[0], EnclaveLostError)
    assert reader.decision(_mid(3)) is None  # (never written afterwards)


def test_a_write_that_took_the_lock_before_the_death_is_the_decision(
    tmp_path: Path, enclave: Enclave
) -> None:
    store = CounterStore(tmp_path / COUNTERS)

    def check_then_die() -> bool:
        alive = not enclave.gone()  # (the check under the lock: it was there)
        enclave.proc.kill()  # (and it dies right after: the write goes on)
        return not alive

    with for_requester(check_then_die):
        store.decide(OWNER, Decision(_mid(4), "commit", b"t"))
    enclave.proc.wait()
    assert committed_in_store(tmp_path, _mid(4), enclave.proc.pid) is True


def _services(world: World) -> LocalServices:
    platform = world.host_a
    return platform.services_for(platform.einit(make_image(world.author))[0])


def _decide(mid: bytes) -> dict[str, object]:
    return {"t": "decide", "mid": mid, "kind": "commit", "frame": b"token", "group": b"",
            "changes": []}  # fmt: skip


@pytest.mark.parametrize("point", ["", "platform.before-commit", "platform.after-commit"])
def test_the_service_answers_by_the_channel_and_its_fault_points_kill_the_enclave(
    world: World, enclave: Enclave, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """``reply_to``, as the service serves each request: a live enclave's COMMIT is
    written; ``before-commit:kill-enclave`` kills it between receiving and writing
    (refused: nothing written), ``after-commit`` after the write (it stands)."""

    svc = _services(world)
    mid = os.urandom(16)  # (the world's platform is the session's)
    if point:
        monkeypatch.setenv("MIGSGX_FAULT", f"{point}:kill-enclave")
    reply = reply_to(svc, _decide(mid), enclave.ours, enclave.proc.pid)
    store = world.host_a.counters
    if point == "platform.before-commit":
        assert reply["t"] == "err" and reply["code"] == EnclaveLostError.code
        assert store.decision(mid) is None
    else:
        assert reply == {"t": "ok", "value": {"kind": "commit", "frame": b"token"}}
        assert store.decision(mid) is not None
    assert enclave.gone() is bool(point)
    if point:
        enclave.proc.wait()
        written = point.endswith("after-commit")
        assert committed_in_store(world.host_a.state_dir, mid, enclave.proc.pid) is written


def test_a_lone_checkpoint_gate_commit_counts_as_a_commit(
    world: World, enclave: Enclave, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault point fires for a checkpoint gate's commit (an update that advances the
    gate's counter), not for any other update."""

    monkeypatch.setenv("MIGSGX_FAULT", "platform.before-commit:kill-enclave")
    svc = _services(world)
    other = {"t": "ps_txn", "claim": None, "changes": [{"name": "!ckpt-" + "ab" * 16}]}
    reply_to(svc, other, enclave.ours, enclave.proc.pid)  # (malformed: answered, no fault)
    assert not enclave.gone()
    gate = {"name": "!ckpt-" + "ab" * 16, "record": None, "create": {}, "advance": {"c": 2},
            "destroy": [], "check": {}, "absent": False, "expect": None}  # fmt: skip
    reply = reply_to(svc, {"t": "ps_update", **gate}, enclave.ours, enclave.proc.pid)
    assert reply["t"] == "err" and enclave.gone()


def test_ended_waits_for_every_thread_not_only_the_first() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        assert not ended(proc.pid)
        assert not wait_ended(proc.pid, 0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert wait_ended(proc.pid)  # (a zombie of one thread: ended, not yet reaped)
        assert proc.poll() is not None


def test_a_checkpoint_journal_names_its_lost_enclaves(tmp_path: Path) -> None:
    """``recover --checkpoint --json``'s ``lost_enclaves``: the journal's ``source_lost``
    (well-formed entries only), with the enclaves a resolution found dead added from
    the recorded holders (pid) and the checkpoint's image (MRENCLAVE, "" if unreadable)."""

    from migsgx.agent.ckpt_journal import lost_of, note_lost

    kept = {"index": 1, "mr_enclave": "ab" * 32, "pid": 7, "migration_id": ""}
    journal = {"source_lost": [kept, {"index": "x"}, 3], "holders": [[41, 5, "9", "00"]]}
    assert lost_of(journal) == [kept]
    assert lost_of({"source_lost": "x"}) == []
    named = note_lost(tmp_path, journal, [0, 1])
    assert named == [{"index": 0, "mr_enclave": "", "pid": 41, "migration_id": ""}, kept]
