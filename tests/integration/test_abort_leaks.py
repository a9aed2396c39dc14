"""An aborted source enclave outlives no application.

After an abort each source enclave keeps the duplicate of its connection it was
given (``__mig_hold``) until the application, given the connection back by
``resume``, says ``__mig_unhold``.  Where that word never comes, the
application killed in ``resume`` after it took its connections back (fault point
``app.resume-taken``), or an application runtime older than that call
(``app.resume-taken:no-unhold``), the enclave kept its duplicate, and with it its
process and its state, for good: only root could end it.  Now the tool names the
application with the hold (a pidfd), and an aborted enclave lets its duplicate
go once that process exited, ending as in a crash of the application
(``docs/spec/commit.md`` section 5, ``channels.md`` 7.1).

Each cell: the migration rolls back (``tool.before-commit:fail``, exit 6); the
application's enclave processes end once it is gone; nothing runs on the
destination.  A hold's nonce: ``__mig_held`` tells the duplicate a journal names
from a later one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from bed_helpers import enclave_processes, end_copies, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_MOVED_NOT,
    ask,
    enclave_lost,
    fault_time,
    guardians_of,
    loaded_app,
    migrate_with,
    no_images_left,  # noqa: F401
    only_copy,
    recover,
    source_answers,
)
from pair_helpers import enclave_pair

from migsgx import _proc
from migsgx.agent.ckpt_journal import JOURNAL
from migsgx.agent.journal import journal_dir
from migsgx.agent.tls import AgentIdentity
from migsgx.lab.testbed import AgentProcess, AppProcess, MigrateRun, Testbed
from migsgx.system.process import kill_tree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 237


def _app(bed: Testbed, fault: str) -> tuple[AppProcess, str, set[int]]:
    """A kvstore with ``MIGSGX_FAULT=fault``, acknowledged writes, their digest, its enclaves."""

    before = enclave_processes(bed, "src")
    app = bed.start_app(
        "kvstore", ["--image", str(bed.image("kvstore"))], env={"MIGSGX_FAULT": fault}
    )
    for i in range(3):
        assert ask(bed, app, "src", f"PUT k{i} {f'v{i}'.encode().hex()}") == f"OK {i + 1}"
    ours = enclave_processes(bed, "src") - before
    assert ours
    return app, ask(bed, app, "src", "DIGEST"), ours


def _gone_with_the_application(bed: Testbed, app: AppProcess, ours: set[int]) -> float:
    """The enclaves end once the application is gone; the seconds it took (a figure)."""

    t0 = time.monotonic()
    wait_until(lambda: not (enclave_processes(bed, "src") & ours), 30,
               "the aborted enclaves to end with their application")  # fmt: skip
    assert bed.copies(app)["dst"] == []
    return round(time.monotonic() - t0, 3)


def _tools_of(app_pid: int) -> list[int]:
    """The live ``migsgx migrate`` processes of ``app_pid`` (not their guardians)."""

    found = []
    for pid in _proc.pids():
        argv = _proc.argv(pid)
        if b"migrate" in argv and str(app_pid).encode() in argv and _proc.alive(pid):
            found.append(pid)
    return found


def test_an_application_killed_inside_resume_leaves_no_enclave(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], tmp_path: Path
) -> None:
    """The tool rolled back and hands the enclave back; inside ``resume``, after the
    application took its connections back and before its ``__mig_unhold``, the
    guardian, the tool and the application are killed (in that order).

    Before, nobody was left to say ``__mig_unhold``: the aborted enclave kept its
    duplicate, its process and its state for good (until a root ``migsgx recover``).
    (The application alone killed there was covered already: the tool's hand-back
    fails and its guardian, finding the application gone, lets the duplicate go.)
    Now the enclave sees its application's exit itself and ends within seconds.
    """

    gate = tmp_path / "never"
    app, _, ours = _app(bed, f"app.resume-taken:wait-file={gate}")
    runs: list[MigrateRun] = []
    try:
        tool = threading.Thread(
            target=lambda: runs.append(migrate_with(bed, app, agent, "tool.before-commit:fail"))
        )
        tool.start()
        wait_until(lambda: "migsgx fault: app.resume-taken" in app.log.read_text(errors="replace"),
                   120, "the application to reach its fault point")  # fmt: skip
        guardians, tools = guardians_of(app.pid), _tools_of(app.pid)
        assert guardians and tools
        for pid in [*guardians, *tools]:
            # (a signal only: the tool is this process's child, its status Popen's to reap)
            os.kill(pid, signal.SIGKILL)
        tool.join(60)
        assert runs, "the tool did not end"
        assert runs[0].returncode == -9, runs[0].stderr
        kill_tree(app.pid)
        seconds = _gone_with_the_application(bed, app, ours)
        # The dead tool's images directory is ``recover``'s to remove (its guardian died
        # too); the enclave needed no ``recover`` to end.
        swept = recover(bed)
        assert "Traceback" not in swept.stderr, swept.stderr
        figures["resume x kill -9 guardian, tool, then source app (before __mig_unhold)"] = {
            "outcome": "the aborted enclave ended with its application, no recover (its "
            "state is gone as in any crash of the application); nothing runs twice",
            "exit": runs[0].returncode, "enclave_gone_seconds": seconds,
        }  # fmt: skip
    finally:
        gate.touch()
        end_copies(bed, app)


def test_an_application_that_never_says_unhold_leaves_no_enclave(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """A runtime older than ``__mig_unhold``: the roll-back works, the application
    answers with every write; once it is killed, its enclave ends too."""

    app, digest, ours = _app(bed, "app.resume-taken:no-unhold")
    try:
        run = migrate_with(bed, app, agent, "tool.before-commit:fail")
        assert run.returncode == EXIT_MOVED_NOT, run.stderr
        assert "Traceback" not in run.stderr
        source_answers(bed, app, digest, run.stderr)
        # Alive, the application keeps its enclave: it still answers.
        assert ask(bed, app, "src", "DIGEST") == digest
        assert enclave_processes(bed, "src") & ours == ours
        kill_tree(app.pid)
        seconds = _gone_with_the_application(bed, app, ours)
        figures["rolled back x application without __mig_unhold, then kill -9 app"] = {
            "outcome": "stayed with every write; the enclave ended with its application",
            "exit": run.returncode, "enclave_gone_seconds": seconds,
        }  # fmt: skip
    finally:
        end_copies(bed, app)


def test_the_normal_resume_keeps_the_enclave_while_the_application_lives(
    bed: Testbed, agent: AgentProcess
) -> None:
    """Two roll-backs with ``__mig_unhold`` said (the watch of the first ends with it, the
    second hold is watched afresh): the live application keeps its enclave and every
    write; killed, the enclave ends with it."""

    app, digest, ours = _app(bed, "")
    try:
        for _ in range(2):
            run = migrate_with(bed, app, agent, "tool.before-commit:fail")
            assert run.returncode == EXIT_MOVED_NOT, run.stderr
            source_answers(bed, app, digest, run.stderr)
            assert enclave_processes(bed, "src") & ours == ours
        kill_tree(app.pid)
        _gone_with_the_application(bed, app, ours)
    finally:
        end_copies(bed, app)


def _journals(bed: Testbed) -> dict[str, dict[str, Any]]:
    return {
        path.stem: json.loads(path.read_text())
        for path in (bed.state("src") / "agent" / "migrations").glob("*.json")
    }


def _checkpoint(ck: Path, pid: int, fault: str) -> subprocess.CompletedProcess[str]:
    """``migsgx checkpoint PID --dir CK`` with ``MIGSGX_FAULT=fault``."""

    return subprocess.run(
        [sys.executable, "-m", "migsgx", "checkpoint", str(pid), "--dir", str(ck)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "MIGSGX_FAULT": fault},
    )  # fmt: skip


def test_a_stale_journal_never_takes_a_later_duplicate(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], tmp_path: Path
) -> None:
    """The tool dies before the commit, its guardian hands the aborted enclave back and is
    killed before its journal is ``done`` (``guardian.handed-back``): the journal still
    names the duplicate the enclave let go.  A checkpoint of the same application then
    gives the enclave a new one, at the recorded descriptor number, and waits (the
    destination still holds the first migration's tree, so no second migration to it
    can begin before a ``recover``).  That ``recover`` must leave the new duplicate
    alone (another hold's nonce: ``__mig_held``) and say so.  Before, it took it for the
    first migration's and handed the checkpoint's connection to the application in the
    middle of the checkpoint.  The checkpoint then fails at its commit and gives the
    source back: it runs with every write, once.
    """

    app, digest = loaded_app(bed)
    gate = tmp_path / "go"
    ck = tmp_path / "ck"
    runs: list[subprocess.CompletedProcess[str]] = []
    try:
        first = migrate_with(bed, app, agent, "tool.before-commit:kill,guardian.handed-back:kill")
        assert first.returncode == -9, first.stderr
        assert "migsgx fault: guardian.handed-back:kill" in first.stderr, first.stderr
        source_answers(bed, app, digest, first.stderr)
        (stale_mid, stale), = [(m, j) for m, j in _journals(bed).items()
                               if j.get("tool_pid") == first.pid]  # fmt: skip
        assert stale["phase"] != "done" and len(stale["holders"]) == 1, stale
        fault = f"ckpt.before-dump:wait-file={gate},ckpt.before-commit:fail"
        tool = threading.Thread(target=lambda: runs.append(_checkpoint(ck, app.pid, fault)))
        tool.start()

        def later() -> list[Any]:
            assert not runs, runs[0].stderr  # (the checkpoint ended early)
            with contextlib.suppress(OSError, ValueError):
                return list(json.loads((ck / JOURNAL).read_text()).get("holders") or [])
            return []

        wait_until(later, 60, "the checkpoint's hold")
        held = later()[0]
        assert held[0] == stale["holders"][0][0] and held[3] != stale["holders"][0][3]
        if held[1] != stale["holders"][0][1]:
            # A checkpoint's hold comes before its ring, a migration's after: numbers
            # are reused between holds of one kind.  Made so here (the journal is no
            # order to root either way: any number it names is checked alike).
            path = bed.state("src") / "agent" / "migrations" / f"{stale_mid}.json"
            data = json.loads(path.read_text())
            data["holders"][0][1] = held[1]
            path.write_text(json.dumps(data))
        again = recover(bed)
        assert "Traceback" not in again.stderr
        result = {r["mid"]: r for r in json.loads(again.stdout)}[stale_mid]
        assert result["outcome"] == "stayed", again.stdout
        assert "handed back" not in result["detail"], again.stdout
        assert "holds no duplicate of the recorded migration" in again.stderr, again.stderr
        gate.touch()
        tool.join(120)
        assert runs and runs[0].returncode != 0, runs[0].stdout if runs else "no end"
        assert "Traceback" not in runs[0].stderr
        source_answers(bed, app, digest)
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to be discarded")
        only_copy(bed, app, "src", digest)
        figures["hand-back x kill -9 tool, then guardian; a later hold, then recover"] = {
            "outcome": "recover left the later duplicate alone (not-this-hold); the source "
            "runs once with every write",
            "exit": first.returncode, "recover": again.returncode,
            "checkpoint": runs[0].returncode,
        }  # fmt: skip
    finally:
        gate.touch()
        end_copies(bed, app)


def test_one_enclave_dead_the_other_aborted_goes_back_to_the_application(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """Two enclaves; before the commit the first source enclave and the tool are killed.

    The guardian's aborts: the first is gone (its connection closed, no COMMIT
    recorded: it cannot have committed), the second aborts.  Before, that was the
    roll-forward path: the store said ABORT, the source ran on without its
    enclaves (the application takes all or none) and the live aborted one kept
    its state unreachable.  Now the guardian hands both connections back: the
    surviving enclave answers with every acknowledged write, the dead one's
    connection reaches end of file there, as a crash outside a migration.
    """

    pair = enclave_pair(bed)
    app = pair.app
    try:
        before = _mids(bed)
        run = migrate_with(bed, app, agent, "tool.before-commit:kill-first-source-enclave-and-tool")
        assert run.returncode == -9, run.stderr
        assert "Traceback" not in run.stderr
        assert "died undecided: their state is lost" in run.stderr, run.stderr
        back = round(pair.survivor_answers(60) - fault_time(run.stderr), 3)
        pair.survivor_kept_every_write()
        again = recover(bed)
        assert "Traceback" not in again.stderr
        # (as the guardian found them: it wrote them down)
        assert _names_lost(json.loads(again.stdout), _mids(bed) - before), again.stdout
        results = [r for r in json.loads(again.stdout) if r["outcome"] != "done"]
        assert all(r["outcome"] == "stayed" for r in results), again.stdout
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to be discarded")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        figures["before-commit x kill -9 one of two source enclaves + tool"] = {
            "outcome": "stayed: the surviving enclave back with every write, the dead one's "
            "state lost (said), nothing runs twice",
            "exit": run.returncode, "recover": again.returncode, "back_seconds": back,
        }  # fmt: skip
    finally:
        end_copies(bed, app)


def test_one_enclave_dead_tool_and_guardian_too_one_recover_gives_the_rest_back(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The same, the guardian killed as well: one ``migsgx recover`` takes back the live
    enclave, aborts it and hands it back with an end-of-file connection in place of the
    dead one's (the application takes all or none).  Before, it let the live one go:
    its state ended with its connection."""

    pair = enclave_pair(bed)
    app = pair.app
    try:
        fault = "tool.before-commit:kill-first-source-enclave-guardian-and-tool"
        before = _mids(bed)
        run = migrate_with(bed, app, agent, fault)
        assert run.returncode == -9, run.stderr
        again = recover(bed)
        assert "Traceback" not in again.stderr
        assert "died undecided: their state is lost" in again.stderr, again.stderr
        results = [r for r in json.loads(again.stdout) if r["outcome"] != "done"]
        assert [r["outcome"] for r in results] == ["stayed"], again.stdout
        assert "enclaves handed back" in results[0]["detail"], again.stdout
        assert _names_lost(results, _mids(bed) - before), again.stdout
        back = round(time.monotonic() - fault_time(run.stderr), 3)
        pair.survivor_kept_every_write(writes_after=False)
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to be discarded")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        figures["before-commit x kill -9 guardian, one of two source enclaves, tool"] = {
            "outcome": "stayed after one recover: the surviving enclave back with every "
            "write, the dead one's state lost (said), nothing runs twice",
            "exit": run.returncode, "recover": again.returncode, "back_seconds": back,
        }  # fmt: skip
    finally:
        end_copies(bed, app)


