"""What survives a process for window W2: the destination's held-tree record and the
guardian's description of a committed source enclave (nothing secret in either)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migsgx.agent.guardian import _numbers
from migsgx.agent.held import (
    LOST,
    RECORD,
    WINDOWS,
    HeldRecord,
    frozen_stopped,
    held_records,
    lost_detail,
    mark_lost,
    start_time,
)
from migsgx.agent.redeliver import HeldEnclave
from migsgx.errors import ProtocolError, RecordDamagedError
from migsgx.host.client import EnclaveInfo
from migsgx.sgx.counters import COUNTERS, CounterStore

INFO = EnclaveInfo(
    pid=7, mr_enclave=bytes(range(32)), mr_signer=bytes(32), isv_prod_id=1, isv_svn=2,
    debug=True, memory_size=1 << 20, thread_slots=2, ecalls=("put", "get"),
)  # fmt: skip


def _record(pid: int) -> HeldRecord:
    return HeldRecord(os.urandom(16).hex(), pid, start_time(pid), "pid", "10.0.0.1",
                      "10.0.0.2", [bytes(3).hex()])  # fmt: skip


def test_a_stopped_recorded_tree_is_still_held_and_nothing_else_is(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        session = tmp_path / "work" / "ab12"
        session.mkdir(parents=True)
        record = _record(proc.pid)
        record.write(session)
        assert (session / RECORD).stat().st_mode & 0o077 == 0
        [(where, loaded)] = held_records(tmp_path / "work")
        assert where == session and loaded == record
        assert not loaded.still_held()  # it runs: never adopted (nor killed) as held
        os.kill(proc.pid, signal.SIGSTOP)
        assert _stopped(proc.pid) and loaded.still_held()
        recycled = HeldRecord(**{**loaded.__dict__, "start": loaded.start + 1})
        assert not recycled.still_held()  # the same pid, another process
    finally:
        proc.kill()
        proc.wait()
    assert not loaded.still_held()  # gone


def test_one_classification_of_a_record_in_the_start_up_pass_order(tmp_path: Path) -> None:
    """Each window of :data:`WINDOWS`, and where two hold, the earlier one decides (as
    the agent's start-up pass acts and ``migsgx recover`` reports)."""

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mid = os.urandom(16)
        base = HeldRecord(**{**_record(proc.pid).__dict__, "arrivals": [mid.hex()]})

        def window(**change: object) -> str:
            return HeldRecord(**{**base.__dict__, **change}).window(tmp_path)

        assert window() == "gone-or-running"  # it runs
        os.kill(proc.pid, signal.SIGSTOP)
        assert _stopped(proc.pid)
        assert window() == "held" and not (tmp_path / COUNTERS).exists()  # never created
        assert window(enclaves=[]) == "no-enclaves"
        assert window(answered=False, enclaves=[]) == "unanswered"
        assert window(start=base.start + 1) == "gone-or-running"  # the pid, reused
        assert window(restoring=True, answered=False) == "restoring"
        assert window(lazy_pages=[proc.pid, base.start], restoring=True) == "post-copy"
        assert CounterStore(tmp_path / COUNTERS).claim(bytes(16), mid)
        assert window() == "claimed"
        assert window(arrivals=["", os.urandom(16).hex()]) == "held"
        assert window(answered=False) == "unanswered"  # claimed ids decide nothing before
    finally:
        proc.kill()
        proc.wait()
    seen = {"gone-or-running", "held", "no-enclaves", "unanswered", "restoring", "post-copy",
            "claimed"}  # fmt: skip
    assert seen == set(WINDOWS)


def _stopped(pid: int) -> bool:
    """Whether the process reached the stopped state (a loaded machine may take a while)."""

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "T":
            return True
        time.sleep(0.005)
    return False


FREEZER = Path("/sys/fs/cgroup/freezer")


@pytest.mark.skipif(
    os.geteuid() != 0 or not (FREEZER / "cgroup.procs").exists(),
    reason="needs root and the cgroup v1 freezer",
)
def test_a_frozen_tree_counts_as_held_only_if_it_froze_while_stopped(tmp_path: Path) -> None:
    """A container paused while its agent is dead: its tasks read ``D``, not stopped.
    One frozen inside its job-control stop is the held tree (thawed, it is stopped
    again, and a record's ``kill`` ends it without a thaw that lets it run); one
    that ran when frozen is not."""

    cgroup = FREEZER / f"migsgx-held-{os.getpid()}-{os.urandom(3).hex()}"
    cgroup.mkdir()
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        for proc in procs:
            (cgroup / "cgroup.procs").write_text(str(proc.pid))
        stopped, ran = procs
        os.kill(stopped.pid, signal.SIGSTOP)
        assert _stopped(stopped.pid)
        (cgroup / "freezer.state").write_text("FROZEN")
        deadline = time.monotonic() + 30
        while (cgroup / "freezer.state").read_text().strip() != "FROZEN":
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert frozen_stopped(stopped.pid) and not frozen_stopped(ran.pid)
        record = HeldRecord(**{**_record(stopped.pid).__dict__, "driver": "runc"})
        assert record.still_held() and record.frozen()
        assert not HeldRecord(**{**_record(ran.pid).__dict__, "driver": "runc"}).still_held()
        assert not HeldRecord(**{**record.__dict__, "driver": "pid"}).frozen()
        record.kill()
        # Killed: kill_tree reaps its own children, so the status went with its reap (0),
        # unless this wait came first; `sleep 60` ends no other way this soon.
        assert stopped.wait(timeout=30) in (-signal.SIGKILL, 0)
    finally:
        (cgroup / "freezer.state").write_text("THAWED")
        for proc in procs:
            proc.kill()
            proc.wait()
        cgroup.rmdir()


def test_a_container_record_round_trips_and_an_older_one_still_loads(tmp_path: Path) -> None:
    """A container's handle and the enclave processes; a record without them (an older
    agent's) is a process tree's, as before."""

    record = HeldRecord(
        os.urandom(16).hex(), 4242, 17, "runc", "10.0.0.1", "10.0.0.2", [bytes(3).hex()],
        [bytes(16).hex()], {"id": "kv", "bundle": "/s/agent/runc/kv", "netns": ""},
        [[os.getpid(), start_time(os.getpid())], [1 << 30, 5]],
    )  # fmt: skip
    record.write(tmp_path)
    assert HeldRecord.load(tmp_path / RECORD) == record
    assert record.enclaves_running() == [os.getpid()]  # (the other one is gone)
    older = {k: v for k, v in record.__dict__.items() if k not in ("handle", "enclave_procs")}
    (tmp_path / RECORD).write_text(json.dumps(older))
    loaded = HeldRecord.load(tmp_path / RECORD)
    assert (loaded.handle, loaded.enclave_procs) == ({}, [])
    assert loaded.answered  # (an older agent wrote it right before it answered)
    record.answered = False
    record.write(tmp_path)  # (not fsync'd: still atomic, still private)
    assert not HeldRecord.load(tmp_path / RECORD).answered
    assert (tmp_path / RECORD).stat().st_mode & 0o077 == 0
    assert [p.name for p in tmp_path.iterdir()] == [RECORD]  # no temporary file left


@pytest.mark.parametrize(
    "damage",
    [
        {"handle": {"id": 7}},
        {"handle": ["id", "kv"]},
        {"handle": {str(i): "x" for i in range(9)}},
        {"handle": {"id": "x" * 5000}},
        {"enclave_procs": [[1]]},
        {"enclave_procs": [[-1, 2]]},
        {"enclave_procs": [[True, 2]]},
        {"enclave_procs": [7]},
        {"answered": 1},
        {"answered": "yes"},
        {"restoring": 1},
        {"restoring": None},
        {"lazy_pages": [7]},
        {"lazy_pages": [7, -1]},
        {"lazy_pages": "7"},
        {"lazy_pages": [[7, 1]]},
    ],
)
def test_a_damaged_container_record_is_refused(tmp_path: Path, damage: dict[str, object]) -> None:
    record = _record(os.getpid())
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / RECORD).write_text(json.dumps({**record.__dict__, **damage}))
    with pytest.raises(RecordDamagedError):
        HeldRecord.load(tmp_path / "s" / RECORD)
    assert held_records(tmp_path) == [(tmp_path / "s", None)]


