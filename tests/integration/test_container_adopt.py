"""A restarted destination agent adopts a held container (window W2), with real runc and CRIU.

The destination agent is killed (``agent.before-claim:kill``) as the source's
first decision frame reaches its loaded copy: the copy ends with the agent,
the restored container stays, every task stopped, and the agent's record of
it (``held.json``) stays in the session's work directory.  The test restarts
the agent on its port; it takes the container over from its engine.  Then a
COMMIT (delivered again by the guardian, or after one ``migsgx recover``)
brings the state to a fresh enclave and resumes the container; an ABORT
removes it by its engine, and nothing of it is left on the destination.
Each cell checks exactly one runnable copy holding every acknowledged write;
its seconds are printed as ``fault-matrix {...}`` at the module's end (figures,
not asserts; the table in ``docs/migration.md`` comes from them).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("bed_helpers", "fault_helpers")

from bed_helpers import wait_until  # noqa: E402
from fault_helpers import EXIT_IN_DOUBT, EXIT_OK, fault_time, recover  # noqa: E402

from migsgx.agent.held import start_time  # noqa: E402
from migsgx.containers import HostConfig, make_driver  # noqa: E402
from migsgx.criu import Criu  # noqa: E402
from migsgx.lab.containers import ContainerApp, ContainerLab  # noqa: E402
from migsgx.lab.testbed import AgentProcess, MigrateRun, Testbed  # noqa: E402
from migsgx.system.process import process_state, tree_pids  # noqa: E402

Figures = dict[str, dict[str, object]]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 131
BED_CONTAINERS = True  # the agents start after the lab (they read containers.toml)

KILL_AT_CLAIM = {"MIGSGX_FAULT": "agent.before-claim:kill"}


def migrate(bed: Testbed, app: ContainerApp, agent: AgentProcess, fault: str = "") -> MigrateRun:
    return bed.migrate(
        None, agent, args=[f"--{app.engine}", app.name,
                           "--work-dir", str(bed.root / f"dump-{app.marker}")],
        env={"MIGSGX_FAULT": fault} if fault else None,
    )  # fmt: skip


def loaded(lab: ContainerLab, engine: str) -> tuple[ContainerApp, str]:
    """A kvstore container with acknowledged writes; their digest."""

    app = lab.start_app(engine, "kvstore")
    for i in range(3):
        assert lab.ask(app, f"PUT k{i} {f'v{i}'.encode().hex()}", at="src") == f"OK {i + 1}"
    return app, lab.ask(app, "DIGEST", at="src")


@pytest.fixture
def agents(bed: Testbed) -> Iterator[list[AgentProcess]]:
    """The doomed agent, then the restarted one; both stopped at the end."""

    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def restart(bed: Testbed, agents: list[AgentProcess]) -> AgentProcess:
    doomed = agents[0]
    assert doomed.proc.wait(timeout=30) == -9
    again = bed.start_agent(listen_port=doomed.port)
    agents.append(again)
    log = again.log.read_text(errors="replace")
    assert "adopted the tree a former agent held" in log, log
    return again


def moved(lab: ContainerLab, app: ContainerApp, digest: str, agent: AgentProcess) -> None:
    """The container runs on the destination with every acknowledged write, once."""

    wait_until(lambda: lab.runnable_copies(app)["dst"] == 1, 60, "the destination to run")
    log = agent.log.read_text(errors="replace")
    assert "receives the state again" in log and "decision delivered: resumed" in log, log
    assert lab.ask(app, "DIGEST", at="dst") == digest
    assert lab.ask(app, "PUT after " + b"x".hex(), at="dst").startswith("OK")  # ECALLs work
    # Resumed: no mark says any more that a restore of this agent made it.
    agent_dir = lab.bed.state("dst") / "agent"
    assert not (agent_dir / "runc" / app.name / "migsgx-owner").exists()
    assert not list(agent_dir.glob(f"*/{app.name}.owner"))
    # The committed source never runs again: it is removed through its engine (runc,
    # podman, containerd) once the guardian or a recover hears that the destination runs.
    assert lab.runnable_copies(app) == {"src": 0, "dst": 1}
    lab.remove_on(app.engine, app.name, "src")
    assert app.name not in lab.containers("src", app.engine)
    assert app.name in lab.containers("dst", app.engine)
    lab.remove(app)


def source_answers(lab: ContainerLab, app: ContainerApp, digest: str) -> float:
    """Poll the source until it answers with every acknowledged write; when it did."""

    def answers() -> bool:
        try:
            return lab.ask(app, "DIGEST", at="src") == digest
        except Exception:  # not answering yet (frozen, or its enclave not back)
            return False

    wait_until(answers, 60, "the source to answer again")
    return time.monotonic()


def nothing_left(lab: ContainerLab, app: ContainerApp) -> None:
    """No container, bundle, cgroup or mount of ``app`` on the destination."""

    assert app.name not in lab.containers("dst", app.engine)
    assert lab.copies(app)["dst"] == []
    bundle = lab.bed.state("dst") / "agent" / "runc" / app.name
    assert not bundle.exists()
    parent = lab.settings["dst"].cgroup_parent
    assert parent and not (Path("/sys/fs/cgroup") / parent.lstrip("/") / app.name).exists()
    assert str(bundle) not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.parametrize("engine", ["runc", "containerd", "podman"])
def test_agent_killed_after_the_decision_adopts_the_held_container(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess], figures: Figures, engine: str
) -> None:
    """The tool stays and ends in doubt (exit 7); one recover moves the container."""

    agents.append(bed.start_agent(env=KILL_AT_CLAIM))
    app, digest = loaded(lab, engine)
    t0 = time.monotonic()
    try:
        run = migrate(bed, app, agents[0])
        assert "Traceback" not in run.stderr
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert lab.runnable_copies(app) == {"src": 0, "dst": 0}  # held, unowned
        agent = restart(bed, agents)
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        outcomes = {r["outcome"] for r in json.loads(again.stdout)}  # (earlier cells' too)
        assert not outcomes & {"in-doubt", "lost"}, again.stdout
        moved(lab, app, digest, agent)
        figures[f"decision written x kill -9 destination agent ({engine})"] = {
            "outcome": "moved after one recover (the restarted agent adopted the container)",
            "exit": run.returncode, "recover": again.returncode,
            "seconds": round(time.monotonic() - t0, 3),
        }  # fmt: skip
    finally:
        lab.remove(app)


def test_tool_and_agent_killed_after_the_decision_moves_the_container(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess], figures: Figures
) -> None:
    """The tool dies right after the commit; its guardian carries the decision and
    delivers the state again to the restarted agent (at most one recover)."""

    agents.append(bed.start_agent(env=KILL_AT_CLAIM))
    app, digest = loaded(lab, "runc")
    t0 = time.monotonic()
    try:
        run = migrate(bed, app, agents[0], "tool.after-commit:kill")
        assert run.returncode == -9, run.stderr
        agent = restart(bed, agents)
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        moved(lab, app, digest, agent)
        figures["decision written x kill -9 tool + destination agent (runc)"] = {
            "outcome": "moved after one recover", "exit": run.returncode,
            "recover": again.returncode, "seconds": round(time.monotonic() - t0, 3),
        }  # fmt: skip
    finally:
        lab.remove(app)


def test_abort_discards_the_adopted_container(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess], figures: Figures
) -> None:
    """The tool dies before the commit; the guardian's ABORT kills the agent as it
    reaches the loaded copy.  The restarted agent adopts the container, and the
    ABORT delivered again (``decision: abort``) removes it by its engine: the
    source runs on with every write, nothing is left on the destination."""

    agents.append(bed.start_agent(env=KILL_AT_CLAIM))
    app, digest = loaded(lab, "runc")
    try:
        run = migrate(bed, app, agents[0], "tool.before-commit:kill")
        assert run.returncode == -9, run.stderr
        t_back = source_answers(lab, app, digest)
        agent = restart(bed, agents)
        t_restarted = time.monotonic()
        bundle = bed.state("dst") / "agent" / "runc" / app.name
        wait_until(lambda: app.name not in lab.containers("dst", "runc") and not bundle.exists(),
                   60, "the adopted container to be discarded")  # fmt: skip
        t_gone = time.monotonic()
        assert "decision delivered: aborted" in agent.log.read_text(errors="replace")
        nothing_left(lab, app)
        assert lab.runnable_copies(app) == {"src": 1, "dst": 0}
        assert lab.ask(app, "DIGEST", at="src") == digest
        assert lab.ask(app, "PUT later " + b"y".hex(), at="src").startswith("OK")
        figures["LOADED x kill -9 tool + destination agent (runc, restarted)"] = {
            "outcome": "stayed, the adopted container removed by its engine (ABORT again)",
            "exit": run.returncode,
            "source_back_seconds": round(t_back - fault_time(run.stderr), 3),
            "discarded_seconds_after_restart": round(t_gone - t_restarted, 3),
        }  # fmt: skip
    finally:
        lab.remove(app)


def test_a_record_its_engine_does_not_know_is_not_adopted(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess]
) -> None:
    """The record names a container runc does not know (damaged, or planted): the
    restarted agent says so and kills the recorded tree, and removes the container
    its restore made for that session (found by its bundle's mark, not by the
    record's name); nothing on the destination runs, stays held or is left, and the
    source, given back by the guardian, runs on."""

    agents.append(bed.start_agent(env=KILL_AT_CLAIM))
    app, digest = loaded(lab, "runc")
    try:
        run = migrate(bed, app, agents[0], "tool.before-commit:kill")
        assert run.returncode == -9, run.stderr
        source_answers(lab, app, digest)
        assert agents[0].proc.wait(timeout=30) == -9
        [path] = (bed.state("dst") / "agent" / "work").glob("*/held.json")
        record = json.loads(path.read_text())
        assert record["driver"] == "runc" and record["handle"]["id"] == app.name
        record["handle"]["id"] = f"{app.name}-forged"
        path.write_text(json.dumps(record))
        again = bed.start_agent(listen_port=agents[0].port)
        agents.append(again)
        log = again.log.read_text(errors="replace")
        assert "cannot be adopted" in log and "runc no longer knows container" in log, log
        assert "adopted the tree" not in log, log
        # runc's entry and the bundle too: the bundle's mark names the record's session.
        assert f"removed the runc container {app.name}" in log, log
        nothing_left(lab, app)
        assert lab.runnable_copies(app) == {"src": 1, "dst": 0}
        assert lab.ask(app, "DIGEST", at="src") == digest
    finally:
        lab.remove(app)


def test_a_container_restored_but_never_reported_held_is_removed(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess], figures: Figures
) -> None:
    """The agent dies right after the restore, before it answers ``restored``
    (``agent.after-restore:kill``): the source cannot have decided, and runs on
    (exit 6).  The restarted agent removes the container by its engine from its
    record, so that the next migration of the same container is not refused for
    a container of that id left on this host."""

    agents.append(bed.start_agent(env={"MIGSGX_FAULT": "agent.after-restore:kill"}))
    app, digest = loaded(lab, "runc")
    try:
        run = migrate(bed, app, agents[0])
        assert run.returncode == 6, run.stderr
        t_back = source_answers(lab, app, digest)
        assert agents[0].proc.wait(timeout=30) == -9
        again = bed.start_agent(listen_port=agents[0].port)
        agents.append(again)
        log = again.log.read_text(errors="replace")
        assert "never reported held" in log and "adopted the tree" not in log, log
        nothing_left(lab, app)
        second = migrate(bed, app, again)
        assert second.returncode == EXIT_OK, second.stderr
        assert lab.ask(app, "DIGEST", at="dst") == digest
        assert lab.runnable_copies(app) == {"src": 0, "dst": 1}
        figures["restore held x kill -9 destination agent (runc, restarted)"] = {
            "outcome": "stayed; the restarted agent removed the container; moved next time",
            "exit": run.returncode,
            "source_back_seconds": round(t_back - fault_time(agents[0].log.read_text()), 3),
        }  # fmt: skip
    finally:
        lab.remove(app)


@pytest.mark.parametrize("engine", ["runc", "containerd", "podman"])
def test_a_container_made_inside_the_restore_is_removed(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess], figures: Figures, engine: str
) -> None:
    """The agent dies inside the restore (``agent.in-restore:kill``: runc made the
    container, its restore has not returned), so there is no tree in any record yet.
    The record written before the engine was asked names the container; the
    restarted agent removes it (runc: its bundle and cgroup too) through its
    engine, and the next migration of the same container goes through.  A record
    planted afterwards naming that container, now running, removes nothing (the
    mark of the session that made it went when it was resumed)."""

    agents.append(bed.start_agent(env={"MIGSGX_FAULT": "agent.in-restore:kill"}))
    app, digest = loaded(lab, engine)
    try:
        run = migrate(bed, app, agents[0])
        assert run.returncode == 6, run.stderr
        t_back = source_answers(lab, app, digest)
        assert agents[0].proc.wait(timeout=30) == -9
        again = bed.start_agent(listen_port=agents[0].port)
        agents.append(again)
        log = again.log.read_text(errors="replace")
        assert f"died restoring {engine}" in log, log
        assert f"removed the {engine} container {app.name}" in log, log
        nothing_left(lab, app)
        assert not list((bed.state("dst") / "agent").glob(f"*/{app.name}.owner"))
        second = migrate(bed, app, again)
        assert second.returncode == EXIT_OK, second.stderr
        assert lab.ask(app, "DIGEST", at="dst") == digest
        figures[f"inside the restore x kill -9 destination agent ({engine}, restarted)"] = {
            "outcome": "stayed; the restarted agent removed the container; moved next time",
            "exit": run.returncode,
            "source_back_seconds": round(t_back - fault_time(agents[0].log.read_text()), 3),
        }  # fmt: skip
        again.stop()
        planted = plant(bed, engine, app.name, restoring=True)
        if engine == "podman":  # (its record names the container by name)
            record = json.loads(planted.read_text())
            record["handle"] = {"name": app.name}
            planted.write_text(json.dumps(record))
        third = bed.start_agent(listen_port=agents[0].port)
        agents.append(third)
        log = third.log.read_text(errors="replace")
        assert "not this agent's to remove" in log, log
        assert lab.runnable_copies(app) == {"src": 0, "dst": 1}
        assert lab.ask(app, "DIGEST", at="dst") == digest
    finally:
        lab.remove(app)


def plant(
    bed: Testbed, driver: str, name: str, *, restoring: bool, root: int = 0, start: int = 1
) -> Path:
    """A forged record in the destination agent's work directory naming ``name``."""

    session = secrets.token_hex(16)
    directory = bed.state("dst") / "agent" / "work" / session
    directory.mkdir(mode=0o700, parents=True)
    record = {
        "session_id": session, "root": root, "start": start if root else 0, "driver": driver,
        "peer": "10.0.0.1", "local": "10.0.0.2", "enclaves": [],
        "handle": {"id": name}, "answered": not restoring, "restoring": restoring,
    }  # fmt: skip
    path = directory / "held.json"
    # Private and root's, as the agent writes its own: the record passes the owner
    # check, so what is tested is the session mark (the last line of defence).
    path.write_text(json.dumps(record))
    path.chmod(0o600)
    return path


def test_a_forged_record_never_removes_a_container_the_agent_did_not_make(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess]
) -> None:
    """Records planted in the destination agent's work directory name a runc
    container the agent did not make (started there by hand): one as if the agent
    died restoring it, one as if its held tree were gone, one with a stopped tree
    runc does not know as that container (refused: the tree is killed, as before).
    The restarted agent removes nothing through runc: the container runs on, its
    bundle untouched."""

    other = lab.start_command("runc", ["sleep", "600"], at="dst")
    stopped = subprocess.Popen(["sleep", "600"])
    try:
        made = lab.runc("dst").state(other.name)
        assert made is not None
        bundle = Path(str(made["bundle"]))
        os.kill(stopped.pid, signal.SIGSTOP)
        wait_until(lambda: Path(f"/proc/{stopped.pid}/stat").read_text().split(") ")[1][0]
                   == "T", 30, "the decoy to stop")  # fmt: skip
        began = start_time(stopped.pid)
        planted = [
            plant(bed, "runc", other.name, restoring=True),
            plant(bed, "runc", other.name, restoring=False, root=2**22 - 1),
            # (a stopped tree runc does not know as that container: refused, killed)
            plant(bed, "runc", other.name, restoring=False, root=stopped.pid, start=began),
        ]
        agents.append(bed.start_agent())
        log = agents[0].log.read_text(errors="replace")
        assert "not this agent's to remove" in log, log
        assert f"nothing (runc container {other.name} is running" in log, log
        # (a record without enclaves and without a resume marker: never resumed, so
        # removed; runc refuses it as not that container's, so the tree alone is killed)
        assert "never resumed it: removed" in log and stopped.wait(timeout=30) == -9, log
        state = lab.runc("dst").state(other.name)
        assert state is not None and state["status"] == "running"
        assert bundle.is_dir() and not any(p.exists() for p in planted)
    finally:
        stopped.kill()
        stopped.wait()
        lab.remove(other)


