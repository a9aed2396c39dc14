"""A tool killed after its own roll-back, before the source ran again.

The destination fails nothing here: the tool rolls back on an injected fault
right before the commit (``tool.before-commit:fail``): the source enclaves
decide ABORT, the destination discards its held tree and says it keeps
nothing.  The tool is then killed (``tool.rolled-back``), alone or with its
guardian, before it continued the fenced tasks, thawed a container or handed
the enclaves back.  Before, the journal said ``done`` from the destination's
answer on: ``migsgx recover`` took the migration for finished, and with the
guardian gone too the source stayed stopped for good.  Now the journal says
``done`` only once the source runs again; until then it says ``aborted``,
which the guardian and ``recover`` finish by giving the source back.

Each cell asserts, after at most one ``migsgx recover``: the source answers
with every acknowledged write, nothing of it is left stopped or frozen, no
copy on the destination, honest exit statuses, no traceback.  The seconds
from the kill to the source answering go to ``fault-matrix``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from bed_helpers import ask, enclave_processes, end_copies, kvstore, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_MOVED_NOT,
    EXIT_OK,
    fault_time,
    loaded_app,
    migrate_with,
    no_images_left,  # noqa: F401
    only_copy,
    record_back,
    recover,
    source_answers,
)

from migsgx.lab.containers import ContainerApp, ContainerLab
from migsgx.lab.testbed import AgentProcess, AppProcess, MigrateRun, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 223
BED_CONTAINERS = True  # the agent starts after the lab (it reads containers.toml)

ROLLED_BACK = "tool.before-commit:fail,tool.rolled-back:{}"
#: (who is killed, the action, whether the application has an enclave)
CELLS = [
    ("tool", "kill", 0),
    ("tool", "kill", 1),
    ("tool + guardian", "kill-guardian-and-tool", 0),
    ("tool + guardian", "kill-guardian-and-tool", 1),
]
IDS = ["tool-no-enclave", "tool-enclave", "tool-guardian-no-enclave", "tool-guardian-enclave"]


def _journal(bed: Testbed, run: MigrateRun) -> tuple[str, dict[str, Any]]:
    """The migration id and journal of ``run``'s tool."""

    for path in (bed.state("src") / "agent" / "migrations").glob("*.json"):
        data = json.loads(path.read_text())
        if data.get("tool_pid") == run.pid:
            return path.stem, data
    raise AssertionError(f"no journal of the tool {run.pid}")


def _killed_after_the_roll_back(run: MigrateRun) -> None:
    """The tool rolled back (the destination kept nothing) and was killed right after."""

    assert run.returncode == -9, run.stderr
    assert "Traceback" not in run.stderr
    assert "migration aborted" in run.stderr, run.stderr
    assert "tool.rolled-back:" in run.stderr, run.stderr


def _at_most_one_recover(bed: Testbed, run: MigrateRun, mid: str, guardian_killed: bool) -> str:
    """With the guardian killed too: one ``migsgx recover``, which says the source stayed.

    Without: none is needed (the guardian gives the source back), and a
    ``recover`` afterwards finds the migration finished.  Returns what the
    cell's ``recover`` figure says.
    """

    if not guardian_killed:
        return "not needed"
    again = recover(bed)
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    outcomes = {r["mid"]: r["outcome"] for r in json.loads(again.stdout)}
    assert outcomes.get(mid) == "stayed", again.stdout
    return str(again.returncode)


def _nothing_in_doubt(bed: Testbed, mid: str) -> None:
    """A later ``recover`` changes nothing: the journal says ``done``."""

    later = recover(bed)
    assert later.returncode == EXIT_OK, later.stdout + later.stderr
    assert all(r["outcome"] != "in-doubt" for r in json.loads(later.stdout)), later.stdout
    path = bed.state("src") / "agent" / "migrations" / f"{mid}.json"
    wait_until(lambda: json.loads(path.read_text())["phase"] == "done", 30, "the journal done")


def _state(answer: str) -> dict[str, Any]:
    return dict(json.loads(answer.removeprefix("STATE ")))


def _process_answers(bed: Testbed, app: AppProcess, digest: str, tool: str) -> float:
    """When the source answered with every acknowledged write (``digest``: its enclave's
    digest, or, without enclaves, its ``STATE`` notes as JSON)."""

    if digest.startswith("DIGEST"):
        return source_answers(bed, app, digest, tool)
    deadline = time.monotonic() + 60
    while True:
        try:
            if _state(ask(bed, app, "src", "STATE"))["notes"] == json.loads(digest):
                return time.monotonic()
        except Exception:  # not answering yet (stopped)
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"the source never ran again, process state {process_state(app.pid)!r}\n"
                    f"--- tool ---\n{tool[-4000:]}"
                ) from None
        time.sleep(0.02)