def test_a_restoring_record_names_no_tree(tmp_path: Path) -> None:
    """Written before the engine restores: no pid to adopt or kill, only a name."""

    record = HeldRecord(os.urandom(16).hex(), 0, 0, "runc", "10.0.0.1", "10.0.0.2", [],
                        handle={"id": "kv"}, answered=False, restoring=True)  # fmt: skip
    record.write(tmp_path)
    loaded = HeldRecord.load(tmp_path / RECORD)
    assert loaded == record and loaded.restoring and not loaded.still_held()
    lazy = HeldRecord(**{**record.__dict__, "lazy_pages": [2**22 - 1, 5]})  # (post-copy)
    lazy.write(tmp_path)
    assert HeldRecord.load(tmp_path / RECORD) == lazy
    assert not lazy.end_lazy_pages()  # (no such process: nothing is signalled)
    assert loaded.enclaves_running() == []
    older = {k: v for k, v in record.__dict__.items() if k != "restoring"}
    (tmp_path / RECORD).write_text(json.dumps(older))
    assert not HeldRecord.load(tmp_path / RECORD).restoring


def test_an_unreadable_record_is_reported_not_adopted(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / RECORD).write_text('{"root": "1"}')
    assert held_records(tmp_path) == [(tmp_path / "s", None)]
    assert held_records(tmp_path / "none") == []