def test_one_enclave_dead_the_tool_lives_exit_11_names_it(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """Two enclaves; before the commit the first source enclave dies, the tool lives.

    The tool rolls back: the surviving enclave goes back to the application with
    every write, the dead one's state is gone.  Before, it exited 6 ("did not
    move: the source runs as before"), true of the process, not of its state; now
    11 (``source-enclave-lost``), naming the dead enclave, and ``recover --json``
    names it too (``lost_enclaves``, from the journal).
    """

    pair = enclave_pair(bed)
    app = pair.app
    try:
        before = _mids(bed)
        run = migrate_with(bed, app, agent, "tool.before-commit:kill-first-source-enclave")
        enclave_lost(run, 0)
        assert "enclave 1 (" not in run.stderr, run.stderr  # (the survivor is not named)
        back = round(pair.survivor_answers(60) - fault_time(run.stderr), 3)
        pair.survivor_kept_every_write()
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to be discarded")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        again = recover(bed)
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
        assert _names_lost(json.loads(again.stdout), _mids(bed) - before), again.stdout
        figures["before-commit x kill -9 one of two source enclaves"] = {
            "outcome": "stayed without the dead enclave's state: the survivor back with every "
            "write, the dead one named (exit 11), nothing runs twice",
            "exit": run.returncode, "back_seconds": back,
        }  # fmt: skip
    finally:
        end_copies(bed, app)


def _mids(bed: Testbed) -> set[str]:
    """The migration ids of the source host's journals (one per migration)."""

    agent = AgentIdentity.of_state(bed.state("src")).directory
    return {path.stem for path in journal_dir(agent).glob("*.json")}


def _names_lost(results: list[dict[str, Any]], mids: set[str]) -> bool:
    """Whether the resolution of the migration in ``mids`` (its one new journal) names
    enclave 0, and only it, as lost, with its MRENCLAVE and process."""

    [ours] = [r for r in results if r["mid"] in mids] or [{}]
    named = ours.get("lost_enclaves") or []
    return [e["index"] for e in named] == [0] and all(
        len(e["mr_enclave"]) == 64 and e["pid"] > 0 for e in named
    )
