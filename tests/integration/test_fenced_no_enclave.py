"""A source without enclaves, fenced, its tool and guardian killed: one ``migsgx recover``.

A migration without enclaves has no source enclave to record a decision: its
commit point is the destination agent's ``resume`` of the held tree
(``docs/spec/commit.md`` 4.3).  Before, ``recover`` took such a fenced journal
for finished (``stayed``) without asking anyone: the source stayed stopped for
good, whether or not the destination ran (no copy at all, or one reported as
the wrong one).  Now it asks the destination agent, which records durably that
it resumed the tree before the tree runs, and gives the source back only if the
destination never resumed it (and holds none); with no answer it says in doubt.

Each cell kills the tool and its guardian (SIGKILL) at one point after the
fence, through the fault hooks (a destination point holds the agent on a file
while the test kills them), then runs one ``migsgx recover`` and asserts:
exactly one running copy, on the side the destination's resume decided, with
every acknowledged write, no task of it left stopped or frozen, the other side
empty, honest exit statuses, no traceback, and a later ``recover`` with
nothing in doubt.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bed_helpers import ask, end_copies, kvstore, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    EXIT_MOVED_NOT,
    EXIT_OK,
    fault_time,
    no_images_left,  # noqa: F401
    recover,
)

from migsgx import _proc
from migsgx.lab.containers import ContainerApp, ContainerLab
from migsgx.lab.testbed import AgentProcess, MigrateRun, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 241
BED_CONTAINERS = True  # the agents start after the lab (they read containers.toml)

KILL = "kill-guardian-and-tool"
#: (cell, the tool's fault, the destination agent's fault point, where the copy runs)
CELLS = [
    ("restore held, fenced", f"tool.before-commit:{KILL}", "", "src"),
    ("resume begun, not sent", f"tool.after-commit:{KILL}", "", "src"),
    ("resume arrived, tree not resumed", "", "agent.before-resume", "dst"),
    ("tree resumed, no answer yet", "", "agent.after-resume", "dst"),
    ("resumed, journal not done", f"tool.after-resumed:{KILL}", "", "dst"),
]
IDS = ["before-commit", "after-commit", "before-resume", "after-resume", "after-resumed"]


def _tool_and_guardian(target: str) -> tuple[int, int]:
    """The running ``migsgx migrate`` toward ``target`` and its guardian."""

    for pid in _proc.pids():
        argv = _proc.argv(pid)
        if b"migsgx.agent.guardian" in argv:
            tool = _proc.parent(pid) or 0
            if b"migrate" in _proc.argv(tool) and target.encode() in _proc.argv(tool):
                return tool, pid
    raise AssertionError(f"no migration toward {target} with a guardian")


def _run_with_kill(
    bed: Testbed, migrate: Callable[[AgentProcess, dict[str, str]], MigrateRun],
    tool_fault: str, agent_point: str, tmp: Path, *, guardian_too: bool = True,
    agent_too: bool = False,
) -> tuple[MigrateRun, AgentProcess, float]:  # fmt: skip
    """Migrate with the cell's fault; the run, the cell's agent and when the kill came.

    A destination point holds that agent on a file: the test kills the guardian
    (unless not ``guardian_too``), then the tool (as the tool's own fault action
    does), then lets it go on; with ``agent_too`` it kills that agent last.
    """

    release = tmp / "release"
    env = {"MIGSGX_FAULT": f"{agent_point}:wait-file={release}"} if agent_point else {}
    agent = bed.start_agent(env=env)
    tool_env = {"MIGSGX_FAULT": tool_fault} if tool_fault else {}
    if not agent_point:
        run = migrate(agent, tool_env)
        return run, agent, fault_time(run.stderr)
    runs: list[MigrateRun] = []
    thread = threading.Thread(target=lambda: runs.append(migrate(agent, tool_env)))
    thread.start()
    try:
        wait_until(lambda: f"migsgx fault: {agent_point}" in agent.log.read_text(errors="replace"),
                   60, f"the destination to reach {agent_point}")  # fmt: skip
        tool, guardian = _tool_and_guardian(agent.target)
        if guardian_too:
            os.kill(guardian, signal.SIGKILL)
            wait_until(lambda: not _proc.alive(guardian), 10, "the guardian to die")
        os.kill(tool, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: not _proc.alive(tool), 10, "the tool to die")
        if agent_too:
            agent.proc.kill()
            assert agent.proc.wait(timeout=30) == -9
    finally:
        release.touch()
        thread.join(60)  # (a live guardian holds the tool's stderr until it is done)
    assert runs, "the tool did not end"
    return runs[0], agent, killed


def _recover_once(bed: Testbed, mid: str, expect: str) -> int:
    """One ``migsgx recover``: the cell's migration ends ``moved`` or ``stayed``."""

    again = recover(bed)
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    outcomes = {r["mid"]: r["outcome"] for r in json.loads(again.stdout)}
    assert outcomes.get(mid) == ("moved" if expect == "dst" else "stayed"), again.stdout
    return again.returncode