def test_the_guardian_note_of_an_enclave_round_trips() -> None:
    a, b = socket.socketpair()
    with a, b:
        held = HeldEnclave(a, INFO, {"enclave.so": b"\x7fELF" + bytes(100)}, "sequential")
        payload = held.describe()
        assert " " not in payload and "\n" not in payload  # one pipe line
        again = HeldEnclave.parse(b, payload)
        assert (again.info, again.image_files, again.mode) == (INFO, held.image_files,
                                                              "sequential")  # fmt: skip
        with pytest.raises(ProtocolError):
            HeldEnclave.parse(b, payload[:-2])


def test_a_session_marked_lost_says_so_and_keeps_nothing_else(tmp_path: Path) -> None:
    sid = os.urandom(16)
    session = tmp_path / sid.hex()
    session.mkdir()
    (session / "pages-1.img").write_bytes(b"x")
    assert lost_detail(tmp_path, sid) is None
    mark_lost(session, "claimed, then gone")
    assert lost_detail(tmp_path, sid) == "claimed, then gone"
    assert [p.name for p in session.iterdir()] == [LOST]


def test_the_guardian_skips_a_note_it_cannot_read() -> None:
    notes = ["fence 12 x 13", "restored", "restored ٣", "criu 7", "fencex 9", "fence 14"]
    assert _numbers(notes, "fence") == [12, 13, 14]
    assert _numbers(notes, "restored") == []
    assert _numbers(notes, "criu") == [7]


def test_a_record_not_written_by_the_agent_is_not_acted_on(tmp_path: Path) -> None:
    """A restarted agent kills, removes or adopts the tree a record names: a record that
    anyone else could have planted (readable or writable by others, owned by another
    user, in a session directory that is a symbolic link) is reported, nothing more."""

    record = _record(os.getpid())
    for name in ("mode", "link-target", "owner"):
        (tmp_path / name).mkdir()
        record.write(tmp_path / name)
    (tmp_path / "mode" / RECORD).chmod(0o644)
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "link-target").rename(elsewhere)
    (tmp_path / "link").symlink_to(elsewhere)
    if os.geteuid() == 0:
        os.chown(tmp_path / "owner" / RECORD, 65534, 65534)
    found = dict(held_records(tmp_path))
    assert found[tmp_path / "mode"] is None
    assert found[tmp_path / "link"] is None
    assert found[elsewhere] == record  # (the real directory, as the agent wrote it)
    if os.geteuid() == 0:
        assert found[tmp_path / "owner"] is None


def test_the_agent_refuses_a_work_directory_others_may_write(tmp_path: Path) -> None:
    from types import SimpleNamespace
    from typing import cast

    from migsgx.agent.server import Agent
    from migsgx.errors import ConfigError

    def check(path: Path) -> None:
        Agent._own_work_dir(cast(Agent, SimpleNamespace(config=SimpleNamespace(work_dir=path))))

    check(tmp_path / "new" / "work")  # made, private
    assert (tmp_path / "new" / "work").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ConfigError, match="writable by nobody else"):
        check(shared)
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(ConfigError, match="uid 65534"):
            check(theirs)