def test_a_held_container_whose_tree_died_is_removed(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess]
) -> None:
    """The agent dies holding the container (``agent.before-claim:kill``) and its
    tree is killed before the agent restarts: runc keeps a stopped container and
    its bundle.  The restarted agent has nothing to adopt and removes both through
    runc (its bundle's mark says that this agent made it), so nothing is left."""

    agents.append(bed.start_agent(env=KILL_AT_CLAIM))
    app, digest = loaded(lab, "runc")
    try:
        run = migrate(bed, app, agents[0], "tool.before-commit:kill")
        assert run.returncode == -9, run.stderr
        source_answers(lab, app, digest)
        assert agents[0].proc.wait(timeout=30) == -9
        root = lab.root_pid(app, "dst")
        assert root is not None
        os.kill(root, signal.SIGKILL)
        wait_until(lambda: (lab.runc("dst").state(app.name) or {}).get("status") == "stopped",
                   30, "runc to see the container stopped")  # fmt: skip
        again = bed.start_agent(listen_port=agents[0].port)
        agents.append(again)
        log = again.log.read_text(errors="replace")
        assert "is gone or runs" in log and f"removed the runc container {app.name}" in log, log
        nothing_left(lab, app)
        assert lab.runnable_copies(app) == {"src": 1, "dst": 0}
    finally:
        lab.remove(app)