def _nothing_in_doubt(bed: Testbed, mid: str) -> None:
    later = recover(bed)
    assert later.returncode == EXIT_OK, later.stdout + later.stderr
    assert all(r["outcome"] != "in-doubt" for r in json.loads(later.stdout)), later.stdout
    path = bed.state("src") / "agent" / "migrations" / f"{mid}.json"
    assert json.loads(path.read_text())["phase"] == "done"


def _journal(bed: Testbed, run: MigrateRun) -> tuple[str, dict[str, Any]]:
    for path in (bed.state("src") / "agent" / "migrations").glob("*.json"):
        data = json.loads(path.read_text())
        if data.get("tool_pid") == run.pid:
            return path.stem, data
    raise AssertionError(f"no journal of the tool {run.pid}")


def _notes(answer: str) -> dict[str, str]:
    return dict(json.loads(answer.removeprefix("STATE "))["notes"])


def _killed(run: MigrateRun) -> None:
    assert run.returncode == -9, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("cell, tool_fault, agent_point, expect", CELLS, ids=IDS)
def test_process_without_enclaves(
    bed: Testbed, figures: dict[str, dict[str, object]], tmp_path: Path,
    cell: str, tool_fault: str, agent_point: str, expect: str,
) -> None:  # fmt: skip
    app = kvstore(bed, "--enclaves", "0")
    assert ask(bed, app, "src", "NOTE n 1") == "OK"  # acknowledged
    notes = _notes(ask(bed, app, "src", "STATE"))
    agent = None
    try:
        run, agent, killed = _run_with_kill(
            bed, lambda a, env: bed.migrate(app.pid, a, env=env), tool_fault, agent_point, tmp_path
        )
        _killed(run)
        mid, journal = _journal(bed, run)
        assert journal["phase"] == "fenced", journal
        # Fenced, and nobody left to continue it: the tree stops (its SIGSTOP was queued)
        # once CRIU, which saw its tool die, has let it go; a moment in between it may
        # read running.
        wait_until(lambda: bed.runnable_copies(app)["src"] == 0, 10, "the fenced source to stop")
        said = _recover_once(bed, mid, expect)
        other = "src" if expect == "dst" else "dst"
        wait_until(lambda: bed.copies(app)[other] == [], 30, f"no copy left on {other}")
        wait_until(lambda: bed.runnable_copies(app)[expect] >= 1, 30, f"{expect} to run")
        assert all(s not in ("T", "t") for _, s in bed.copies(app)[expect])  # none stopped
        assert _notes(ask(bed, app, expect, "STATE")) == notes  # every acknowledged write
        assert ask(bed, app, expect, "NOTE later 2") == "OK"
        back = time.monotonic() - killed
        _nothing_in_doubt(bed, mid)
        figures[f"fenced, no enclave: {cell} x kill -9 tool + guardian (process)"] = {
            "outcome": "moved" if expect == "dst" else "stayed", "exit": run.returncode,
            "recover": said, "seconds_to_one_copy": round(back, 3),
        }  # fmt: skip
    finally:
        if agent is not None:
            agent.stop()
        end_copies(bed, app)


