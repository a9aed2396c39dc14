"""A live migration rolled back after the hold and before its final transfer.

The tool gives each enclave a duplicate of the application's connection
(``__mig_hold``) at ``prepare``; a live migration's aborts travel on the enclave's
side channel until the final transfer takes the application's connection.  An
abort there left the duplicate held with no abort recorded on it: the
application's ``__mig_unhold`` was refused (``hold-kept``), and every later
migration's hold too, so those ran with nothing for ``migsgx recover`` to take
back.  The abort on the side channel now keeps the duplicate the same way the
application channel's does: the application takes it back, and the next
migration holds again.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("bed_helpers")

from bed_helpers import (  # noqa: E402
    end_copies,
    finish,
    start_workers,
    workers,
    workers_carry_on,
    workers_kept_every_write,
)

from migsgx.lab.testbed import AgentProcess, Testbed  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 213


def test_a_live_abort_after_the_hold_lets_the_next_migration_hold(
    bed: Testbed, agent: AgentProcess
) -> None:
    app = start_workers(bed, "--workers", "2", "--max-calls", "100000")
    try:
        failed = bed.migrate(
            app.pid, agent, args=["--live"], env={"MIGSGX_FAULT": "tool.after-prepare:fail"}
        )
        assert "migsgx fault: tool.after-prepare:fail" in failed.stderr, failed.stderr
        assert failed.returncode == 6, failed.stderr
        assert "Traceback" not in failed.stderr, failed.stderr
        workers_carry_on(bed, app, "src", "the workers to carry on")
        assert all(not w["errors"] for w in workers(bed, app, "src"))
        moved = bed.migrate(app.pid, agent)
        assert moved.returncode == 0, moved.stderr
        assert "keeps no duplicate" not in moved.stderr, moved.stderr
        workers_kept_every_write(bed, app, "dst")
        finish(bed, app, expect="dst")
    finally:
        end_copies(bed, app)