def pause(lab: ContainerLab, app: ContainerApp) -> None:
    """Pause ``app``'s destination container through its engine (its cgroup frozen)."""

    if app.engine == "runc":
        argv = lab.runc("dst").argv("pause", app.name)
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    elif app.engine == "podman":
        lab.podman("dst")("pause", app.name, what="podman pause")
    else:
        lab.ctr("dst")("tasks", "pause", app.name, what="ctr tasks pause")


def paused_status(lab: ContainerLab, app: ContainerApp) -> str:
    if app.engine == "runc":
        return str((lab.runc("dst").state(app.name) or {}).get("status"))
    if app.engine == "podman":
        return str(((lab.podman("dst").inspect(app.name) or {}).get("State") or {}).get("Status"))
    return str((lab.ctr("dst").task(app.name) or (0, ""))[1]).lower()


@pytest.mark.parametrize(
    ("engine", "decision"),
    [("runc", "commit"), ("runc", "abort"), ("podman", "commit"), ("containerd", "abort")],
)
def test_a_paused_held_container_is_adopted_and_thawed_only_by_the_commit(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess], figures: Figures,
    engine: str, decision: str,
) -> None:  # fmt: skip
    """The held container is paused through its engine (its cgroup frozen) while
    its agent is dead.  Its frozen tasks do not read as stopped, but each was
    frozen inside its job-control stop, so the restarted agent adopts it, still
    paused (it thaws nothing by itself: nothing of it runs while in doubt).  A
    COMMIT (the tool ends in doubt; one recover) thaws it and resumes it: the
    container runs on the destination with every write.  An ABORT (the tool
    dies before the commit; the guardian gives the source back) removes it by
    its engine: the source runs on, nothing is left on the destination."""

    agents.append(bed.start_agent(env=KILL_AT_CLAIM))
    app, digest = loaded(lab, engine)
    t0 = time.monotonic()
    try:
        fault = "" if decision == "commit" else "tool.before-commit:kill"
        run = migrate(bed, app, agents[0], fault)
        if decision == "commit":
            assert run.returncode == EXIT_IN_DOUBT, run.stderr
        else:
            assert run.returncode == -9, run.stderr
            source_answers(lab, app, digest)
        assert agents[0].proc.wait(timeout=30) == -9
        pause(lab, app)
        root = lab.root_pid(app, "dst")
        assert root is not None and paused_status(lab, app) == "paused"
        assert lab.runnable_copies(app)["dst"] == 0
        again = bed.start_agent(listen_port=agents[0].port)
        agents.append(again)
        log = again.log.read_text(errors="replace")
        assert "adopted the tree a former agent held" in log and "paused: thawed only" in log, log
        if decision == "abort":
            bundle = bed.state("dst") / "agent" / "runc" / app.name
            wait_until(
                lambda: app.name not in lab.containers("dst", engine) and not bundle.exists(),
                60, "the adopted container to be discarded",
            )  # fmt: skip
            assert "decision delivered: aborted" in again.log.read_text(errors="replace")
            nothing_left(lab, app)
            assert lab.runnable_copies(app) == {"src": 1, "dst": 0}
            assert lab.ask(app, "DIGEST", at="src") == digest
            outcome = "stayed; the adopted paused container removed by its engine (ABORT again)"
        else:
            assert paused_status(lab, app) == "paused"  # adopted, not thawed
            assert lab.runnable_copies(app)["dst"] == 0
            result = recover(bed)
            assert result.returncode == EXIT_OK, result.stdout + result.stderr
            moved(lab, app, digest, again)
            outcome = "moved after one recover (adopted paused, thawed by the COMMIT)"
        figures[f"decision written x kill -9 destination agent, paused ({engine}, {decision})"] = {
            "outcome": outcome, "exit": run.returncode,
            "seconds": round(time.monotonic() - t0, 3),
        }  # fmt: skip
    finally:
        lab.remove(app)