@pytest.mark.parametrize(
    "cell, tool_fault, agent_point, expect",
    [("resume begun, not sent", "tool.after-commit:kill", "", "src"),
     ("resume arrived, tree not resumed", "", "agent.before-resume", "dst")],
    ids=["after-commit", "before-resume"],
)  # fmt: skip
def test_process_without_enclaves_tool_killed_guardian_decides(
    bed: Testbed, figures: dict[str, dict[str, object]], tmp_path: Path,
    cell: str, tool_fault: str, agent_point: str, expect: str,
) -> None:  # fmt: skip
    """Only the tool dies, after it began the resume: its guardian asks the destination.

    Before, a guardian that found ``resume-sent`` left the source stopped and
    exited, whether or not the resume reached the destination: a tool killed
    before its resume went left no running copy.  Now it carries ``recover``'s
    logic itself: no ``recover`` is needed.
    """

    app = kvstore(bed, "--enclaves", "0")
    assert ask(bed, app, "src", "NOTE n 1") == "OK"
    notes = _notes(ask(bed, app, "src", "STATE"))
    agent = None
    try:
        run, agent, killed = _run_with_kill(
            bed, lambda a, env: bed.migrate(app.pid, a, env=env), tool_fault, agent_point,
            tmp_path, guardian_too=False,
        )  # fmt: skip
        _killed(run)
        mid, _ = _journal(bed, run)
        other = "src" if expect == "dst" else "dst"
        wait_until(lambda: bed.copies(app)[other] == [], 60, f"no copy left on {other}")
        wait_until(lambda: bed.runnable_copies(app)[expect] >= 1, 60, f"{expect} to run")
        assert all(s not in ("T", "t") for _, s in bed.copies(app)[expect])
        assert _notes(ask(bed, app, expect, "STATE")) == notes
        back = time.monotonic() - killed
        path = bed.state("src") / "agent" / "migrations" / f"{mid}.json"
        wait_until(lambda: json.loads(path.read_text())["phase"] == "done", 30, "journal done")
        _nothing_in_doubt(bed, mid)
        figures[f"fenced, no enclave: {cell} x kill -9 tool (process)"] = {
            "outcome": "moved" if expect == "dst" else "stayed", "exit": run.returncode,
            "recover": "not needed (the guardian)", "seconds_to_one_copy": round(back, 3),
        }  # fmt: skip
    finally:
        if agent is not None:
            agent.stop()
        end_copies(bed, app)


#: Post-copy: the fence comes before the restore (CRIU serves the pages from the dump on).
POST_COPY_CELLS = [
    ("fenced, pages served, no restore asked", f"tool.before-restore:{KILL}", "", "src"),
    ("restore held, fenced", "", "agent.after-restore", "src"),
    ("resume begun, not sent", f"tool.after-commit:{KILL}", "", "src"),
    ("resume arrived, tree not resumed", "", "agent.before-resume", "dst"),
]


@pytest.mark.parametrize(
    "cell, tool_fault, agent_point, expect", POST_COPY_CELLS,
    ids=["before-restore", "after-restore", "after-commit", "before-resume"],
)  # fmt: skip
def test_post_copy_process_without_enclaves(
    bed: Testbed, figures: dict[str, dict[str, object]], tmp_path: Path,
    cell: str, tool_fault: str, agent_point: str, expect: str,
) -> None:  # fmt: skip
    app = kvstore(bed, "--enclaves", "0")
    assert ask(bed, app, "src", "NOTE n 1") == "OK"
    notes = _notes(ask(bed, app, "src", "STATE"))
    agent = None
    try:
        run, agent, killed = _run_with_kill(
            bed, lambda a, env: bed.migrate(app.pid, a, args=["--post-copy"], env=env),
            tool_fault, agent_point, tmp_path,
        )  # fmt: skip
        _killed(run)
        mid, journal = _journal(bed, run)
        assert journal["phase"] == "fenced", journal
        said = _recover_once(bed, mid, expect)
        other = "src" if expect == "dst" else "dst"
        wait_until(lambda: bed.copies(app)[other] == [], 30, f"no copy left on {other}")
        wait_until(lambda: bed.runnable_copies(app)[expect] >= 1, 30, f"{expect} to run")
        assert all(s not in ("T", "t") for _, s in bed.copies(app)[expect])
        assert _notes(ask(bed, app, expect, "STATE")) == notes
        assert ask(bed, app, expect, "NOTE later 2") == "OK"
        back = time.monotonic() - killed
        _nothing_in_doubt(bed, mid)
        figures[f"post-copy, no enclave: {cell} x kill -9 tool + guardian (process)"] = {
            "outcome": "moved" if expect == "dst" else "stayed", "exit": run.returncode,
            "recover": said, "seconds_to_one_copy": round(back, 3),
        }  # fmt: skip
    finally:
        if agent is not None:
            agent.stop()
        end_copies(bed, app)


