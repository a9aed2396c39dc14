"""``migsgx migrate --live`` of a process with real CRIU between two namespaced hosts.

The kvstore app's worker threads keep writing through ECALLs while the enclave
pre-copy rounds run; after the move every value a worker saw acknowledged is
in the destination enclaves, and exactly one runnable copy exists.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("bed_helpers")

from bed_helpers import finish, start_workers, workers, workers_carry_on, workers_kept_every_write  # noqa: E402

from migsgx.lab.testbed import AgentProcess, Testbed  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 77


def test_kvstore_with_writing_workers_moves_live(bed: Testbed, agent: AgentProcess) -> None:
    app = start_workers(bed, "--enclaves", "2", "--workers", "4", "--max-calls", "100000")
    run = bed.migrate(app.pid, agent, args=["--live", "--max-rounds", "4"])
    assert run.returncode == 0, run.stderr
    assert run.stats is not None
    assert run.stats["precopy"] > 0
    assert "round 0:" in run.stderr  # the progress display
    for enclave in run.stats["details"]["enclave_stats"]:
        assert enclave["mode"] == "live"
        assert enclave["rounds"][0]["round"] == 0 and enclave["rounds"][0]["pages"] > 0
        assert enclave["stop_rule"] in ("converged", "no-convergence", "max-rounds")
        assert enclave["final"]["verify_seconds"] >= 0

    workers_carry_on(bed, app, "dst", "the workers to carry on after the move")
    workers_kept_every_write(bed, app, "dst")
    finish(bed, app, expect="dst")


def test_destination_agent_killed_during_the_rounds_leaves_the_source_running(
    bed: Testbed,
) -> None:
    # SIGKILL once 16 MiB of the enclave stream came in: inside round 0 of about 48 MiB.
    doomed = bed.start_agent(
        env={"MIGSGX_FAULT": f"agent.enclave-receive:kill-after-bytes={16 << 20}"}
    )
    app = start_workers(bed, "--workers", "2", "--max-calls", "100000")
    run = bed.migrate(app.pid, doomed, args=["--live"])
    assert run.returncode != 0
    assert "pre-copy failed, the source runs on" in run.stderr, run.stderr
    # The application never stopped: its workers carry on, without an error.
    workers_carry_on(bed, app, "src", "the workers to carry on")
    assert all(not w["errors"] for w in workers(bed, app, "src"))
    finish(bed, app, expect="src")
