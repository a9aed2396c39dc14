"""``migsgx recover`` on the destination host, its agent dead: its held trees.

The destination agent is killed after the claim (``agent.after-claim:kill``,
window W3): the claimed enclaves keep the only copy, the tree waits stopped.
``migsgx recover --state DST`` takes it over as the restarted agent's start-up
pass would (the duplicates taken back, the tree continued and attached): the
tree runs with every acknowledged write; the agent restarted finds nothing
left, and one ``recover`` on the source ends the stopped source (``moved``):
exactly one runnable copy.  Killed before the claim (W2: undecided, the tree
waits for the state again), the held tree is listed in doubt (exit 7) with its
migration id, what is held and the step (start the agent); with the agent back
(its work directory's lock held) the destination's recover reports nothing and
touches nothing (exit 0), and one source ``recover`` moves it.  Before, recover
on the destination read only source journals: nothing in doubt, exit 0, while
the tree waited stopped.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from bed_helpers import wait_until
from fault_helpers import (
    EXIT_IN_DOUBT,
    EXIT_OK,
    ask,
    destination_fault,
    guardians_of,
    no_images_left,  # noqa: F401  (autouse: after every cell, no images left in /dev/shm)
    only_copy,
    recover,
    stop_guardian_of,
)

from migsgx.lab.containers import ContainerLab
from migsgx.lab.testbed import AgentProcess, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 253
BED_CONTAINERS = True  # (the runc cell's agents start after the lab: they read containers.toml)


def recover_dst(bed: Testbed) -> subprocess.CompletedProcess[str]:
    """``migsgx recover --json`` on the destination host (its state)."""

    argv = [sys.executable, "-m", "migsgx", "recover", "--state", str(bed.state("dst")), "--json"]
    return subprocess.run(
        bed.host("dst").command(argv), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_a_claimed_tree_is_resumed_by_recover_on_the_destination(bed: Testbed) -> None:
    """W3, the agent dead: the destination's recover resumes the tree with its enclaves."""

    with destination_fault(bed, "agent.after-claim:kill", stop_guardian=True) as c:
        app = c.app
        run = bed.migrate(app.pid, c.doomed)
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert c.doomed.proc.wait(timeout=10) == -signal.SIGKILL
        assert bed.runnable_copies(app) == {"src": 0, "dst": 0}
        took = recover_dst(bed)
        assert took.returncode == EXIT_OK, took.stdout + took.stderr
        assert "Traceback" not in took.stderr
        [resumed] = json.loads(took.stdout)
        assert (resumed["phase"], resumed["outcome"]) == ("resumed", "moved"), resumed
        assert resumed["held"]["claimed"] >= 1, resumed
        wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 20, "the destination to run")
        assert bed.runnable_copies(app) == {"src": 0, "dst": 1}
        assert ask(bed, app, "dst", "DIGEST") == c.digest
        restarted = c.restart_agent()
        text = restarted.log.read_text(errors="replace")
        assert "former agent" not in text, text[-3000:]  # (nothing left for its pass)
        first = recover(bed)
        assert first.returncode == EXIT_OK, first.stdout + first.stderr
        assert {r["outcome"] for r in json.loads(first.stdout)} <= {"moved", "done"}
        wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the source to be ended")
        again = recover_dst(bed)
        assert again.returncode == EXIT_OK and json.loads(again.stdout) == [], again.stdout
        only_copy(bed, app, "dst", c.digest)


def test_an_undecided_held_tree_is_in_doubt_until_the_agent_takes_it(bed: Testbed) -> None:
    """W2, the agent dead: listed in doubt (exit 7); the agent back: its own, exit 0."""

    with destination_fault(bed, "agent.before-claim:kill", stop_guardian=True) as c:
        app = c.app
        run = bed.migrate(app.pid, c.doomed)
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert c.doomed.proc.wait(timeout=10) == -signal.SIGKILL
        stop_guardian_of(app.pid)  # (nobody delivers the state meanwhile: deterministic)
        wait_until(lambda: not guardians_of(app.pid), 30, "the guardian to be gone")
        doubt = recover_dst(bed)
        assert doubt.returncode == EXIT_IN_DOUBT, doubt.stdout + doubt.stderr
        assert "Traceback" not in doubt.stderr
        [held] = json.loads(doubt.stdout)
        assert (held["phase"], held["outcome"]) == ("held", "in-doubt"), held
        assert held["held"]["enclaves"] >= 1 and held["held"]["claimed"] == 0, held
        assert "migsgx agent serve --state" in held["step"], held
        journals = bed.state("src") / "agent" / "migrations"
        assert (journals / f"{held['mid']}.json").is_file()  # (the migration's id)
        [(pid, stopped)] = bed.copies(app)["dst"]
        assert stopped == "T"
        restarted = c.restart_agent()
        assert "adopted the tree a former agent held" in restarted.log.read_text(errors="replace")
        live = recover_dst(bed)
        assert live.returncode == EXIT_OK, live.stdout + live.stderr
        assert json.loads(live.stdout) == [], live.stdout
        assert "the agent that serves this state" in live.stderr, live.stderr
        assert bed.copies(app)["dst"] == [(pid, "T")]  # nothing touched
        moved = recover(bed)
        assert moved.returncode == EXIT_OK, moved.stdout + moved.stderr
        assert "moved" in {r["outcome"] for r in json.loads(moved.stdout)}, moved.stdout
        wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the source to be ended")
        only_copy(bed, app, "dst", c.digest)


def test_a_claimed_runc_container_is_resumed_by_recover_on_the_destination(
    bed: Testbed, lab: ContainerLab
) -> None:
    """The same with a runc container: recover reads the agent's configuration from the
    state (its containers.toml) and takes the container over from its engine."""

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
        took = recover_dst(bed)
        assert took.returncode == EXIT_OK, took.stdout + took.stderr
        [resumed] = json.loads(took.stdout)
        assert (resumed["phase"], resumed["outcome"]) == ("resumed", "moved"), resumed
        assert resumed["held"]["driver"] == "runc", resumed
        wait_until(lambda: lab.runnable_copies(app)["dst"] == 1, 60, "the destination to run")
        assert lab.ask(app, "DIGEST", at="dst") == digest
        agents.append(bed.start_agent(listen_port=agents[0].port))
        first = recover(bed)
        assert first.returncode == EXIT_OK, first.stdout + first.stderr
        assert not {r["outcome"] for r in json.loads(first.stdout)} & {"in-doubt", "lost"}
        wait_until(lambda: lab.runnable_copies(app)["src"] == 0, 30, "the source to be ended")
        assert lab.ask(app, "PUT after " + b"x".hex(), at="dst").startswith("OK")
        lab.remove_on("runc", app.name, "src")
    finally:
        for agent in agents:
            agent.stop()
        lab.remove(app)
