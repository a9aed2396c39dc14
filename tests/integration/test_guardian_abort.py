"""The party that asked the aborts dies before the source has its enclaves back.

The tool is dead already; its guardian (or a ``migsgx recover`` that took the
connections back from the enclaves) asks every source enclave to abort, the
enclave answers, and that party is killed before the ABORT frame is in the
journal (fault points ``guardian.abort-answered``, ``recover.abort-answered``).
Before, the enclave let the duplicate of its connection go with that answer
(``__mig_hold``), so with every holder gone it saw end of file and ended: the
source application ran on without its enclave and every acknowledged write was
lost.  Now an aborted source enclave keeps its duplicate until the application
has the connection back (``resume``: it says ``__mig_unhold``), and one
``migsgx recover`` takes it back, asks again and hands it to the application
(``docs/spec/commit.md`` section 5, ``channels.md`` 7.1).

Each cell: exactly one runnable copy (the source), every acknowledged write,
the destination's held tree discarded, honest exit statuses.  The seconds from
the last fault to the source answering again go to ``fault-matrix``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator

import pytest
from bed_helpers import enclave_processes, end_copies, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
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

from migsgx import _proc
from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AgentProcess, AppProcess, MigrateRun, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 199


def _guardian_killed(run: MigrateRun) -> None:
    """The tool died first, then its guardian at its abort (both marks in the tool's stderr)."""

    assert run.returncode == -9, run.stderr
    assert "Traceback" not in run.stderr
    assert "migsgx fault: guardian.abort-answered:kill" in run.stderr, run.stderr


def _recovered(bed: Testbed) -> str:
    """One ``migsgx recover``: exit 0, the migration ``stayed``, its enclaves handed back."""

    again = recover(bed)
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    # (the earlier cells' migrations are ``done``)
    results = [r for r in json.loads(again.stdout) if r["outcome"] != "done"]
    assert [r["outcome"] for r in results] == ["stayed"], again.stdout
    assert "enclaves handed back" in results[0]["detail"], again.stdout
    return again.stdout


@pytest.mark.parametrize("run_index", [1, 2, 3])
def test_guardian_killed_after_the_enclave_answered_its_abort(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], run_index: int
) -> None:
    """The tool dies after LOADED, its guardian after the enclave answered its abort.

    The platform service lives, so the store holds the ABORT; the enclave, aborted
    and thawed, is the only holder of the application's state and of its own
    connection.  One ``recover`` takes the connection back and hands it to the
    application; the ABORT reaches the destination, whose held tree goes.
    """

    app, digest = loaded_app(bed)
    cell = "abort answered (guardian) x kill -9 tool, then guardian"
    try:
        run = migrate_with(bed, app, agent, "tool.before-commit:kill,guardian.abort-answered:kill")
        _guardian_killed(run)
        _recovered(bed)
        back = source_answers(bed, app, digest, run.stderr) - fault_time(run.stderr, last=True)
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to be discarded")
        record_back(figures, cell, run, back)
        figures[cell].update(recover=EXIT_OK, outcome="stayed after one recover, every write")
        only_copy(bed, app, "src", digest)
    finally:
        end_copies(bed, app)