def test_a_paused_container_that_ran_is_not_adopted(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess]
) -> None:
    """The held container is continued by hand (it ran while its agent was dead)
    and then paused: its tasks are frozen outside a job-control stop, so the tree
    is not the held one.  The restarted agent neither adopts nor removes it (its
    engine reports it live), and says so; discarding it through runc leaves
    nothing on the destination."""

    agents.append(bed.start_agent(env=KILL_AT_CLAIM))
    app, digest = loaded(lab, "runc")
    try:
        run = migrate(bed, app, agents[0], "tool.before-commit:kill")
        assert run.returncode == -9, run.stderr
        source_answers(lab, app, digest)
        assert agents[0].proc.wait(timeout=30) == -9
        root = lab.root_pid(app, "dst")
        assert root is not None
        for pid in tree_pids(root):
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: lab.runnable_copies(app)["dst"] > 0, 30, "the tree to run")
        pause(lab, app)
        again = bed.start_agent(listen_port=agents[0].port)
        agents.append(again)
        log = again.log.read_text(errors="replace")
        assert f"runc container {app.name} is paused, pid {root}" in log, log
        assert "adopted the tree" not in log, log
        runc = lab.runc("dst")
        assert (runc.state(app.name) or {}).get("status") == "paused"  # untouched
        driver = make_driver("runc", HostConfig(
            Criu("/bin/true"), lab.settings["dst"], Path("/unused.sock"), bed.state("dst"),
        ))  # (reclaim and discard use runc alone)  # fmt: skip
        bundle = bed.state("dst") / "agent" / "runc" / app.name
        driver.discard(driver.reclaim({"id": app.name, "bundle": str(bundle), "netns": ""}, root))
        nothing_left(lab, app)
        assert lab.runnable_copies(app) == {"src": 1, "dst": 0}
    finally:
        lab.remove(app)