def test_a_tree_restoring_is_killed_only_if_its_root_is_still_that_process() -> None:
    """A dead agent's intent for a process tree names its root (pid, start time)
    once CRIU made it: a restarted agent kills that process, never a process that
    took the pid since (another start time), and nothing when no root was named."""

    from migsgx.agent.adoption import Adoption

    proc = subprocess.Popen(["sleep", "60"])
    try:
        intent = HeldRecord(os.urandom(16).hex(), 0, 0, "pid", "10.0.0.1", "10.0.0.2", [],
                            answered=False, restoring=True)  # fmt: skip
        assert Adoption.remove_restored(intent).startswith("nothing (CRIU had made no tree")
        other = HeldRecord(**{**intent.__dict__, "root": proc.pid,
                              "start": start_time(proc.pid) - 1})  # fmt: skip
        assert Adoption.remove_restored(other).startswith("nothing (the tree's root")
        assert proc.poll() is None  # (a pid another process took since: left alone)
        made = HeldRecord(**{**other.__dict__, "start": start_time(proc.pid)})
        assert Adoption.remove_restored(made) == f"the restored process tree (pid {proc.pid})"
        # Killed: kill_tree reaps its own children, so the status went with its reap (0),
        # unless this wait came first; `sleep 60` ends no other way this soon.
        assert proc.wait(timeout=30) in (-signal.SIGKILL, 0)
    finally:
        proc.kill()
        proc.wait()


def test_a_refusable_note_is_taken_only_as_this_agent_wrote_it(tmp_path: Path) -> None:
    """A note makes the agent refuse a migration id for good on request: a planted
    one (not private, or damaged) is no note at all."""

    from migsgx.agent.refusal import REFUSABLE, mark_refusable, refusable_note

    record = HeldRecord(os.urandom(16).hex(), 0, 0, "pid", "10.0.0.1", "10.0.0.2", ["a0"],
                        arrivals=["ab" * 16])  # fmt: skip
    directory = tmp_path / record.session_id
    directory.mkdir()
    (directory / "held.json").write_text("{}")
    mark_refusable(directory, record)
    assert sorted(p.name for p in directory.iterdir()) == [REFUSABLE]
    note = refusable_note(tmp_path, bytes.fromhex(record.session_id))
    assert note is not None and note["peer"] == "10.0.0.1" and note["enclaves"] == ["a0"]
    (directory / REFUSABLE).chmod(0o644)
    assert refusable_note(tmp_path, bytes.fromhex(record.session_id)) is None
    (directory / REFUSABLE).chmod(0o600)
    (directory / REFUSABLE).write_text('{"peer": 1}')
    assert refusable_note(tmp_path, bytes.fromhex(record.session_id)) is None
    assert refusable_note(tmp_path, os.urandom(16)) is None


def _adopt(work: Path) -> list[Path]:
    """One restarted agent's pass over ``work``; the session directories it let go."""

    from types import SimpleNamespace
    from typing import cast

    from migsgx.agent.adoption import Adoption
    from migsgx.agent.config import AgentHost

    discarded: list[Path] = []
    config = SimpleNamespace(work_dir=work, state=work.parent / "state")
    agent = SimpleNamespace(config=config, discard=discarded.append)
    Adoption(cast(AgentHost, agent)).adopt_held()
    return discarded


@pytest.mark.parametrize("marked", [True, False], ids=["marker", "no-marker"])
def test_a_held_tree_without_enclaves_is_finished_by_its_resume_marker(
    tmp_path: Path, marked: bool
) -> None:
    """No enclaves: the resume is the commit point, recorded by the marker before the
    tree continues.  A restarted agent continues a held tree with the marker (the
    source is ended on it) and kills one without it (the source is given back)."""

    from migsgx.agent.resumed import mark_resumed

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        assert _stopped(proc.pid)
        work = tmp_path / "work"
        record = HeldRecord(os.urandom(16).hex(), proc.pid, start_time(proc.pid), "pid",
                            "10.0.0.1", "10.0.0.2", [])  # fmt: skip
        session = work / record.session_id
        session.mkdir(parents=True, mode=0o700)
        record.write(session)
        if marked:
            mark_resumed(work, bytes.fromhex(record.session_id))
        assert _adopt(work) == [session]
        if marked:
            assert not record.still_held() and proc.poll() is None  # it runs
        else:
            assert proc.wait(timeout=30) in (-signal.SIGKILL, 0)  # (see above for 0)
    finally:
        proc.kill()
        proc.wait()
