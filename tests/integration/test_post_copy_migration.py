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
from fault_helpers import recover, stop_guardian_of  # noqa: E402

from migsgx.agent.held import start_time  # noqa: E402
from migsgx.lab.testbed import AgentProcess, Testbed  # noqa: E402
from migsgx.sgx.counters import CounterStore  # noqa: E402
from migsgx.sgx.platform import COUNTERS  # noqa: E402
from migsgx.system.process import process_state  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 83
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
