"""``migsgx migrate --post-copy`` of a process with real CRIU lazy pages between hosts.

The enclaves move and commit as in stop-and-copy; the process's private
memory follows after the commit point, pulled by the destination in CRIU's
mutual TLS.  Every acknowledged write is present afterwards; a failure before
the commit point leaves the source running (exit 6); the source's CRIU lost
inside the window is exit 9 with the destination tree dead, never a process
running with wrong memory.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("bed_helpers")

from bed_helpers import (  # noqa: E402
    end_copies,
    migrate_throttled,
    start_workers,
    wait_until,
    workers,
    workers_carry_on,
    workers_kept_every_write,
)

from migsgx.lab.testbed import AgentProcess, Testbed  # noqa: E402

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