def test_guardian_killed_holding_the_only_abort_frame(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The same with the source platform service dead: the ABORT exists only in memory.

    The tool rolls back after its first COMMIT failed (the platform service died
    at ``tool.after-group``), its enclave aborts unrecorded, and the tool dies with
    the frame (``tool.abort-answered``); the guardian asks the enclave for it
    again (``__mig_abort_frame``) and is killed before the journal has it.  The
    enclave keeps its duplicate: one ``recover`` asks it for the frame once more,
    hands it back and carries the ABORT.
    """

    app, digest = loaded_app(bed)
    cell = ("abort asked again (guardian) x kill -9 source platform service, tool, "
            "then guardian")  # fmt: skip
    fault = ("tool.after-group:kill-source-platform,tool.abort-answered:kill,"
             "guardian.abort-answered:kill")  # fmt: skip
    try:
        try:
            run = migrate_with(bed, app, agent, fault)
            _guardian_killed(run)
            assert "its ABORT frame, asked again" in run.stderr, run.stderr
        finally:
            bed.services["src"].stop()  # killed: the host's supervisor starts a fresh one
            bed.services["src"] = start_service(
                bed.state("src"), prefix=bed.host("src").command([])
            )
        _recovered(bed)
        back = source_answers(bed, app, digest, run.stderr) - fault_time(run.stderr, last=True)
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to be discarded")
        figures[cell] = {
            "outcome": "stayed after one recover (the frame asked again), every write",
            "exit": run.returncode, "recover": EXIT_OK, "source_back_seconds": round(back, 3),
        }  # fmt: skip
        only_copy(bed, app, "src", digest)
    finally:
        end_copies(bed, app)


def test_recover_killed_after_the_enclave_answered_its_abort(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """Tool and guardian die after LOADED; a ``recover`` takes the connection back, the
    enclave answers its abort, and that ``recover`` is killed.  The next one finds the
    enclave still holding its duplicate and finishes: the source runs with every write."""

    app, digest = loaded_app(bed)
    cell = "abort answered (recover) x kill -9 tool + guardian, then recover"
    try:
        run = migrate_with(bed, app, agent, "tool.before-commit:kill-guardian-and-tool")
        assert run.returncode == -9, run.stderr
        killed = recover(bed, "recover.abort-answered:kill")
        assert killed.returncode == -9, killed.stdout + killed.stderr
        assert "migsgx fault: recover.abort-answered:kill" in killed.stderr, killed.stderr
        _recovered(bed)
        back = source_answers(bed, app, digest, run.stderr) - fault_time(killed.stderr)
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to be discarded")
        figures[cell] = {
            "outcome": "stayed after the killed recover and one more, every write",
            "exit": run.returncode, "recover": [killed.returncode, EXIT_OK],
            "source_back_seconds": round(back, 3),
        }  # fmt: skip
        only_copy(bed, app, "src", digest)
    finally:
        end_copies(bed, app)


# --- an enclave that hangs (SIGSTOP: alive, its connection open, no answer) -----------------------
def _stopped(bed: Testbed) -> list[int]:
    return [p for p in enclave_processes(bed, "src") if process_state(p) in ("T", "t")]


def _stopped_enclave(bed: Testbed) -> int:
    """The source enclave the fault stopped (the only one there in state T)."""

    [pid] = _stopped(bed)
    return pid


@contextlib.contextmanager
def _hung_cell(bed: Testbed, *args: str) -> Iterator[tuple[AppProcess, str]]:
    """A loaded kvstore (``args`` after its image) and its digest for a cell that stops
    an enclave; at the end every source enclave is continued (a stopped one would
    outlive the cell) and every copy ended."""

    app, digest = loaded_app(bed, *args)
    try:
        yield app, digest
    finally:
        for pid in enclave_processes(bed, "src"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        end_copies(bed, app)


@pytest.mark.parametrize(
    "cell, enclaves, point",
    [
        ("before-commit x SIGSTOP source enclave + kill -9 tool", 1, "tool.before-commit"),
        ("after-group x SIGSTOP one of two source enclaves + kill -9 tool", 2,
         "tool.after-group"),
    ],
)  # fmt: skip
def test_a_hung_undecided_enclave_is_asked_until_it_answers(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    cell: str,
    enclaves: int,
    point: str,
) -> None:
    """The tool stops the first source enclave (it lives, its connection open, it answers
    nothing) and dies before any decision.

    The guardian asks the aborts, each bounded: the stopped one does not answer
    and has no recorded decision.  Before, that sent the guardian down the
    roll-forward path: nothing committed, the source stayed fenced (a second
    enclave, aborted, went back to nobody) and the destination held, in doubt.
    Now it is told from a dead and from a decided one, and asked again until it
    answers; once continued it aborts, and the source runs with every
    acknowledged write in every enclave.
    """

    with _hung_cell(bed, "--enclaves", str(enclaves)) as (app, digest):
        run = migrate_with(bed, app, agent, f"{point}:stop-first-source-enclave-and-tool")
        assert run.returncode == -9 and "Traceback" not in run.stderr, run.stderr
        assert "do not answer, their connections open" in run.stderr, run.stderr
        assert "the destination rolls forward" not in run.stderr, run.stderr
        os.kill(_stopped_enclave(bed), signal.SIGCONT)  # the hung enclave comes back
        back = source_answers(bed, app, digest, run.stderr) - fault_time(run.stderr)
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to be discarded")
        again = recover(bed)
        assert again.returncode == EXIT_OK and "Traceback" not in again.stderr, again.stdout
        assert {r["outcome"] for r in json.loads(again.stdout)} <= {"done", "stayed"}
        figures[cell] = {
            "outcome": "stayed once the enclave answered (SIGCONT), every write; the "
            "seconds include the 5 s bound on its first abort",
            "exit": run.returncode, "recover": EXIT_OK, "source_back_seconds": round(back, 3),
        }  # fmt: skip
        only_copy(bed, app, "src", digest)


def test_a_hung_committed_enclave_the_store_decides(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The source enclave committed (recorded), then the tool stops it and dies.

    The COMMIT in the platform store decides: the guardian rolls forward, the
    destination runs with every write; the stopped committed enclave, once
    continued, is released and ends.  Nothing runs twice.
    """

    runs: list[MigrateRun] = []
    fault = "tool.after-commit:stop-first-source-enclave-and-tool"
    with _hung_cell(bed) as (app, digest):
        tool = threading.Thread(target=lambda: runs.append(migrate_with(bed, app, agent, fault)))
        tool.start()  # (it returns once its guardian ends: the release waits for the enclave)
        wait_until(lambda: _stopped(bed), 90, "the fault to stop the source enclave")
        stopped = _stopped_enclave(bed)
        wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 90, "the destination to run")
        assert process_state(stopped) in ("T", "t")  # (the COMMIT decided without it)
        os.kill(stopped, signal.SIGCONT)
        wait_until(lambda: not _proc.alive(stopped), 60, "the committed enclave to be released")
        tool.join(60)
        [run] = runs
        assert run.returncode == -9 and "Traceback" not in run.stderr, run.stderr
        figures["after-commit x SIGSTOP source enclave + kill -9 tool"] = {
            "outcome": "moved (the recorded COMMIT decides), every write", "exit": run.returncode,
        }  # fmt: skip
        only_copy(bed, app, "dst", digest)
