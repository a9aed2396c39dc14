"""Window W3, the destination agent's death after the claim: the state is kept.

Each destination enclave keeps a duplicate of the agent's end of its connection
from right before its claim (``__mig_hold``, the nonce in the agent's held-tree
record), so that a ``kill -9`` of the agent after the claim (``agent.after-claim``)
or once the tool's ``resume`` arrived (``agent.before-resume``) is no end of file
for it.  The restarted agent takes the duplicates back (``pidfd_getfd``, nonce
checked), resumes the held tree and attaches it; the source's ``migsgx recover``
hears ``resumed`` and ends the source: ``moved``, every acknowledged write on
the destination, nothing on the source, no enclave left over once the tree ends,
and a second ``recover`` finds nothing to do; the same for a runc container.
Before, the enclaves ended with the agent: the tool exited 7 and ``recover``
reported ``lost``.
"""

from __future__ import annotations

import json
import signal

import pytest
from bed_helpers import enclave_processes, wait_until
from fault_helpers import (
    EXIT_IN_DOUBT,
    EXIT_OK,
    ask,
    destination_fault,
    no_images_left,  # noqa: F401  (autouse: after every cell, no images left in /dev/shm)
    recover,
)

from migsgx.lab.containers import ContainerLab
from migsgx.lab.testbed import AgentProcess, Testbed
from migsgx.system.process import kill_tree, process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 107
BED_CONTAINERS = True  # (the runc cell's agents start after the lab: they read containers.toml)


@pytest.mark.parametrize("fault", ["agent.after-claim:kill", "agent.before-resume:kill"])
def test_agent_killed_after_the_claim_moves_after_its_restart(bed: Testbed, fault: str) -> None:
    """The agent dies after the claim: the enclave lives on with its duplicate, the
    restarted agent resumes the tree with it, one ``recover`` on the source ends it."""

    with destination_fault(bed, fault, stop_guardian=True) as c:
        app = c.app
        before = enclave_processes(bed, "dst")
        run = bed.migrate(app.pid, c.doomed)
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "Traceback" not in run.stderr
        assert c.doomed.proc.wait(timeout=10) == -signal.SIGKILL
        # The claimed enclave kept its state past the agent's death.
        survivors = enclave_processes(bed, "dst") - before
        assert survivors, "the destination enclave ended with its agent"
        restarted = c.restart_agent()
        text = restarted.log.read_text(errors="replace")
        assert "their duplicates were taken back" in text, text[-3000:]
        first = recover(bed)
        assert first.returncode == EXIT_OK, first.stdout + first.stderr
        assert "Traceback" not in first.stderr
        outcomes = {r["outcome"] for r in json.loads(first.stdout)}
        # (no "moved": the guardian heard ``resumed`` first and ended the source itself;
        # "done": an earlier cell's migration, already resolved)
        assert outcomes <= {"moved", "done"}, first.stdout
        wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the source to be ended")
        wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 20, "the destination to run")
        assert bed.runnable_copies(app) == {"src": 0, "dst": 1}
        assert ask(bed, app, "dst", "DIGEST") == c.digest
        assert ask(bed, app, "dst", "PUT after " + b"x".hex()).startswith("OK")  # ECALLs work
        # The tree killed after the take-back: its enclave ends with it (no duplicate kept).
        for pid, _ in bed.copies(app)["dst"]:
            kill_tree(pid)
        wait_until(
            lambda: not enclave_processes(bed, "dst") & survivors, 20,
            "the destination enclave to end with its tree",
        )  # fmt: skip
        second = recover(bed)
        assert second.returncode == EXIT_OK, second.stdout + second.stderr
        assert not {r["outcome"] for r in json.loads(second.stdout)} - {"done"}, second.stdout


def test_agent_killed_after_the_claim_moves_a_runc_container(
    bed: Testbed, lab: ContainerLab
) -> None:
    """The same with a runc container: the restarted agent takes the container over
    from its engine, continues it and attaches it to the enclave that kept the state."""

    agents: list[AgentProcess] = [bed.start_agent(env={"MIGSGX_FAULT": "agent.after-claim:kill"})]
    app = lab.start_app("runc", "kvstore")
    try:
        for i in range(3):
            assert lab.ask(app, f"PUT k{i} {f'v{i}'.encode().hex()}", at="src") == f"OK {i + 1}"
        digest = lab.ask(app, "DIGEST", at="src")
        work = str(bed.root / f"dump-{app.marker}")
        run = bed.migrate(None, agents[0], args=["--runc", app.name, "--work-dir", work])
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert agents[0].proc.wait(timeout=10) == -signal.SIGKILL
        agents.append(bed.start_agent(listen_port=agents[0].port))
        text = agents[1].log.read_text(errors="replace")
        assert "their duplicates were taken back" in text, text[-3000:]
        first = recover(bed)
        assert first.returncode == EXIT_OK, first.stdout + first.stderr
        assert not {r["outcome"] for r in json.loads(first.stdout)} & {"in-doubt", "lost"}
        wait_until(lambda: lab.runnable_copies(app)["dst"] == 1, 60, "the destination to run")
        assert lab.ask(app, "DIGEST", at="dst") == digest
        assert lab.ask(app, "PUT after " + b"x".hex(), at="dst").startswith("OK")
        wait_until(lambda: lab.runnable_copies(app)["src"] == 0, 30, "the source to be ended")
        lab.remove_on("runc", app.name, "src")
    finally:
        for agent in agents:
            agent.stop()
        lab.remove(app)
