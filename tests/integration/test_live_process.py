"""``migsgx migrate --live`` of a process with real CRIU between two namespaced hosts.

The kvstore app's worker threads keep writing through ECALLs while the enclave
pre-copy rounds run; after the move every value a worker saw acknowledged is
in the destination enclaves, and exactly one runnable copy exists.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from migsgx.lab.testbed import AgentProcess, AppProcess, Testbed
from migsgx.system.process import kill_tree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 77


def workers(bed: Testbed, app: AppProcess, at: str) -> list[dict[str, Any]]:
    reply = bed.ask("STATE", app.port, at=at, via="dst" if at == "src" else "src")
    return list(json.loads(reply.removeprefix("STATE "))["workers"])


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_kvstore_with_writing_workers_moves_live(bed: Testbed, agent: AgentProcess) -> None:
    app = bed.start_app(
        "kvstore",
        ["--image", str(bed.image("kvstore")), "--enclaves", "2", "--workers", "4",
         "--max-calls", "100000"],
    )  # fmt: skip
    wait_until(
        lambda: all(w["count"] > 20 for w in workers(bed, app, "src")), 20, "the workers to start"
    )
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

    counts = [w["count"] for w in workers(bed, app, "dst")]
    wait_until(
        lambda: all(
            w["count"] > c + 20 for w, c in zip(workers(bed, app, "dst"), counts, strict=True)
        ),
        20,
        "the workers to carry on after the move",
    )
    bed.ask("STOP", app.port, at="dst", via="src")
    final = workers(bed, app, "dst")
    assert all(not w["errors"] for w in final), final
    # Every worker's last acknowledged write is what its enclave holds.
    for i, worker in enumerate(final):
        value = bed.ask(f"WORKER {i}", app.port, at="dst", via="src")
        assert value == "VALUE " + str(worker["count"]).encode().hex()
    assert bed.runnable_copies(app) == {"src": 0, "dst": 1}
    for procs in bed.copies(app).values():
        for pid, _ in procs:
            kill_tree(pid)


def test_destination_agent_killed_during_the_rounds_leaves_the_source_running(
    bed: Testbed,
) -> None:
    # SIGKILL once 16 MiB of the enclave stream came in: inside round 0 of about 48 MiB.
    doomed = bed.start_agent(
        env={"MIGSGX_FAULT": f"agent.enclave-receive:kill-after-bytes={16 << 20}"}
    )
    app = bed.start_app("kvstore", ["--image", str(bed.image("kvstore")), "--workers", "2",
                                    "--max-calls", "100000"])  # fmt: skip
    wait_until(lambda: all(w["count"] > 20 for w in workers(bed, app, "src")), 20, "workers")
    run = bed.migrate(app.pid, doomed, args=["--live"])
    assert run.returncode != 0
    assert "pre-copy failed, the source runs on" in run.stderr, run.stderr
    # The application never stopped: its workers carry on, without an error.
    counts = [w["count"] for w in workers(bed, app, "src")]
    wait_until(
        lambda: all(
            w["count"] > c + 20 for w, c in zip(workers(bed, app, "src"), counts, strict=True)
        ),
        20,
        "the workers to carry on",
    )
    assert all(not w["errors"] for w in workers(bed, app, "src"))
    assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
    for procs in bed.copies(app).values():
        for pid, _ in procs:
            kill_tree(pid)