@pytest.mark.parametrize("who, action, enclaves", CELLS, ids=IDS)
def test_process_killed_between_the_roll_back_and_the_resumption(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], who: str,
    action: str, enclaves: int,
) -> None:  # fmt: skip
    if enclaves:
        app, digest = loaded_app(bed)
    else:
        app = kvstore(bed, "--enclaves", "0")
        assert ask(bed, app, "src", "NOTE n 1") == "OK"
        digest = json.dumps(_state(ask(bed, app, "src", "STATE"))["notes"])
    run = migrate_with(bed, app, agent, ROLLED_BACK.format(action))
    _killed_after_the_roll_back(run)
    mid, journal = _journal(bed, run)
    if "guardian" in action:  # (else the guardian may have finished it already)
        assert journal["phase"] != "done", journal  # the source is stopped: not finished
    said = _at_most_one_recover(bed, run, mid, "guardian" in action)
    back = _process_answers(bed, app, digest, run.stderr) - fault_time(run.stderr, last=True)
    wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the destination to let go")
    assert all(state not in ("T", "t") for _, state in bed.copies(app)["src"])
    _nothing_in_doubt(bed, mid)
    cell = f"rolled back x kill -9 {who}" + ("" if enclaves else " (no enclave)")
    record_back(figures, cell, run, back)
    figures[cell].update(outcome="stayed", recover=said)
    if enclaves:
        only_copy(bed, app, "src", digest)
    else:
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        assert ask(bed, app, "src", "NOTE later 2") == "OK"
        end_copies(bed, app)


def _container_answers(lab: ContainerLab, app: ContainerApp, enclaves: int, digest: str) -> None:
    """The source container runs (no task stopped or frozen) and has every write."""

    wait_until(lambda: lab.runnable_copies(app)["src"] >= 1, 60, "the source container to run")
    assert all(state not in ("T", "t") for _, state in lab.copies(app)["src"])
    assert lab.runnable_copies(app)["src"] == len(lab.copies(app)["src"])  # none frozen
    if enclaves:
        assert lab.ask(app, "DIGEST", at="src") == digest
        assert lab.ask(app, "PUT later " + b"y".hex(), at="src").startswith("OK")  # ECALLs
    else:
        assert json.dumps(_state(lab.ask(app, "STATE", at="src"))["notes"]) == digest
        assert lab.ask(app, "NOTE later 2", at="src") == "OK"


#: runc: every cell; podman and containerd: the one that needs ``recover``, with an enclave.
CONTAINER_CELLS = [("runc", *cell) for cell in CELLS] + [
    (engine, *CELLS[-1]) for engine in ("podman", "containerd")
]
CONTAINER_IDS = [f"runc-{i}" for i in IDS] + ["podman-tool-guardian-enclave",
                                              "containerd-tool-guardian-enclave"]  # fmt: skip


@pytest.mark.parametrize("engine, who, action, enclaves", CONTAINER_CELLS, ids=CONTAINER_IDS)
def test_container_killed_between_the_roll_back_and_the_resumption(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, figures: dict[str, dict[str, object]],
    engine: str, enclaves: int, who: str, action: str,
) -> None:  # fmt: skip
    if enclaves:
        app = lab.start_app(engine, "kvstore")
    else:
        app = lab.start_app(engine, "kvstore", ["--enclaves", "0"], enclaves=False)
    try:
        if enclaves:
            assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
            digest = lab.ask(app, "DIGEST", at="src")
        else:
            assert lab.ask(app, "NOTE n 1", at="src") == "OK"
            digest = json.dumps(_state(lab.ask(app, "STATE", at="src"))["notes"])
        run = bed.migrate(
            None, agent, args=[f"--{engine}", app.name],
            env={"MIGSGX_FAULT": ROLLED_BACK.format(action)},
        )  # fmt: skip
        _killed_after_the_roll_back(run)
        mid, journal = _journal(bed, run)
        if "guardian" in action:
            assert journal["phase"] != "done", journal
        said = _at_most_one_recover(bed, run, mid, "guardian" in action)
        _container_answers(lab, app, enclaves, digest)
        back = time.monotonic() - fault_time(run.stderr, last=True)
        wait_until(lambda: app.name not in lab.containers("dst", engine), 30, "dst to let go")
        assert lab.copies(app)["dst"] == []
        _nothing_in_doubt(bed, mid)
        cell = f"rolled back x kill -9 {who} ({engine}{'' if enclaves else ', no enclave'})"
        record_back(figures, cell, run, back)
        figures[cell].update(outcome="stayed", recover=said)
        assert lab.runnable_copies(app) == {"src": len(lab.copies(app)["src"]), "dst": 0}
    finally:
        lab.remove(app)


def test_an_enclave_back_with_its_application_ends_with_it(
    bed: Testbed, agent: AgentProcess
) -> None:
    """After a roll-back the source enclave lets go of the duplicate it held.

    The tool gives each source enclave a duplicate of its own connection
    (``__mig_hold``), so that its death is no end of file; an aborted enclave
    keeps it until it is back with its application, which then says
    ``__mig_unhold``.  Without that, the enclave would outlive its application
    (killed here) for good.
    """

    before = enclave_processes(bed, "src")
    app, digest = loaded_app(bed)
    ours = enclave_processes(bed, "src") - before
    assert ours
    run = migrate_with(bed, app, agent, "tool.before-commit:fail")
    assert run.returncode == EXIT_MOVED_NOT, run.stderr
    source_answers(bed, app, digest, run.stderr)
    end_copies(bed, app)
    wait_until(lambda: not (enclave_processes(bed, "src") & ours), 30,
               "the enclaves to end with their application")  # fmt: skip