def test_destination_unreachable_is_in_doubt_until_it_answers(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """The resume may have gone: without the destination's word the source stays stopped.

    ``recover`` says in doubt (exit 7) and leaves the fenced source stopped;
    once the destination agent answers again (it discarded the tree when it
    stopped, and never resumed it) the next ``recover`` gives the source back.
    """

    app = kvstore(bed, "--enclaves", "0")
    assert ask(bed, app, "src", "NOTE n 1") == "OK"
    notes = _notes(ask(bed, app, "src", "STATE"))
    agent = bed.start_agent()
    again = None
    try:
        run = bed.migrate(app.pid, agent, env={"MIGSGX_FAULT": f"tool.after-commit:{KILL}"})
        _killed(run)
        mid, _ = _journal(bed, run)
        agent.stop()
        doubt = recover(bed)
        assert doubt.returncode == EXIT_IN_DOUBT, doubt.stdout + doubt.stderr
        assert "Traceback" not in doubt.stderr
        outcomes = {r["mid"]: r["outcome"] for r in json.loads(doubt.stdout)}
        assert outcomes.get(mid) == "in-doubt", doubt.stdout
        assert bed.runnable_copies(app) == {"src": 0, "dst": 0}  # neither way yet
        assert process_state(app.pid) in ("T", "t")  # still fenced, never given back
        again = bed.start_agent(listen_port=agent.port)
        assert _recover_once(bed, mid, "src") == EXIT_OK
        wait_until(lambda: bed.runnable_copies(app)["src"] >= 1, 30, "the source to run")
        assert bed.copies(app)["dst"] == []
        assert _notes(ask(bed, app, "src", "STATE")) == notes
        _nothing_in_doubt(bed, mid)
        figures["fenced, no enclave: resume begun x kill -9 tool + guardian, destination "
                "agent down (process)"] = {
            "outcome": "in doubt, then stayed once the agent answers", "exit": run.returncode,
            "recover": f"{doubt.returncode}, then 0",
        }  # fmt: skip
    finally:
        for a in (agent, again):
            if a is not None:
                a.stop()
        end_copies(bed, app)


#: runc: every cell; podman and containerd: the fork risk (the destination resumed).
CONTAINER_CELLS = [("runc", *cell) for cell in CELLS] + [
    (engine, *CELLS[2]) for engine in ("podman", "containerd")
]
CONTAINER_IDS = [f"runc-{i}" for i in IDS] + ["podman-before-resume", "containerd-before-resume"]


@pytest.mark.parametrize(
    "engine, cell, tool_fault, agent_point, expect", CONTAINER_CELLS, ids=CONTAINER_IDS
)
def test_container_without_enclaves(
    bed: Testbed, lab: ContainerLab, figures: dict[str, dict[str, object]], tmp_path: Path,
    engine: str, cell: str, tool_fault: str, agent_point: str, expect: str,
) -> None:  # fmt: skip
    app: ContainerApp = lab.start_app(engine, "kvstore", ["--enclaves", "0"], enclaves=False)
    agent = None
    try:
        assert lab.ask(app, "NOTE n 1", at="src") == "OK"
        notes = _notes(lab.ask(app, "STATE", at="src"))
        run, agent, killed = _run_with_kill(
            bed, lambda a, env: bed.migrate(None, a, args=[f"--{engine}", app.name], env=env),
            tool_fault, agent_point, tmp_path,
        )  # fmt: skip
        _killed(run)
        mid, journal = _journal(bed, run)
        assert journal["phase"] == "fenced", journal
        wait_until(lambda: lab.runnable_copies(app)["src"] == 0, 10, "the fenced source to stop")
        said = _recover_once(bed, mid, expect)
        other = "src" if expect == "dst" else "dst"
        wait_until(lambda: lab.copies(app)[other] == [], 30, f"no copy left on {other}")
        wait_until(lambda: lab.runnable_copies(app)[expect] >= 1, 30, f"{expect} to run")
        # None of its tasks stopped or frozen.
        assert lab.runnable_copies(app)[expect] == len(lab.copies(app)[expect])
        assert _notes(lab.ask(app, "STATE", at=expect)) == notes
        assert lab.ask(app, "NOTE later 2", at=expect) == "OK"
        back = time.monotonic() - killed
        if expect == "dst":
            wait_until(lambda: app.name not in lab.containers("src", engine), 30,
                       "the source container removed")  # fmt: skip
        else:
            wait_until(lambda: app.name not in lab.containers("dst", engine), 30,
                       "the destination container removed")  # fmt: skip
        _nothing_in_doubt(bed, mid)
        figures[f"fenced, no enclave: {cell} x kill -9 tool + guardian ({engine})"] = {
            "outcome": "moved" if expect == "dst" else "stayed", "exit": run.returncode,
            "recover": said, "seconds_to_one_copy": round(back, 3),
        }  # fmt: skip
    finally:
        if agent is not None:
            agent.stop()
        lab.remove(app)


class _App:
    """The cell's application, a process or a runc container, seen the same way."""

    def __init__(self, bed: Testbed, lab: ContainerLab | None, *, post_copy: bool = False) -> None:
        self.bed, self.lab, self.post_copy = bed, lab, post_copy
        self.container: ContainerApp | None = None
        if lab is not None:
            self.container = lab.start_app("runc", "kvstore", ["--enclaves", "0"], enclaves=False)
        else:
            self.process = kvstore(bed, "--enclaves", "0")

    def ask(self, side: str, line: str) -> str:
        if self.lab is not None and self.container is not None:
            return self.lab.ask(self.container, line, at=side)
        return ask(self.bed, self.process, side, line)

    def copies(self, side: str) -> list[tuple[int, str]]:
        if self.lab is not None and self.container is not None:
            return list(self.lab.copies(self.container)[side])
        return list(self.bed.copies(self.process)[side])

    def runnable(self, side: str) -> int:
        if self.lab is not None and self.container is not None:
            return int(self.lab.runnable_copies(self.container)[side])
        return int(self.bed.runnable_copies(self.process)[side])

    def migrate(self, agent: AgentProcess, env: dict[str, str]) -> MigrateRun:
        if self.container is not None:
            return self.bed.migrate(None, agent, args=["--runc", self.container.name], env=env)
        args = ["--post-copy"] if self.post_copy else []
        return self.bed.migrate(self.process.pid, agent, args=args, env=env)

    def end(self) -> None:
        if self.lab is not None and self.container is not None:
            self.lab.remove(self.container)
        else:
            end_copies(self.bed, self.process)


def _guardian_finishes(bed: Testbed, mid: str) -> str:
    """The tool, in doubt, left its guardian to ask the destination (``resume-sent``):
    it does once the restarted agent answers, and no ``recover`` is needed."""

    path = bed.state("src") / "agent" / "migrations" / f"{mid}.json"
    wait_until(lambda: json.loads(path.read_text())["phase"] == "done", 60, "journal done")
    return "not needed (the guardian)"


def _one_copy_on(bed: Testbed, app: _App, side: str, notes: dict[str, str], mid: str) -> None:
    """Exactly one running copy, on ``side``, with every acknowledged write; the other
    side empty, no task stopped or frozen, and nothing in doubt for ``recover``."""

    other = "src" if side == "dst" else "dst"
    wait_until(lambda: app.copies(other) == [], 30, f"no copy left on {other}")
    wait_until(lambda: app.runnable(side) >= 1, 30, f"{side} to run")
    assert app.runnable(side) == len(app.copies(side))  # none of its tasks stopped or frozen
    assert _notes(app.ask(side, "STATE")) == notes
    assert app.ask(side, "NOTE later 2") == "OK"
    _nothing_in_doubt(bed, mid)


@pytest.mark.parametrize("kind", ["process", "runc"])
def test_destination_agent_killed_between_marker_and_continue(
    bed: Testbed, request: pytest.FixtureRequest, figures: dict[str, dict[str, object]],
    kind: str,
) -> None:  # fmt: skip
    """The destination agent dies after it recorded the resume, before the tree ran.

    The marker is the commit point: ``recover`` answers ``resumed`` from it and
    ends the source.  Before, the tree stayed stopped on the destination with
    nobody to continue it (no running copy at all); now the restarted agent
    finds it held with the marker and continues it (a container through its
    engine).
    """

    lab = request.getfixturevalue("lab") if kind == "runc" else None
    app = _App(bed, lab)
    doomed = again = None
    try:
        assert app.ask("src", "NOTE n 1") == "OK"  # acknowledged
        notes = _notes(app.ask("src", "STATE"))
        doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.resume-marked:kill"})
        run = app.migrate(doomed, {})
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == EXIT_IN_DOUBT, run.stderr  # (the resume's answer was lost)
        assert doomed.proc.wait(timeout=30) == -9
        killed = fault_time(doomed.log.read_text(errors="replace"))
        mid, _ = _journal(bed, run)
        assert app.runnable("dst") == 0 and app.copies("dst")  # marked, held, stopped
        again = bed.start_agent(listen_port=doomed.port)
        log = again.log.read_text(errors="replace")
        assert "died before it ran: continued" in log, log
        said = _guardian_finishes(bed, mid)
        _one_copy_on(bed, app, "dst", notes, mid)
        figures[f"no enclave: resume marked, tree not continued x kill -9 destination agent, "
                f"restarted ({kind})"] = {
            "outcome": "moved", "exit": run.returncode, "recover": said,
            "seconds_to_one_copy": round(time.monotonic() - killed, 3),
        }  # fmt: skip
    finally:
        for agent in (doomed, again):
            if agent is not None:
                agent.stop()
        app.end()


@pytest.mark.parametrize("kind", ["process", "runc"])
@pytest.mark.parametrize("tool", ["tool alive", "tool and guardian killed"])
def test_destination_agent_killed_holding_before_marker(
    bed: Testbed, request: pytest.FixtureRequest, figures: dict[str, dict[str, object]],
    tmp_path: Path, kind: str, tool: str,
) -> None:  # fmt: skip
    """The destination agent dies holding a tree without enclaves, before the marker.

    Nobody resumed it, so the source is given back (by the tool, its guardian,
    or one ``recover``).  Before, the tree stayed stopped on the destination for
    an operator; now the restarted agent finds it held without the marker and
    removes it (a container by its engine): nothing is left there.
    """

    lab = request.getfixturevalue("lab") if kind == "runc" else None
    app = _App(bed, lab)
    doomed = again = None
    try:
        assert app.ask("src", "NOTE n 1") == "OK"  # acknowledged
        notes = _notes(app.ask("src", "STATE"))
        if tool == "tool alive":
            doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-resume:kill"})
            run = app.migrate(doomed, {})
            assert "Traceback" not in run.stderr, run.stderr
            assert run.returncode == EXIT_IN_DOUBT, run.stderr
            assert doomed.proc.wait(timeout=30) == -9
            killed = fault_time(doomed.log.read_text(errors="replace"))
        else:
            run, doomed, killed = _run_with_kill(
                bed, lambda a, env: app.migrate(a, env), "", "agent.before-resume", tmp_path,
                agent_too=True,
            )  # fmt: skip
            _killed(run)
        mid, _ = _journal(bed, run)
        assert app.runnable("dst") == 0 and app.copies("dst")  # held, stopped, nobody's
        again = bed.start_agent(listen_port=doomed.port)
        log = again.log.read_text(errors="replace")
        assert "never resumed it: removed" in log, log
        if tool == "tool alive":
            said = _guardian_finishes(bed, mid)
        else:
            said = str(_recover_once(bed, mid, "src"))
        _one_copy_on(bed, app, "src", notes, mid)
        if lab is not None and app.container is not None:
            assert app.container.name not in lab.containers("dst", "runc")
        figures[f"no enclave: tree held, resume not marked x kill -9 destination agent"
                f"{' + tool + guardian' if tool != 'tool alive' else ''}, restarted ({kind})"] = {
            "outcome": "stayed", "exit": run.returncode, "recover": said,
            "seconds_to_one_copy": round(time.monotonic() - killed, 3),
        }  # fmt: skip
    finally:
        for agent in (doomed, again):
            if agent is not None:
                agent.stop()
        app.end()


@pytest.mark.parametrize("point", ["agent.resume-marked", "agent.after-resume"])
def test_resume_failing_after_the_marker_never_gives_the_source_back(
    bed: Testbed, figures: dict[str, dict[str, object]], point: str
) -> None:
    """A ``resume`` that fails after the destination recorded it (``fail`` at ``point``).

    The record is the commit point, so the agent continues the tree (if it had
    not yet) and answers ``agent-past-commit``; the tool ends in doubt (exit 7)
    and its guardian, asking the destination, ends the source.  Before, the
    answer read as a refusal: the tool gave its source back while the
    destination's tree ran too (after ``agent.after-resume``), or later, by its
    record, would (after ``agent.resume-marked``): two running copies.
    """

    app = _App(bed, None)
    agent = None
    try:
        assert app.ask("src", "NOTE n 1") == "OK"  # acknowledged
        notes = _notes(app.ask("src", "STATE"))
        agent = bed.start_agent(env={"MIGSGX_FAULT": f"{point}:fail"})
        run = app.migrate(agent, {})
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "agent-past-commit" in run.stderr, run.stderr
        failed = fault_time(agent.log.read_text(errors="replace"))
        mid, _ = _journal(bed, run)
        said = _guardian_finishes(bed, mid)
        _one_copy_on(bed, app, "dst", notes, mid)
        figures[f"no enclave: resume recorded, then failed ({point}:fail)"] = {
            "outcome": "moved", "exit": run.returncode, "recover": said,
            "seconds_to_one_copy": round(time.monotonic() - failed, 3),
        }  # fmt: skip
    finally:
        if agent is not None:
            agent.stop()
        app.end()


@dataclass
class _PostCopyCell:
    app: _App
    notes: dict[str, str]  # the acknowledged notes, before the migration
    agent: AgentProcess  # the destination agent, with the cell's fault
    run: MigrateRun
    agents: list[AgentProcess]  # every agent of the cell, stopped at its end


@contextlib.contextmanager
def _post_copy_cell(bed: Testbed, fault: str) -> Iterator[_PostCopyCell]:
    """Post-copy, no enclaves: a process with an acknowledged note migrated to a
    destination agent with ``fault``; at the end its agents stop, its copies end."""

    app = _App(bed, None, post_copy=True)
    agents: list[AgentProcess] = []
    try:
        assert app.ask("src", "NOTE n 1") == "OK"  # acknowledged
        notes = _notes(app.ask("src", "STATE"))
        agent = bed.start_agent(env={"MIGSGX_FAULT": fault})
        agents.append(agent)
        run = app.migrate(agent, {})
        assert "Traceback" not in run.stderr, run.stderr
        yield _PostCopyCell(app, notes, agent, run, agents)
    finally:
        for agent in agents:
            agent.stop()
        app.end()


@pytest.mark.parametrize("point", ["agent.resume-marked", "agent.before-resume"])
def test_post_copy_destination_agent_killed_before_the_window_opened(
    bed: Testbed, figures: dict[str, dict[str, object]], point: str
) -> None:
    """Post-copy, no enclaves: the destination agent dies holding the tree, before
    its page window opened (after the resume marker, or before it).

    No other agent can open that window again, so the restarted agent kills the
    tree, which never ran, and forgets a marker it wrote for it: the guardian
    hears ``unknown`` and gives the source back.  Before, the restarted agent
    left a refusal note (for enclave ids there are none of), the destination
    answered ``refusable`` and the source stayed stopped, in doubt, for good
    (after the marker, ``resumed`` would have ended it: no copy at all).
    """

    with _post_copy_cell(bed, f"{point}:kill") as cell:
        run, doomed = cell.run, cell.agent
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert doomed.proc.wait(timeout=30) == -9
        killed = fault_time(doomed.log.read_text(errors="replace"))
        mid, _ = _journal(bed, run)
        again = bed.start_agent(listen_port=doomed.port)
        cell.agents.append(again)
        log = again.log.read_text(errors="replace")
        assert "post-copy tree" in log and "continued" not in log, log
        said = _guardian_finishes(bed, mid)
        _one_copy_on(bed, cell.app, "src", cell.notes, mid)
        figures[f"post-copy, no enclave: tree held x kill -9 destination agent at {point}, "
                "restarted (process)"] = {
            "outcome": "stayed", "exit": run.returncode, "recover": said,
            "seconds_to_one_copy": round(time.monotonic() - killed, 3),
        }  # fmt: skip


#: (the fault point, where the one copy runs, the tool's exit status)
POST_COPY_FAILED = {
    "agent.resume-marked": ("src", EXIT_MOVED_NOT),  # recorded, the window not opened
    "agent.after-resume": ("dst", EXIT_OK),  # the tree ran in its window
}


@pytest.mark.parametrize("point", sorted(POST_COPY_FAILED))
def test_post_copy_resume_failing_before_or_after_its_window_opened(
    bed: Testbed, figures: dict[str, dict[str, object]], point: str
) -> None:
    """Post-copy, no enclaves: the ``resume`` fails (``fail`` at ``point``) after the
    destination recorded it.

    A post-copy tree runs only with its page window.  Before the window opened
    (``agent.resume-marked``) it never ran: the agent takes its record back,
    discards the tree and refuses, and the source runs on (exit 6).  After the
    window opened (``agent.after-resume``) the tree ran with pages already
    served: the agent answers ``agent-past-commit`` and then, as after
    ``resumed``, the window's report; the tool keeps serving pages until that
    report and ends its source as after a success (exit 0).  Before, both
    answers read as a refusal: after the window opened the tool ended the
    pages' server and gave its source back while the destination's tree ran
    (two running copies, or the destination's killed with writes it had
    acknowledged); before it, the tree's resume record stayed on the
    destination (a later ``deliver`` would have heard ``resumed`` and ended the
    source that runs).
    """

    side, status = POST_COPY_FAILED[point]
    with _post_copy_cell(bed, f"{point}:fail") as cell:
        run = cell.run
        assert run.returncode == status, run.stderr
        failed = fault_time(cell.agent.log.read_text(errors="replace"))
        if side == "dst":
            assert "agent-past-commit" in run.stderr, run.stderr
            assert run.stats is not None and run.stats["post_copy_window"] > 0
        mid, _ = _journal(bed, run)
        _one_copy_on(bed, cell.app, side, cell.notes, mid)
        # What a later ``deliver`` for the session answers from: ``resumed`` only if
        # the tree ran (a marker left for a discarded tree would end a source that runs).
        marker = bed.state("dst") / "agent" / "work" / "resumed" / mid
        assert marker.is_file() == (side == "dst"), marker
        figures[f"post-copy, no enclave: resume recorded, then failed ({point}:fail)"] = {
            "outcome": "moved" if side == "dst" else "stayed", "exit": run.returncode,
            "recover": "not needed", "seconds_to_one_copy": round(time.monotonic() - failed, 3),
        }  # fmt: skip