def test_a_post_copy_container_whose_agent_died_before_the_decision_is_removed(
    bed: Testbed, lab: ContainerLab, agents: list[AgentProcess]
) -> None:
    """A runc container restored for post-copy (``--post-copy``), held, its page
    window not yet open, when its agent dies (``agent.after-restore:kill``): the
    source runs on (exit 6).  The record names its lazy-pages daemon: the
    restarted agent never adopts it (no agent can open that window again), has
    runc remove it and ends the daemon; nothing is left on the destination."""

    agents.append(bed.start_agent(env={"MIGSGX_FAULT": "agent.after-restore:kill"}))
    app, digest = loaded(lab, "runc")
    try:
        run = bed.migrate(
            None, agents[0], args=["--runc", app.name, "--post-copy",
                                   "--work-dir", str(bed.root / f"dump-{app.marker}")],
        )  # fmt: skip
        assert run.returncode == 6, run.stderr
        source_answers(lab, app, digest)
        assert agents[0].proc.wait(timeout=30) == -9
        [path] = (bed.state("dst") / "agent" / "work").glob("*/held.json")
        record = json.loads(path.read_text())
        assert record["lazy_pages"] and record["driver"] == "runc", record
        again = bed.start_agent(listen_port=agents[0].port)
        agents.append(again)
        log = again.log.read_text(errors="replace")
        assert "post-copy tree" in log and "is not adopted" in log, log
        assert "adopted the tree" not in log, log
        nothing_left(lab, app)
        daemon, began = record["lazy_pages"]
        assert start_time(daemon) != began or process_state(daemon) in ("", "Z", "X")
        assert lab.runnable_copies(app) == {"src": 1, "dst": 0}
        assert lab.ask(app, "DIGEST", at="src") == digest
    finally:
        lab.remove(app)
