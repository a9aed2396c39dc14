"""``migsgx recover`` on a destination host: the held-tree records a dead agent left.

Each record is listed in doubt with what it holds and the step (start the agent
on the state), whatever its bytes; an unreadable one too, never skipped and
never a traceback.  While an agent serves the state (its work directory's lock
held shared) nothing of it is reported, and nothing touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migsgx.agent.held import RECORD, HeldRecord, start_time
from migsgx.agent.recover_dest import _no_agent, recover_destination, serving_lock, work_dir_of


def _session(state: Path, raw: bytes | None = None, record: HeldRecord | None = None) -> Path:
    work = work_dir_of(state)
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    session = work / os.urandom(16).hex()
    session.mkdir(mode=0o700)
    if record is not None:
        record.write(session)
    else:
        fd = os.open(session / RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(raw or b"")
    return session


def _record(pid: int) -> HeldRecord:
    return HeldRecord(os.urandom(16).hex(), pid, start_time(pid), "pid", "10.0.0.1",
                      "10.0.0.2", [bytes(3).hex()], arrivals=[os.urandom(16).hex()])  # fmt: skip


def test_a_state_without_records_has_nothing_of_the_destination(tmp_path: Path) -> None:
    assert recover_destination(tmp_path) == []
    work_dir_of(tmp_path).mkdir(parents=True)
    assert recover_destination(tmp_path) == []


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=6),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=600)
    | _JSONISH.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(
        st.sampled_from(["session_id", "root", "start", "driver", "peer", "local", "enclaves",
                         "arrivals", "holders", "restoring", "answered", "lazy_pages"]),
        _JSONISH,
    ).map(lambda d: json.dumps(d).encode())
)  # fmt: skip
def test_any_record_bytes_are_listed_in_doubt_never_skipped(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(Path(tmp), raw)
        [found] = recover_destination(Path(tmp))
        assert found.outcome == "in-doubt" and found.in_doubt
        assert found.step
        assert session.is_dir()  # (left for the agent, or for an operator)


def test_a_held_tree_is_listed_with_what_it_holds_and_the_step(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_stopped(proc.pid)
        record = _record(proc.pid)
        session = _session(tmp_path, record=record)
        [found] = recover_destination(tmp_path)
        assert (found.mid, found.phase, found.outcome) == (record.session_id, "held", "in-doubt")
        assert found.held["root"] == proc.pid and found.held["enclaves"] == 1
        assert found.held["claimed"] == 0 and found.held["kind"] == "held"
        assert f"migsgx agent serve --state {tmp_path}" in found.step
        assert (session / RECORD).is_file() and _state(proc.pid) == "T"  # nothing touched
        json.dumps(found.to_dict())  # (what --json prints)
    finally:
        proc.kill()
        proc.wait()
    [gone] = recover_destination(tmp_path)
    assert (gone.phase, gone.outcome) == ("gone-or-running", "in-doubt")


def test_while_an_agent_serves_the_state_nothing_is_reported(tmp_path: Path) -> None:
    session = _session(tmp_path, record=_record(os.getpid()))
    fd = serving_lock(work_dir_of(tmp_path))  # (what a serving agent holds)
    try:
        assert recover_destination(tmp_path) == []
        assert (session / RECORD).is_file()
    finally:
        os.close(fd)
    [found] = recover_destination(tmp_path)
    assert found.outcome == "in-doubt"


def test_the_command_exits_7_naming_the_record(tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir(mode=0o700)
    _session(tmp_path, b"{not json")
    argv = [sys.executable, "-m", "migsgx", "recover", "--state", str(tmp_path), "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 7, out
    [found] = json.loads(out.stdout)
    assert found["outcome"] == "in-doubt" and found["step"], found
    assert "Traceback" not in out.stderr


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 30
    while _state(pid) != "T":
        assert time.monotonic() < deadline, "the process never stopped"
        time.sleep(0.005)


def test_an_agent_starting_while_recover_takes_over_waits_for_it(tmp_path: Path) -> None:
    """The lock recover holds while it takes trees over keeps a starting agent's own
    start-up pass out until it is done (never both on one tree)."""

    work = work_dir_of(tmp_path)
    work.mkdir(parents=True)
    got: list[int] = []
    started = threading.Event()
    done = threading.Event()

    def agent_start() -> None:
        started.set()
        got.append(serving_lock(work))
        done.set()

    with _no_agent(work) as free:
        assert free
        thread = threading.Thread(target=agent_start, daemon=True)
        thread.start()
        assert started.wait(30)
        assert not done.wait(0.3)  # (cannot be set while the lock is held here)
        with _no_agent(work) as again:
            assert not again  # (a second recover, or an agent, holds it: left alone)
    assert done.wait(30)
    os.close(got[0])
