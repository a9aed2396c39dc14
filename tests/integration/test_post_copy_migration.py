"""``migsgx migrate --post-copy`` of a process with real CRIU lazy pages between hosts.

The enclaves move and commit as in stop-and-copy; the process's private
memory follows after the commit point, pulled by the destination in CRIU's
mutual TLS.  Every acknowledged write is present afterwards; a failure before
the commit point leaves the source running (exit 6); the source's CRIU lost
inside the window is exit 9 with the destination tree dead, never a process
running with wrong memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("bed_helpers", "fault_helpers")

from bed_helpers import (  # noqa: E402
    end_copies,
    migrate_throttled,
    start_workers,
    wait_until,
    workers,
    workers_carry_on,
    workers_kept_every_write,
)
from fault_helpers import (  # noqa: E402
    EXIT_IN_DOUBT,
    EXIT_LOST_AFTER_COMMIT,
    recover,
    stop_guardian_of,
)

from migsgx.agent.held import start_time  # noqa: E402
from migsgx.lab.testbed import AgentProcess, AppProcess, Testbed  # noqa: E402
from migsgx.sgx.counters import CounterStore  # noqa: E402
from migsgx.sgx.platform import COUNTERS  # noqa: E402
from migsgx.system.process import process_state  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 83
Figures = dict[str, dict[str, object]]
#: Two worker threads writing through the enclave while it moves.
WRITING = ("--workers", "2", "--max-calls", "100000")


def test_kvstore_under_writes_moves_with_post_copy(bed: Testbed, agent: AgentProcess) -> None:
    app = start_workers(bed, *WRITING)
    run = bed.migrate(app.pid, agent, args=["--post-copy"])
    assert run.returncode == 0, run.stderr
    assert run.stats is not None
    # The destination ran before its last page came: the window was open.
    assert run.stats["post_copy_window"] > 0
    assert run.stats["details"]["page_bytes"] == 0  # no page went before the commit
    workers_carry_on(bed, app, "dst")
    workers_kept_every_write(bed, app, "dst")
    assert bed.runnable_copies(app) == {"src": 0, "dst": 1}
    end_copies(bed, app)


@pytest.mark.parametrize("action", ["fail", "kill-criu"])
def test_failure_before_the_commit_point_leaves_the_source_running(
    bed: Testbed, agent: AgentProcess, action: str
) -> None:
    app = start_workers(bed, *WRITING)
    # The destination restored the tree held, its daemon pulling pages; then the
    # tool fails, or the source's CRIU (the only server of the pages) dies while
    # pages are still missing (the page stream is throttled).
    run = migrate_throttled(bed, app.pid, agent, f"tool.before-commit:{action}")
    assert run.returncode == 6, run.stderr
    assert "the source runs on" in run.stderr or "aborted" in run.stderr, run.stderr
    workers_carry_on(bed, app, "src")
    assert all(not w["errors"] for w in workers(bed, app, "src"))
    assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
    end_copies(bed, app)


def test_a_failure_inside_the_post_dump_step_gives_the_source_back(
    bed: Testbed, agent: AgentProcess
) -> None:
    """The ``post-dump`` step fails (``tool.before-images:fail``; a storm with
    ``--options '--live --post-copy'`` found it through a control connection that
    stalled while the images went).  A lazy dump serves pages even after its
    ``post-dump`` step failed: before, CRIU waited in ``accept`` for a destination
    that never came, the tool waited for CRIU, and the source stayed frozen (10
    minutes, then the storm gave up)."""

    app = start_workers(bed, *WRITING)
    run = bed.migrate(app.pid, agent, args=["--post-copy"],
                      env={"MIGSGX_FAULT": "tool.before-images:fail"}, timeout=120)  # fmt: skip
    assert run.returncode == 6, run.stderr
    assert "fault injected at tool.before-images" in run.stderr, run.stderr
    workers_carry_on(bed, app, "src")
    assert all(not w["errors"] for w in workers(bed, app, "src"))
    assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
    end_copies(bed, app)


def test_a_destination_enclave_lost_after_its_claim_is_exit_10(
    bed: Testbed, agent: AgentProcess
) -> None:
    """Post-copy, the destination enclave killed after it claimed the id, before the tree
    was attached (W3, ``agent.before-resume:kill-enclave``; found by a storm with
    ``--options '--live --post-copy'``): the state is lost, and the tool says so
    (exit 10) as without post-copy; before, it exited 0 for an application running
    without its enclave."""

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-resume:kill-enclave"})
    try:
        app = start_workers(bed, *WRITING)
        run = bed.migrate(app.pid, doomed, args=["--post-copy"], timeout=120)
        assert run.returncode == EXIT_LOST_AFTER_COMMIT, run.stderr
        assert "lost after the commit" in run.stderr, run.stderr
        assert bed.runnable_copies(app)["src"] == 0  # the committed source went
        end_copies(bed, app)
    finally:
        doomed.stop()


def test_source_criu_lost_after_the_commit_point_is_exit_9(
    bed: Testbed, agent: AgentProcess
) -> None:
    app = start_workers(bed, *WRITING)
    run = migrate_throttled(bed, app.pid, agent, "tool.after-commit:kill-criu")
    assert run.returncode == 9, run.stderr
    assert "inside the post-copy window" in run.stderr, run.stderr
    assert "destination tree was killed" in run.stderr, run.stderr
    # Neither copy runs: the destination's never ran with pages missing, the
    # source's gave its enclaves up at the commit point.
    copies = bed.copies(app)
    assert bed.runnable_copies(app) == {"src": 0, "dst": 0}, copies
    assert all(state in ("", "Z", "X") for _, state in copies["dst"]), copies
    end_copies(bed, app)


def test_tool_killed_while_its_criu_waits_for_the_destination(
    bed: Testbed, agent: AgentProcess
) -> None:
    """The lazy dump serves, no restore was asked: the guardian ends that CRIU
    (it would wait for a page connection forever) and resumes the source."""

    app = start_workers(bed, *WRITING)
    run = bed.migrate(
        app.pid, agent, args=["--post-copy"], env={"MIGSGX_FAULT": "tool.before-restore:kill"}
    )
    assert run.returncode == -9, run.stderr
    wait_until(lambda: bed.runnable_copies(app) == {"src": 1, "dst": 0}, 30, "the source to run")
    workers_carry_on(bed, app, "src")
    assert all(not w["errors"] for w in workers(bed, app, "src"))
    end_copies(bed, app)


def _restart(bed: Testbed, doomed: AgentProcess) -> tuple[AgentProcess, dict[str, object], str]:
    """The destination agent killed by its fault, its record, and the agent restarted."""

    assert doomed.proc.wait(timeout=30) == -9
    [path] = (bed.state("dst") / "agent" / "work").glob("*/held.json")
    record = json.loads(path.read_text())
    again = bed.start_agent(listen_port=doomed.port)
    return again, record, again.log.read_text(errors="replace")


def _daemon_gone(record: dict[str, object]) -> bool:
    """The recorded lazy-pages daemon ended (a zombie of its dead parent's: ended too)."""

    lazy = record["lazy_pages"]
    assert isinstance(lazy, list) and len(lazy) == 2
    return start_time(lazy[0]) != lazy[1] or process_state(lazy[0]) in ("", "Z", "X")


def test_a_post_copy_tree_whose_agent_died_before_the_decision_is_removed(
    bed: Testbed,
) -> None:
    """The destination agent dies with the post-copy tree restored, held, its page
    window not yet open (``agent.after-restore:kill``, before ``restored``): the
    source runs on (exit 6).  The tree was recorded with its lazy-pages daemon:
    the restarted agent never adopts it (no agent can open its window again),
    kills it while stopped and then the daemon, so nothing is left."""

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.after-restore:kill"})
    app = start_workers(bed, *WRITING)
    again = None
    try:
        run = bed.migrate(app.pid, doomed, args=["--post-copy"])
        assert run.returncode == 6, run.stderr
        workers_carry_on(bed, app, "src")
        assert [s for _, s in bed.copies(app)["dst"]] == ["T"]  # the orphan, stopped
        again, record, log = _restart(bed, doomed)
        assert record["lazy_pages"] and not record["answered"], record
        assert "post-copy tree" in log and "is not adopted" in log, log
        assert "adopted the tree" not in log, log
        wait_until(lambda: all(s in ("Z", "") for _, s in bed.copies(app)["dst"]), 30,
                   "the post-copy tree to be killed")  # fmt: skip
        wait_until(lambda: _daemon_gone(record), 30, "the lazy-pages daemon to end")
        assert not list((bed.state("dst") / "agent" / "work").glob("*/held.json"))
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        workers_kept_every_write(bed, app, "src")
    finally:
        for agent in (doomed, again):
            if agent is not None:
                agent.stop()
        end_copies(bed, app)


@pytest.mark.parametrize("guardian", ["alive", "killed"])
def test_a_post_copy_tree_whose_agent_died_after_the_commit_runs_again_at_the_source(
    bed: Testbed, guardian: str
) -> None:
    """Window W2 of post-copy: the source committed, the destination agent dies as
    the COMMIT reaches its loaded copy (``agent.before-claim:kill``).  The copy
    ends with the agent; the tree's window cannot be opened again, so the tree can
    never run: the restarted agent kills it and its daemon and keeps a note of the
    session.  One ``migsgx recover`` (through the guardian, which holds the
    committed source enclaves) has the destination's store refuse the migration id
    for good, proven to the source enclave, which revokes its commit
    (``docs/spec/commit.md`` 2.2): the fenced source tree continues with its
    enclaves and every acknowledged write.  Nothing runs twice, nothing runs with
    a missing page, nothing is left on the destination.  With the guardian killed
    as well, ``recover`` takes the enclaves' connections back from them and does
    the same itself."""

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-claim:kill"})
    app = start_workers(bed, *WRITING)
    again = None
    try:
        run = bed.migrate(app.pid, doomed, args=["--post-copy"])
        assert run.returncode == 7, run.stderr  # in doubt
        if guardian == "killed":
            stop_guardian_of(app.pid)  # SIGKILL: the enclaves hold their own connections
        again, record, log = _restart(bed, doomed)
        assert record["lazy_pages"] and record["answered"], record
        assert "post-copy tree" in log and "is not adopted" in log, log
        wait_until(lambda: all(s in ("Z", "") for _, s in bed.copies(app)["dst"]), 30,
                   "the post-copy tree to be killed")  # fmt: skip
        wait_until(lambda: _daemon_gone(record), 30, "the lazy-pages daemon to end")
        result = recover(bed)
        if guardian == "killed":
            assert "revoked" in result.stdout, result.stdout + result.stderr
        # (this module's earlier cells' migrations are listed too: done, or aborted.
        # The guardian retries by itself too: it may have revoked before recover asked,
        # and then this migration's row says "done")
        rows = json.loads(result.stdout)
        assert not {r["outcome"] for r in rows} & {"in-doubt", "lost"}, result.stdout
        assert result.returncode == 0, result.stderr
        store = CounterStore(bed.state("src") / COUNTERS)
        assert [d.kind for d in store.decisions() if d.kind != "abort"][-1:] == ["revoked"]
        workers_carry_on(bed, app, "src")
        workers_kept_every_write(bed, app, "src")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        assert not list((bed.state("dst") / "agent" / "work").glob("*/held.json"))
    finally:
        for agent in (doomed, again):
            if agent is not None:
                agent.stop()
        end_copies(bed, app)


def _journal_of(bed: Testbed, tool_pid: int) -> dict[str, object]:
    """The source host's journal of the migration whose tool had ``tool_pid``."""

    for path in (bed.state("src") / "agent" / "migrations").glob("*.json"):
        data = json.loads(path.read_text())
        if data.get("tool_pid") == tool_pid:
            return dict(data)
    raise AssertionError(f"no journal of tool {tool_pid}")


Killed = tuple[AppProcess, AgentProcess, AgentProcess, list[bytes]]


def _killed_after_the_commit(bed: Testbed, *, guardian: str) -> Killed:
    """A two-enclave kvstore under writes, moved with ``--post-copy`` to an agent killed
    as the COMMIT reaches its copies; the agent restarted; the app, both agents and the
    enclaves' migration ids.  The restarted agent killed the tree and noted the session."""

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-claim:kill"})
    app = start_workers(bed, "--enclaves", "2", *WRITING)
    run = bed.migrate(app.pid, doomed, args=["--post-copy"])
    assert run.returncode == 7, run.stderr  # in doubt
    if guardian == "killed":
        stop_guardian_of(app.pid)  # SIGKILL: the enclaves hold their own connections
    again, record, log = _restart(bed, doomed)
    assert record["lazy_pages"] and record["answered"], record
    assert "is not adopted" in log, log
    wait_until(lambda: all(s in ("Z", "") for _, s in bed.copies(app)["dst"]), 30,
               "the post-copy tree to be killed")  # fmt: skip
    wait_until(lambda: _daemon_gone(record), 30, "the lazy-pages daemon to end")
    journal = _journal_of(bed, run.pid)
    mids = journal["enclave_mids"]
    assert isinstance(mids, list) and len(mids) == 2, journal
    return app, doomed, again, [bytes.fromhex(m) for m in mids]


def _figure(figures: Figures, cell: str, started: float) -> None:
    """Seconds from the migration's start (a figure, printed at the module's end)."""

    runs = figures.setdefault(cell, {"source_back_runs": []})["source_back_runs"]
    assert isinstance(runs, list)
    runs.append(round(time.monotonic() - started, 2))


def test_a_two_enclave_post_copy_tree_killed_after_the_commit_runs_again_with_both(
    bed: Testbed, figures: Figures
) -> None:
    """The same window with two enclaves (one migration group): the destination
    refuses both ids, both commits are revoked, the source runs on with both
    enclaves and every write of each worker (one per enclave)."""

    started = time.monotonic()
    app, doomed, again, mids = _killed_after_the_commit(bed, guardian="alive")
    try:
        result = recover(bed)
        rows = json.loads(result.stdout)
        assert not {r["outcome"] for r in rows} & {"in-doubt", "lost"}, result.stdout
        assert result.returncode == 0, result.stderr
        src = CounterStore(bed.state("src") / COUNTERS)
        assert [d.kind if d else None for d in map(src.decision, mids)] == ["revoked"] * 2
        dst = CounterStore(bed.state("dst") / COUNTERS)
        assert all(dst.refused(m) and not dst.claimed_by_any(m) for m in mids)
        workers_carry_on(bed, app, "src")
        _figure(
            figures, "post-copy: decision written x kill -9 destination agent, 2 enclaves", started
        )
        assert len(workers(bed, app, "src")) == 2
        workers_kept_every_write(bed, app, "src")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        assert not list((bed.state("dst") / "agent" / "work").glob("*/held.json"))
    finally:
        doomed.stop()
        again.stop()
        end_copies(bed, app)


#: ``refuse {session_id, index}`` per argument pair, asked of a journal's destination
#: agent with a host's agent identity; one answer each ("port", or the error's text).
ASK_REFUSE = """
import json, sys
from pathlib import Path
from migsgx.agent.control import AgentConnection
from migsgx.agent.journal import Journal
from migsgx.agent.tls import AgentIdentity
from migsgx.errors import MigSGXError
journal = Journal.load(Path(sys.argv[2]))
identity = AgentIdentity.of_state(Path(sys.argv[1]))
out = []
for sid, index in json.loads(sys.argv[3]):
    conn = AgentConnection(journal.to, identity, 10)
    try:
        conn.greet("guardian")  # (the session's version: refuse is version 2's)
        msg = {"t": "refuse", "session_id": bytes.fromhex(sid), "index": index}
        out.append("port" if conn.call(msg, "redelivery")["data_port"] else "none")
    except MigSGXError as exc:
        out.append(f"error {exc}")
    finally:
        conn.close()
print(json.dumps(out))
"""


def _ask_refuse(bed: Testbed, at: str, journal: Path, asks: list[tuple[str, int]]) -> list[str]:
    argv = [sys.executable, "-c", ASK_REFUSE, str(bed.state(at)), str(journal), json.dumps(asks)]
    done = subprocess.run(bed.host(at).command(argv), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_refuse_raced_replayed_and_misdirected_revokes_once(bed: Testbed) -> None:
    """Attacks on ``refuse`` after window W2 of post-copy (guardian killed): two
    ``migsgx recover`` racing revoke exactly once (the other is told another one
    is at it, or finds it done); ``refuse`` replayed after the revocation, for an
    enclave the session never had, for an unknown session, from the destination
    host itself, and for a session that resumed, gets an honest answer each and
    changes nothing; no traceback anywhere, the source runs once."""

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-claim:kill"})
    app = start_workers(bed, *WRITING)
    again = None
    try:
        run = bed.migrate(app.pid, doomed, args=["--post-copy"])
        assert run.returncode == 7, run.stderr
        stop_guardian_of(app.pid)
        again, _, _ = _restart(bed, doomed)
        wait_until(lambda: all(s in ("Z", "") for _, s in bed.copies(app)["dst"]), 30,
                   "the post-copy tree to be killed")  # fmt: skip
        journal = _journal_of(bed, run.pid)
        mid = str(journal["mid"])
        [path] = [p for p in (bed.state("src") / "agent" / "migrations").glob("*.json")
                  if json.loads(p.read_text())["mid"] == mid]  # fmt: skip

        # Two recovers at once: one revokes, the other waits its turn or steps aside.
        argv = [sys.executable, "-m", "migsgx", "recover", "--state", str(bed.state("src")),
                "--json"]  # fmt: skip
        racing = [subprocess.Popen(bed.host("src").command(argv), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
                  for _ in range(2)]  # fmt: skip
        outs = [(p.wait(timeout=120), *p.communicate()) for p in racing]
        assert not any("Traceback" in err for _, _, err in outs), outs
        rows = [r for _, out, _ in outs for r in json.loads(out) if r["mid"] == mid]
        assert len(rows) == 2, outs
        revoked = [r for r in rows if r["decision"] == "revoked" and r["outcome"] == "stayed"]
        assert len(revoked) == 1, rows
        [other] = [r for r in rows if r is not revoked[0]]
        assert other["outcome"] == "done" or (
            other["outcome"] == "in-doubt" and "another migsgx recover" in other["detail"]
        ), rows
        assert {code for code, _, _ in outs} <= {0, EXIT_IN_DOUBT}, outs
        log = again.log.read_text(errors="replace")
        assert log.count("was refused here for good") == 1, log
        store = CounterStore(bed.state("src") / COUNTERS)
        decision = store.decision(bytes.fromhex(str(journal["enclave_mids"][0])))
        assert decision is not None and decision.kind == "revoked"
        workers_carry_on(bed, app, "src")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}

        # Replayed and misdirected: answered, nothing revoked again, nothing runs there.
        answers = _ask_refuse(bed, "src", path, [(mid, 0), (mid, 1), ("ab" * 16, 0)])
        assert answers[0] == "port", answers  # (the note stays: a lost REFUSED is asked again)
        assert answers[1].startswith("error") and "no such enclave" in answers[1], answers
        assert "no post-copy session" in answers[2], answers
        [foreign] = _ask_refuse(bed, "dst", path, [(mid, 0)])
        assert "only from the host that began" in foreign, foreign
        again_run = recover(bed)
        assert again_run.returncode == 0, again_run.stdout + again_run.stderr
        assert [r["outcome"] for r in json.loads(again_run.stdout) if r["mid"] == mid] == ["done"]

        # The source moves on for real; a refusal of that session is refused.
        moved = bed.migrate(app.pid, again, args=["--post-copy"])
        assert moved.returncode == 0, moved.stderr
        latest = _journal_of(bed, moved.pid)
        [done_path] = [p for p in (bed.state("src") / "agent" / "migrations").glob("*.json")
                       if json.loads(p.read_text())["mid"] == latest["mid"]]  # fmt: skip
        [resumed] = _ask_refuse(bed, "src", done_path, [(str(latest["mid"]), 0)])
        assert "no post-copy session" in resumed, resumed
        workers_carry_on(bed, app, "dst")
        workers_kept_every_write(bed, app, "dst")
        assert bed.runnable_copies(app) == {"src": 0, "dst": 1}
        log = again.log.read_text(errors="replace")
        assert "Traceback" not in log and log.count("was refused here for good") == 1, log
        decision = store.decision(bytes.fromhex(str(journal["enclave_mids"][0])))
        assert decision is not None and decision.kind == "revoked"
    finally:
        for agent in (doomed, again):
            if agent is not None:
                agent.stop()
        end_copies(bed, app)


def test_a_two_enclave_post_copy_tree_with_one_id_claimed_stays_in_doubt(
    bed: Testbed, figures: Figures
) -> None:
    """One of the two ids claimed on the destination (planted in its store after the
    agent noted the session: the store, not the note, decides): the other enclave's
    commit is revoked, the claimed one's cannot be, so the tree would run without
    that enclave.  ``recover`` says so (in doubt, exit 7) each time it is asked and
    gives nothing back: nothing runs, on either host.  (Last in this module: its
    migration stays in doubt, and every later ``recover`` here would say so.)"""

    started = time.monotonic()
    app, doomed, again, mids = _killed_after_the_commit(bed, guardian="killed")
    try:
        dst = CounterStore(bed.state("dst") / COUNTERS)
        assert dst.claim(b"S" + bytes(34), mids[1])  # (as an enclave there would)
        for attempt in range(2):
            result = recover(bed)
            assert result.returncode == EXIT_IN_DOUBT, result.stdout + result.stderr
            if not attempt:
                cell = ("post-copy: decision written x kill -9 destination agent + guardian, "
                        "2 enclaves, one id claimed")  # fmt: skip
                _figure(figures, cell, started)
            [row] = [r for r in json.loads(result.stdout) if r["outcome"] == "in-doubt"]
            assert row["decision"] == "mixed" and "claimed on this host" in row["detail"], row
            assert "0 revoked, 1 still committed" in row["detail"], row
            assert "operator decides" in row["detail"], row
            assert "Traceback" not in result.stderr, result.stderr
            src = CounterStore(bed.state("src") / COUNTERS)
            kinds = [d.kind if d else None for d in map(src.decision, mids)]
            assert kinds == ["revoked", "commit"], (attempt, kinds)
            assert dst.refused(mids[0]) and not dst.refused(mids[1])
            assert bed.runnable_copies(app) == {"src": 0, "dst": 0}, bed.copies(app)
    finally:
        doomed.stop()
        again.stop()
        end_copies(bed, app)
