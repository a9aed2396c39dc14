"""The fault matrix of the commit path, with real CRIU between two namespaced hosts.

Each cell migrates the kvstore example (one enclave, acknowledged writes) with
one fault injected at a named step through ``MIGSGX_FAULT`` (deterministic, no
sleeping), then checks, after at most one ``migsgx recover``: exactly one
runnable copy, on the side the decision names, holding every acknowledged write.
Where the source stays, the seconds from the fault to the source answering again
are recorded and printed as JSON at the end of the module (``fault-matrix``);
they are figures, not asserts.  The table in ``docs/migration.md`` comes from them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from bed_helpers import enclave_processes, end_copies, wait_until
from fault_helpers import (
    EXIT_IN_DOUBT,
    EXIT_LOST_AFTER_COMMIT,
    EXIT_MOVED_NOT,
    EXIT_OK,
    ask,
    destination_fault,
    enclave_lost,
    fault_time,
    guardians_of,
    heal,
    loaded_app,
    migrate_with,
    no_images_left,  # noqa: F401  (autouse: after every cell, no images left in /dev/shm)
    only_copy,
    recover,
    source_answers,
    stayed,
    stop_guardian_of,
    unstall,
)

from migsgx.agent.held import start_time
from migsgx.enclave.persistent_format import RESERVED
from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AgentProcess, MigrateRun, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 73


# --- before the commit point: the source runs again -----------------------------------------------
@pytest.mark.parametrize(
    "cell, point, action",
    [
        # Seen case 1: the destination's platform service or enclave dies with the tree held.
        ("restore held x kill -9 destination platform service", "after-restore", "kill-platform"),
        ("restore held x kill -9 destination enclave", "after-restore", "kill-enclave"),
        ("restore held x kill -9 destination agent", "after-restore", "kill"),
        ("LOADED x kill -9 destination platform service", "before-restore", "kill-platform"),
        ("LOADED x kill -9 destination enclave", "before-restore", "kill-enclave"),
        ("LOADED x kill -9 destination agent", "before-restore", "kill"),
    ],
)
def test_destination_lost_after_loaded(
    bed: Testbed, figures: dict[str, dict[str, object]], cell: str, point: str, action: str
) -> None:
    fault = f"agent.{point}:{action}"
    # (a platform service killed: a fresh one for the next cells)
    with destination_fault(bed, fault, restart_platform=action == "kill-platform") as c:
        # Every enclave LOADED before the images and the restore, as the cells say
        # (the overlapped window has cells of its own: test_overlap_faults.py).
        run = bed.migrate(c.app.pid, c.doomed, args=("--no-overlap-restore",))
        assert run.returncode == EXIT_MOVED_NOT, run.stderr
        assert "Traceback" not in run.stderr
        figures[cell] = {"outcome": "stayed", "exit": run.returncode,
                         "source_back_seconds": c.source_back_seconds()}  # fmt: skip
        only_copy(bed, c.app, "src", c.digest)


def test_a_tree_restored_but_never_reported_held_is_removed_by_the_restarted_agent(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """The agent dies right after the restore, before it answered ``restored``: the
    source cannot have decided and runs on.  Before, the restored tree stayed on
    the destination, stopped and owned by nobody; the restarted agent now finds
    it recorded as never reported held and kills it."""

    with destination_fault(bed, "agent.after-restore:kill") as c:
        app = c.app
        run = bed.migrate(app.pid, c.doomed)
        assert run.returncode == EXIT_MOVED_NOT, run.stderr
        t_back = source_answers(bed, app, c.digest)
        assert c.doomed.proc.wait(timeout=30) == -9
        assert [s for _, s in bed.copies(app)["dst"]] == ["T"]  # the orphan, stopped
        log = c.restart_agent().log.read_text(errors="replace")
        assert "never reported held" in log and "adopted the tree" not in log, log
        wait_until(lambda: all(s in ("Z", "") for _, s in bed.copies(app)["dst"]), 30,
                   "the orphan tree to be killed")  # fmt: skip
        figures["restore held x kill -9 destination agent, restarted"] = {
            "outcome": "stayed; the restarted agent killed the tree it restored",
            "exit": run.returncode,
            "source_back_seconds": round(t_back - fault_time(c.doomed.log.read_text()), 3),
        }  # fmt: skip
        only_copy(bed, app, "src", c.digest)


def test_a_tree_the_agent_died_restoring_is_killed_by_the_restarted_agent(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """The agent dies inside CRIU's restore of the process tree (``agent.in-restore``:
    CRIU's pre-resume notification, every task restored, CRIU not yet detached).
    CRIU outlives the agent, finishes and leaves the tree stopped, owned by nobody;
    the source cannot have decided and runs on.  The intent record written before
    CRIU was asked, and given the tree's root (pid, start time) in CRIU's
    post-restore notification, lets the restarted agent kill exactly that tree;
    the next migration moves the application."""

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.in-restore:kill"})
    app, digest = loaded_app(bed)
    restarted = None
    try:
        run = bed.migrate(app.pid, doomed)
        assert run.returncode == EXIT_MOVED_NOT, run.stderr
        assert "Traceback" not in run.stderr
        t_back = source_answers(bed, app, digest)
        assert doomed.proc.wait(timeout=30) == -9
        wait_until(lambda: [s for _, s in bed.copies(app)["dst"]] == ["T"], 30,
                   "CRIU to leave the orphan tree stopped")  # fmt: skip
        [(orphan, _)] = bed.copies(app)["dst"]
        [path] = (bed.state("dst") / "agent" / "work").glob("*/held.json")
        record = json.loads(path.read_text())
        assert record["restoring"] and record["driver"] == "pid"
        assert record["root"] == orphan and record["start"] == start_time(orphan)
        restarted = bed.start_agent(listen_port=doomed.port)
        log = restarted.log.read_text(errors="replace")
        assert "died restoring a process tree" in log, log
        assert f"removed the restored process tree (pid {orphan})" in log, log
        wait_until(lambda: all(s in ("Z", "") for _, s in bed.copies(app)["dst"]), 30,
                   "the orphan tree to be gone")  # fmt: skip
        assert not path.exists()
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        assert ask(bed, app, "src", "DIGEST") == digest
        figures["restore x kill -9 destination agent inside CRIU's restore, restarted"] = {
            "outcome": "stayed; the restarted agent killed the tree CRIU restored; moved next",
            "exit": run.returncode,
            "source_back_seconds": round(t_back - fault_time(doomed.log.read_text()), 3),
        }  # fmt: skip
        second = bed.migrate(app.pid, restarted)  # (nothing of the first restore in the way)
        assert second.returncode == EXIT_OK, second.stderr
        only_copy(bed, app, "dst", digest)
    finally:
        for agent in (doomed, restarted):
            if agent is not None:
                agent.stop()
        end_copies(bed, app)


def test_destination_platform_killed_before_the_claim_is_resolved_by_recover(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """Window W2: the loaded copy lives but cannot claim (its platform service died).

    The tool ends in doubt with both trees stopped; the agent holds the session.
    Once the service is back (and has taken the enclave back), one ``migsgx
    recover`` (or the guardian, retrying) delivers the recorded token again.
    """

    with destination_fault(bed, "agent.before-claim:kill-platform", restart_platform=True) as c:
        app = c.app
        run = bed.migrate(app.pid, c.doomed)
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "migsgx recover" in run.stderr and "Traceback" not in run.stderr
        assert bed.runnable_copies(app) == {"src": 0, "dst": 0}  # nothing runs twice
        c.restart_platform()
        again = recover(bed)
        assert again.returncode == 0, again.stdout + again.stderr
        wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 30, "the destination to run")
        wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the source to go")
        figures["decision written x kill -9 destination platform service"] = {
            "outcome": "moved after one recover", "exit": run.returncode,
            "seconds": c.seconds(),
        }  # fmt: skip
        only_copy(bed, app, "dst", c.digest)


def test_destination_platform_restarted_before_the_claim(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """Window W2: the service is back within the loaded copy's reattach wait: moved, exit 0."""

    with destination_fault(bed, "agent.before-claim:kill-platform") as c:
        app, doomed = c.app, c.doomed
        result: list[MigrateRun] = []
        mover = threading.Thread(target=lambda: result.append(bed.migrate(app.pid, doomed)))
        mover.start()
        try:
            wait_until(
                lambda: "before-claim:kill-platform" in doomed.log.read_text(errors="replace"),
                60, "the fault",
            )  # fmt: skip
            c.restart_platform()
            mover.join(120)
            assert result, "the migration did not end"
            run = result[0]
            assert "Traceback" not in run.stderr
            if run.returncode == EXIT_IN_DOUBT:
                # Not back within the copy's wait (a loaded machine): as in the cell above.
                again = recover(bed)
                assert again.returncode == 0, again.stdout + again.stderr
            else:
                assert run.returncode == EXIT_OK, run.stderr
            figures["decision written x destination platform service restarted"] = {
                "outcome": "moved", "exit": run.returncode, "seconds": c.seconds(),
            }  # fmt: skip
            wait_until(lambda: process_state(app.pid) == "", 20, "CRIU to end the source")
            only_copy(bed, app, "dst", c.digest)
        finally:
            mover.join(120)


def test_destination_platform_killed_after_the_claim_strands_nothing(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """W3, the platform service: it dies once the enclave claimed the id (found by a storm).

    The enclave lives and holds the state; the tree attaches to it and runs,
    and once the service is back every write is there and ECALLs work: moved,
    exit 0.  Before, the agent took the service's death for the enclave's and
    the tool said ``lost-after-commit`` (exit 10) of an application that ran on.
    """

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.after-claim:kill-platform"})
    app, digest = loaded_app(bed)
    t0 = time.monotonic()
    restarted = False
    try:
        run = bed.migrate(app.pid, doomed)
        assert "Traceback" not in run.stderr
        assert run.returncode == EXIT_OK, run.stderr
        assert "agent.after-claim:kill-platform" in doomed.log.read_text(errors="replace")
        wait_until(lambda: process_state(app.pid) in ("", "Z"), 20, "CRIU to end the source")
        _restart_platform(bed, "dst")
        restarted = True
        figures["activate x kill -9 destination platform service"] = {
            "outcome": "moved (the enclave runs on; the service restarted)",
            "exit": run.returncode, "seconds": round(time.monotonic() - t0, 3),
        }  # fmt: skip
        only_copy(bed, app, "dst", digest)
    finally:
        doomed.stop()
        if not restarted:
            _restart_platform(bed, "dst")
        end_copies(bed, app)


def _restart_platform(bed: Testbed, host: str) -> None:
    bed.services[host].stop()
    bed.services[host] = start_service(bed.state(host), prefix=bed.host(host).command([]))


def test_reservation_of_a_dead_destination_enclave_is_released(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The destination enclave reserved the persistent state's name, then died.

    The migration aborts (the source runs on); the agent releases the name that
    enclave reserved, so the next migration of the same state is not refused.
    """

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.after-restore:kill-enclave"})
    app, _ = loaded_app(bed)
    name = f"kv-{app.marker}"[:60]
    assert ask(bed, app, "src", f"PERSIST {name}") == "OK 1"
    digest = ask(bed, app, "src", "DIGEST")
    t0 = time.monotonic()
    try:
        run = bed.migrate(app.pid, doomed)
        assert run.returncode == EXIT_MOVED_NOT, run.stderr
    finally:
        doomed.stop()
    source_answers(bed, app, digest)
    assert _reserved(bed, "dst", name) == []
    again = migrate_with(bed, app, agent, "")
    assert again.returncode == EXIT_OK, again.stderr
    figures["restore held x kill -9 destination enclave, persistent state"] = {
        "outcome": "stayed, the name released; the next migration moved",
        "exit": run.returncode, "seconds": round(time.monotonic() - t0, 3),
    }  # fmt: skip
    wait_until(lambda: process_state(app.pid) == "", 20, "CRIU to end the source")
    only_copy(bed, app, "dst", digest)


def _reserved(bed: Testbed, host: str, name: str) -> list[bytes]:
    """The reservation records of ``name`` in a host's platform store."""

    data = cbor2.loads((bed.state(host) / "counters.cbor").read_bytes())
    return [
        r["blob"] for k, r in data.get("records", {}).items()
        if k.endswith("/" + name) and r["blob"].startswith(RESERVED)
    ]  # fmt: skip


def test_control_connection_stalls_with_the_tree_held(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """A network stall (packets dropped, no process dies): keepalive ends the wait."""

    with destination_fault(bed, "agent.after-restore:stall") as c:
        try:
            run = bed.migrate(c.app.pid, c.doomed)
            assert run.returncode == EXIT_MOVED_NOT, run.stderr
            assert "Traceback" not in run.stderr
            figures["restore held x control connection stall"] = {
                "outcome": "stayed", "exit": run.returncode,
                "source_back_seconds": c.source_back_seconds(),
            }  # fmt: skip
            only_copy(bed, c.app, "src", c.digest)
        finally:
            unstall(bed, c.doomed)


@pytest.mark.parametrize("repeat", range(3))
def test_corrupted_byte_in_the_enclave_stream(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], repeat: int
) -> None:
    """One flipped bit 1 MiB into the enclave stream: the destination enclave refuses it.

    The refusal reaches the source at once (it watches its peer while it sends),
    so the source runs again without waiting for the connection to time out.
    """

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, f"tool.enclave-stream:flip-byte={1 << 20}")
    assert "Traceback" not in run.stderr
    assert "chunk failed authentication" in run.stderr  # the destination's reason, relayed
    stayed(bed, figures, "transfer x corrupted byte", run, app, digest, last=False)


@pytest.mark.parametrize("repeat", range(3))
def test_corrupted_enclave_stream_stops_the_process_dump(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], repeat: int
) -> None:
    """The same flipped bit while CRIU still dumps 256 MiB: the dump is stopped, not awaited.

    The enclave stream fails within milliseconds; CRIU's page stream of the
    ballast takes far longer, so the tool cuts it (its page connection is shut
    down, or CRIU's next notification is refused) and CRIU resumes the tree.
    """

    app, digest = loaded_app(bed, "--ballast", "256")
    run = migrate_with(bed, app, agent, f"tool.enclave-stream:flip-byte={1 << 20}")
    assert "Traceback" not in run.stderr
    assert "chunk failed authentication" in run.stderr  # the destination's reason, relayed
    assert "dump was stopped early" in run.stderr, run.stderr
    cell = "dump x corrupted byte (256 MiB process)"
    stayed(bed, figures, cell, run, app, digest, last=False)


def test_answer_to_resume_lost_is_in_doubt_until_delivered_again(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """After the decision the control connection stalls: exit 7, and the guardian resolves it."""

    with destination_fault(bed, "agent.before-resume:stall") as c:
        app = c.app
        try:
            run = bed.migrate(app.pid, c.doomed)
            assert run.returncode == EXIT_IN_DOUBT, run.stderr
            assert "migsgx recover" in run.stderr and "Traceback" not in run.stderr
            # The destination got its tokens on the data connections and runs; the source
            # stays stopped: nothing runs twice while the outcome is in doubt here.
            wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 30, "the destination to run")
            assert bed.runnable_copies(app)["src"] == 0
        finally:
            unstall(bed, c.doomed)
        # The network is back: the guardian's next delivery hears that the destination runs.
        wait_until(
            lambda: process_state(app.pid) in ("", "Z"), 90, "the guardian to end the source"
        )
        again = recover(bed)
        assert again.returncode == 0, again.stderr
        figures["resume x control connection stall"] = {
            "outcome": "moved", "exit": run.returncode, "recover": "the guardian",
        }  # fmt: skip
        only_copy(bed, app, "dst", c.digest)


@pytest.mark.parametrize(
    "cell, fault",
    [
        ("LOADED x kill -9 tool", "tool.before-commit:kill"),
        ("prepare x kill -9 tool", "tool.after-prepare:kill"),
    ],
)
def test_tool_killed_before_the_decision(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    cell: str,
    fault: str,
) -> None:
    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, fault)
    assert run.returncode == -9
    t_back = source_answers(bed, app, digest)
    figures[cell] = {"outcome": "stayed", "exit": run.returncode,
                     "source_back_seconds": round(t_back - fault_time(run.stderr), 3)}  # fmt: skip
    wait_until(lambda: bed.copies(app)["dst"] == [], 20, "the destination to let go")
    only_copy(bed, app, "src", digest)


def test_tool_and_destination_enclave_killed_before_the_decision_leave_nothing_held(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """ABORT without the tool, and the destination's loaded copy dies before judging it.

    The tool dies with the tree held; its guardian aborts the source enclaves
    (the source runs again) and delivers the ABORT over the agents' TLS channel,
    saying it is one; the destination enclave is killed as the frame reaches it.
    That copy can judge nothing, and no state will come again: the destination
    discards the held tree instead of keeping it stopped for an operator.
    """

    with destination_fault(bed, "agent.before-claim:kill-enclave") as c:
        app = c.app
        run = migrate_with(bed, app, c.doomed, "tool.before-commit:kill")
        assert run.returncode == -9
        t_back = source_answers(bed, app, c.digest)
        wait_until(lambda: bed.copies(app)["dst"] == [], 40, "the held tree to be discarded")
        log = c.doomed.log.read_text(errors="replace")
        assert "before-claim:kill-enclave" in log and "a lost copy keeps nothing" in log, log
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        assert all(r["outcome"] != "in-doubt" for r in json.loads(again.stdout))
        figures["LOADED x kill -9 tool + destination enclave (ABORT not judged)"] = {
            "outcome": "stayed, the destination's held tree discarded", "exit": run.returncode,
            "source_back_seconds": round(t_back - fault_time(run.stderr), 3),
        }  # fmt: skip
        only_copy(bed, app, "src", c.digest)


def test_tool_and_destination_agent_killed_before_the_decision_leave_nothing_held(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """ABORT without the tool, and the destination agent dies as the frame reaches its copy.

    The guardian gives the source back and cannot tell the destination (its agent
    is gone, the loaded copy with it; the tree it restored stays stopped).  The
    agent, restarted, adopts the tree and would wait for a state that never
    comes: the guardian carries the ABORT again until the destination heard it,
    and the adopted tree is discarded, with no ``recover`` and no operator.
    """

    with destination_fault(bed, "agent.before-claim:kill") as c:
        app = c.app
        run = migrate_with(bed, app, c.doomed, "tool.before-commit:kill")
        assert run.returncode == -9
        t_back = source_answers(bed, app, c.digest)
        assert c.doomed.proc.wait(timeout=30) == -9
        restarted = c.restart_agent()
        assert "adopted the tree a former agent held" in restarted.log.read_text(errors="replace")
        wait_until(lambda: bed.copies(app)["dst"] == [], 60, "the adopted tree to be discarded")
        assert "decision delivered: aborted" in restarted.log.read_text(errors="replace")
        figures["LOADED x kill -9 tool + destination agent (restarted)"] = {
            "outcome": "stayed, the adopted tree discarded (the guardian's ABORT, again)",
            "exit": run.returncode,
            "source_back_seconds": round(t_back - fault_time(run.stderr), 3),
        }  # fmt: skip
        only_copy(bed, app, "src", c.digest)


def test_tool_and_guardian_killed_before_the_decision(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """Nobody holds the source enclaves, nothing was decided: recover hands them back.

    The tool kills its guardian and dies with the tree held on the destination.
    The source enclave holds a duplicate of its connection, so it kept its
    state (before: it ended, and the application ran on without it, its writes
    gone).  One ``migsgx recover`` takes the connection back, the enclave aborts
    (its ABORT recorded, delivered: the destination discards its copy), the
    fenced source continues and gets its enclave back, with every write.
    """

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, "tool.before-commit:kill-guardian-and-tool")
    assert run.returncode == -9
    # Fenced, and nobody left to continue it: the tree stops (its SIGSTOP was queued) once
    # CRIU, which saw its tool die, has let it go; a moment in between it may read running.
    wait_until(lambda: bed.runnable_copies(app)["src"] == 0, 10, "the fenced source to stop")
    again = recover(bed)
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    assert "stayed" in {r["outcome"] for r in json.loads(again.stdout)}, again.stdout
    t_back = source_answers(bed, app, digest)
    wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the destination to let go")
    figures["LOADED x kill -9 tool + guardian"] = {
        "outcome": "stayed after one recover (the enclave taken back, aborted, handed back)",
        "exit": run.returncode, "recover": again.returncode,
        "source_back_seconds": round(t_back - fault_time(run.stderr), 3),
    }  # fmt: skip
    only_copy(bed, app, "src", digest)


def test_tool_and_guardian_killed_right_after_the_prepare(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The tool kills its guardian and dies as soon as the application handed its
    enclave connections over (found by a storm).

    The journal and each enclave's duplicate of its connection are written
    before that point now, so one ``migsgx recover`` hands the enclave back with
    every write.  Before, both came later: the enclave's last connection closed
    with the tool, it ended, and the application ran on without its state.
    """

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, "tool.after-prepare:kill-guardian-and-tool")
    assert run.returncode == -9, run.stderr
    again = recover(bed)
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    t_back = source_answers(bed, app, digest)
    wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the destination to let go")
    figures["prepare x kill -9 tool + guardian"] = {
        "outcome": "stayed after one recover (the enclave handed back)",
        "exit": run.returncode, "recover": again.returncode,
        "source_back_seconds": round(t_back - fault_time(run.stderr), 3),
    }  # fmt: skip
    only_copy(bed, app, "src", digest)


# --- after the decision: the destination runs --------------------------------------------------
def test_destination_enclave_killed_before_the_claim_gets_the_state_again(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """Window W2: the copy that loaded dies after the decision, before it claimed the id.

    The committed source enclave still holds the state (frozen); the tool has the
    destination agent launch a fresh enclave and delivers the state again, same
    migration id, attested anew.  The tree held there attaches to the fresh enclave.
    """

    with destination_fault(bed, "agent.before-claim:kill-enclave") as c:
        app = c.app
        run = bed.migrate(app.pid, c.doomed)
        assert run.returncode == EXIT_OK, run.stderr
        assert "Traceback" not in run.stderr
        log = c.doomed.log.read_text(errors="replace")
        assert "agent.before-claim:kill-enclave" in log and "receives the state again" in log
        wait_until(lambda: process_state(app.pid) == "", 20, "CRIU to end the source")
        figures["decision written x kill -9 destination enclave"] = {
            "outcome": "moved (state delivered again)", "exit": run.returncode,
            "seconds": c.seconds(),
        }  # fmt: skip
        only_copy(bed, app, "dst", c.digest)


def test_token_dropped_on_the_data_connection_is_delivered_again(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """Seen case 2: the data connection drops after LOADED (no process dies)."""

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, "tool.before-token:drop")
    assert run.returncode == EXIT_OK, run.stderr
    figures["token in flight x connection drop"] = {"outcome": "moved", "exit": run.returncode}
    wait_until(lambda: process_state(app.pid) == "", 20, "CRIU to end the source")
    only_copy(bed, app, "dst", digest)


@pytest.mark.parametrize(
    "cell, fault",
    [
        ("decision written x kill -9 tool", "tool.after-commit:kill"),
        ("token in flight x kill -9 tool", "tool.before-token:kill"),
    ],
)
def test_tool_killed_after_the_decision(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    cell: str,
    fault: str,
) -> None:
    """The guardian carries the recorded COMMIT to the destination and ends the source."""

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, fault)
    assert run.returncode == -9
    wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 30, "the destination to run")
    wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the guardian to end the source")
    # An operator's recover afterwards finds nothing in doubt and changes nothing.
    again = recover(bed)
    assert again.returncode == 0, again.stderr
    assert all(r["outcome"] != "in-doubt" for r in json.loads(again.stdout))
    figures[cell] = {"outcome": "moved", "exit": run.returncode, "recover": "not needed"}
    only_copy(bed, app, "dst", digest)


def _holders(bed: Testbed, run: MigrateRun) -> list[tuple[int, int]]:
    """(enclave pid, duplicate's fd) the journal of ``run``'s tool records."""

    for path in (bed.state("src") / "agent" / "migrations").glob("*.json"):
        data = json.loads(path.read_text())
        if data.get("tool_pid") == run.pid:
            return [(int(h[0]), int(h[1])) for h in data.get("holders") or []]
    raise AssertionError(f"no journal of the tool {run.pid}")


@pytest.mark.parametrize(
    "cell, fault",
    [
        ("done x kill -9 tool", "tool.before-release:kill"),
        ("done x kill -9 tool + guardian", "tool.before-release:kill-guardian-and-tool"),
    ],
)
def test_killed_between_done_and_the_release(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    cell: str,
    fault: str,
) -> None:
    """The destination runs, the journal says ``done``, the source enclaves not released yet.

    Each committed source enclave holds a duplicate of its connection, so a
    tool that dies there leaves it frozen with its (moved) state for good.
    The guardian releases it; with the guardian dead too, one ``migsgx
    recover`` takes the duplicate back and releases it (before: ``done``,
    nothing to do, the enclave held its state until the next boot).
    """

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, fault)
    assert run.returncode == -9, run.stderr
    wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 30, "the destination to run")
    held = _holders(bed, run)
    assert held, "the source enclave held no duplicate of its connection"
    if "guardian" in fault:
        # Nobody is left to let it go: it still holds its duplicate.
        assert all(Path(f"/proc/{pid}/fd/{fd}").exists() for pid, fd in held)
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        assert "Traceback" not in again.stderr
        assert "released" in again.stdout, again.stdout
    wait_until(
        lambda: not any(Path(f"/proc/{pid}/fd/{fd}").exists() for pid, fd in held), 30,
        "the source enclaves to let their duplicates go",
    )  # fmt: skip
    wait_until(lambda: all(process_state(pid) in ("", "Z") for pid, _ in held), 30,
               "the released source enclaves to exit")  # fmt: skip
    wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the source tree to end")
    third = recover(bed)  # nothing left: a later recover changes nothing
    assert third.returncode == EXIT_OK, third.stdout + third.stderr
    assert all(r["outcome"] != "in-doubt" for r in json.loads(third.stdout))
    figures[cell] = {"outcome": "moved; the source enclaves released",
                     "exit": run.returncode,
                     "recover": "0" if "guardian" in fault else "not needed"}  # fmt: skip
    only_copy(bed, app, "dst", digest)


@pytest.mark.parametrize(
    "cell, fault, expect",
    [
        ("restore held x kill -9 guardian", "tool.before-commit:kill-guardian", "dst"),
        ("restore held x kill -9 source platform service",
         "tool.before-commit:kill-source-platform", "src"),
        ("restore held x kill -9 source enclave", "tool.before-commit:kill-source-enclave",
         "lost"),
        ("decision written x kill -9 guardian", "tool.after-commit:kill-guardian", "dst"),
        ("decision written x kill -9 source platform service",
         "tool.after-commit:kill-source-platform", "dst"),
        ("decision written x kill -9 source enclave", "tool.after-commit:kill-source-enclave",
         "dst"),
    ],
)  # fmt: skip
def test_source_side_party_killed(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    cell: str,
    fault: str,
    expect: str,
) -> None:
    """The tool lives on; another party of the source host dies at the step."""

    app, digest = loaded_app(bed)
    try:
        run = migrate_with(bed, app, agent, fault)
        assert "Traceback" not in run.stderr
        if expect == "dst":
            # The decision, not the source enclave or its platform, is what counts.
            assert run.returncode == EXIT_OK, run.stderr
            figures[cell] = {"outcome": "moved", "exit": run.returncode}
            wait_until(lambda: process_state(app.pid) == "", 20, "CRIU to end the source")
            only_copy(bed, app, "dst", digest)
        elif expect == "src":
            assert run.returncode == EXIT_MOVED_NOT, run.stderr
            back = source_answers(bed, app, digest, run.stderr) - fault_time(run.stderr)
            figures[cell] = {"outcome": "stayed", "exit": run.returncode,
                             "source_back_seconds": round(back, 3)}  # fmt: skip
            only_copy(bed, app, "src", digest)
        else:
            # The source enclave held the only copy that could run (the destination's
            # loaded copy needs a token only it could make): lost, as in a crash.  Nothing
            # else is lost and nothing runs twice: no destination copy, the source
            # process itself runs on without its enclave, and the tool says so (11).
            enclave_lost(run, 0)
            wait_until(lambda: bed.runnable_copies(app)["dst"] == 0, 20, "no destination copy")
            wait_until(lambda: process_state(app.pid) in ("S", "R"), 20, "the source to run")
            assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
            assert ask(bed, app, "src", "DIGEST").startswith("ERR")  # its enclave is gone
            assert ask(bed, app, "src", "PING") == "PONG"  # the application itself answers
            figures[cell] = {"outcome": "lost (the enclave with the only copy died)",
                             "exit": run.returncode}  # fmt: skip
            end_copies(bed, app)
    finally:
        if "platform" in fault:
            bed.services["src"].stop()  # killed: a fresh one for the next cells
            bed.services["src"] = start_service(
                bed.state("src"), prefix=bed.host("src").command([])
            )


@pytest.mark.parametrize("point", ["tool.after-group", "tool.before-commit"])
def test_source_enclave_killed_undecided_leaves_nothing_held(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], point: str
) -> None:
    """W1: the source enclave dies before it was asked to decide (found by a storm).

    Its state is lost (it held the only copy the destination could ever run:
    no COMMIT token of it can exist).  Before, the destination kept its loaded
    copy and the tree held, stopped, for good ("kept in doubt until the source's
    decision is delivered": no decision could come); the tool's ``abort`` now
    names it (``source_lost``) and the destination ends both.
    """

    app, _ = loaded_app(bed)
    enclaves = enclave_processes(bed, "dst")
    t0 = time.monotonic()
    run = migrate_with(bed, app, agent, f"{point}:kill-source-enclave")
    enclave_lost(run, 0)
    wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to go")
    wait_until(lambda: enclave_processes(bed, "dst") <= enclaves, 30, "the loaded copy to end")
    assert "its source enclave died undecided" in agent.log.read_text(errors="replace")
    assert ask(bed, app, "src", "PING") == "PONG"  # the application runs, without the state
    figures[f"{point.removeprefix('tool.')} x kill -9 source enclave, destination"] = {
        "outcome": "lost (W1); the destination keeps nothing", "exit": run.returncode,
        "seconds": round(time.monotonic() - t0, 3),
    }  # fmt: skip
    end_copies(bed, app)


def test_tool_and_source_platform_killed_before_the_decision_the_guardian_asks_again(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The tool dies with its source platform service: every enclave LOADED and in the
    migration group, none decided.

    The source enclaves live, but their aborts cannot be checked against their
    migration group (``group-unchecked``: no platform service), so the guardian
    must not take them for aborts, nor for commits: it asks again until the
    service is back, and then every abort is recorded and the source runs on
    (before: it took them for commits and held the source stopped, in doubt,
    for its 10 minutes).
    """

    app, digest = loaded_app(bed)
    try:
        run = migrate_with(bed, app, agent, "tool.after-group:kill-source-platform-and-tool")
        assert run.returncode == -9, run.stderr
        assert "Traceback" not in run.stderr
    finally:
        bed.services["src"].stop()  # killed: the host's supervisor starts a fresh one
        bed.services["src"] = start_service(bed.state("src"), prefix=bed.host("src").command([]))
    back = source_answers(bed, app, digest, run.stderr) - fault_time(run.stderr)
    figures["restore held x kill -9 tool + source platform service (restarted)"] = {
        "outcome": "stayed", "exit": run.returncode, "source_back_seconds": round(back, 3),
    }  # fmt: skip
    wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the destination to let go")
    only_copy(bed, app, "src", digest)


def test_tool_and_source_platform_killed_before_the_group_the_returned_abort_is_carried(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The tool dies with its source platform service, every enclave LOADED, before
    it gave them the migration group: no decision can be recorded.

    Outside a group the enclave's abort goes ahead although its store record
    failed (best effort, ``commit.md`` 1 rule 4), so the store holds no ABORT to
    carry.  The guardian carries the frame the enclave's ``__mig_abort`` returned
    instead (kept in the journal), the destination's enclave judges it and the
    held tree goes (before: it stayed stopped, in doubt, until an operator
    removed it).  Checked before the platform service comes back: the fix needs
    no store.
    """

    app, digest = loaded_app(bed)
    journals = bed.state("src") / "agent" / "migrations"
    before = set(journals.glob("*.json"))
    try:
        run = migrate_with(bed, app, agent, "tool.before-commit:kill-source-platform-and-tool")
        assert run.returncode == -9, run.stderr
        assert "Traceback" not in run.stderr
        back = source_answers(bed, app, digest, run.stderr) - fault_time(run.stderr)
        wait_until(lambda: bed.copies(app)["dst"] == [], 40, "the held tree to be discarded")
        # (an ABORT delivered over the agents' TLS channel, judged by the held copy)
        assert "the source host aborted it" in agent.log.read_text(errors="replace")
        # The store recorded nothing: the frame came from the enclave's answer alone.
        (path,) = set(journals.glob("*.json")) - before
        journal = json.loads(path.read_text())
        assert journal["phase"] == "done" and any(journal["aborts"]), journal
        store = cbor2.loads((bed.state("src") / "counters.cbor").read_bytes())
        assert not set(journal["enclave_mids"]) & set(store.get("decisions", {})), store
    finally:
        bed.services["src"].stop()  # killed: the host's supervisor starts a fresh one
        bed.services["src"] = start_service(bed.state("src"), prefix=bed.host("src").command([]))
    again = recover(bed)
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    assert all(r["outcome"] != "in-doubt" for r in json.loads(again.stdout)), again.stdout
    figures["restore held x kill -9 tool + source platform service (no group yet)"] = {
        "outcome": "stayed, the held tree discarded (the ABORT the enclave returned)",
        "exit": run.returncode, "source_back_seconds": round(back, 3),
    }  # fmt: skip
    only_copy(bed, app, "src", digest)


@pytest.mark.parametrize(
    "cell, fault",
    [
        ("token in flight x data connection stall", "tool.before-token:stall"),
        ("token in flight x corrupted byte", "tool.before-token:corrupt"),
    ],
)
def test_data_connection_fault_after_loaded(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    cell: str,
    fault: str,
) -> None:
    """The token does not arrive as sent (no process dies): it goes again over TLS."""

    app, digest = loaded_app(bed)
    t0 = time.monotonic()
    try:
        run = migrate_with(bed, app, agent, fault)
    finally:
        heal(bed, "src")
    assert run.returncode == EXIT_OK, run.stderr
    assert "Traceback" not in run.stderr
    figures[cell] = {"outcome": "moved", "exit": run.returncode,
                     "seconds": round(time.monotonic() - t0, 3)}  # fmt: skip
    wait_until(lambda: process_state(app.pid) == "", 20, "CRIU to end the source")
    only_copy(bed, app, "dst", digest)


def test_recover_is_idempotent_with_nothing_in_doubt(bed: Testbed) -> None:
    first, second = recover(bed), recover(bed)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "Traceback" not in first.stderr + second.stderr


# --- the windows that remain (docs/spec/commit.md, section 5) -----------------------------------
def test_tool_and_destination_enclave_killed_after_the_decision(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """W2 without the tool: it dies after the decision, the loaded copy before its claim.

    The destination keeps the tree held (a copy's death is not a decision); the
    guardian, which holds the committed source enclave, delivers its state again
    to a fresh enclave there, attested anew, and the tree attaches to it: moved,
    every acknowledged write there, the source gone.  A ``migsgx recover``
    afterwards finds nothing in doubt.
    """

    with destination_fault(bed, "agent.before-claim:kill-enclave", stop_guardian=True) as c:
        app = c.app
        run = migrate_with(bed, app, c.doomed, "tool.after-commit:kill")
        assert run.returncode == -9
        wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 60, "the state to come again")
        seconds = c.seconds()
        log = c.doomed.log.read_text(errors="replace")
        assert "before-claim:kill-enclave" in log and "receives the state again" in log
        wait_until(
            lambda: process_state(app.pid) in ("", "Z"), 30, "the guardian to end the source"
        )
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        assert "Traceback" not in again.stderr
        assert all(r["outcome"] != "in-doubt" for r in json.loads(again.stdout))
        figures["decision written x kill -9 tool + destination enclave"] = {
            "outcome": "moved (the guardian delivered the state again)",
            "exit": run.returncode, "recover": again.returncode, "seconds": seconds,
        }  # fmt: skip
        only_copy(bed, app, "dst", c.digest)


def test_destination_agent_killed_after_the_decision_adopts_the_held_tree(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    """W2, the agent: it dies after the decision, before the loaded copy judged it.

    The loaded copy ends with the agent's connections; the tree it restored stays
    stopped.  The tool cannot finish (exit 7, in doubt).  A restarted agent finds
    the held tree from its record in the session's work directory and adopts it;
    one ``migsgx recover`` wakes the guardian, which holds the committed source
    enclave: its state comes again to a fresh enclave there, and the tree attaches
    to it.  Moved, every acknowledged write there, the source gone.
    """

    with destination_fault(bed, "agent.before-claim:kill", stop_guardian=True) as c:
        app = c.app
        run = bed.migrate(app.pid, c.doomed)
        assert "Traceback" not in run.stderr
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert c.doomed.proc.wait(timeout=10) == -9
        assert bed.runnable_copies(app) == {"src": 0, "dst": 0}  # the tree is held, unowned
        restarted = c.restart_agent()
        log = restarted.log.read_text(errors="replace")
        assert "adopted the tree a former agent held" in log, log
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        assert "Traceback" not in again.stderr
        # Moved, by this recover's nudge or by the guardian's own retry before it.
        outcomes = {r["outcome"] for r in json.loads(again.stdout)}  # (earlier cells' too)
        assert not outcomes & {"in-doubt", "lost"}, again.stdout
        log = restarted.log.read_text(errors="replace")
        assert "receives the state again" in log and "decision delivered: resumed" in log, log
        wait_until(
            lambda: process_state(app.pid) in ("", "Z"), 30, "the guardian to end the source"
        )
        figures["decision written x kill -9 destination agent"] = {
            "outcome": "moved (adopted by the restarted agent, state delivered again)",
            "exit": run.returncode, "recover": again.returncode, "seconds": c.seconds(),
        }  # fmt: skip
        only_copy(bed, app, "dst", c.digest)


@pytest.mark.parametrize("guardian", ["killed", "gave up"])
def test_guardian_and_destination_agent_killed_after_the_decision(
    bed: Testbed, figures: dict[str, dict[str, object]], guardian: str
) -> None:
    """W2 with nobody left holding the source: the tool ended in doubt, its guardian died.

    The destination agent died after the decision (the loaded copy with it); the
    tool ends in doubt (exit 7) and its guardian is then killed too, or gives up
    as when its 10 minutes run out before the agent is back.  The
    committed source enclave holds a duplicate of its own connection, so it kept
    its state: ``migsgx recover`` takes the connection back from the recorded
    enclave process and delivers the state again by the guardian's own code to
    the restarted agent, which adopted the held tree.  A recover killed in the
    middle of that changes nothing; the next one moves it.  Afterwards the
    committed source enclave is gone (released) and a third recover finds
    nothing in doubt.
    """

    with destination_fault(bed, "agent.before-claim:kill", stop_guardian=True) as c:
        app = c.app
        give_up = {"MIGSGX_FAULT": "guardian.retry:give-up"} if guardian == "gave up" else {}
        run = bed.migrate(app.pid, c.doomed, env=give_up)
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert c.doomed.proc.wait(timeout=10) == -9
        if guardian == "killed":
            stop_guardian_of(app.pid)  # SIGKILL: nobody holds the source enclave now
        wait_until(lambda: not guardians_of(app.pid), 30, "the guardian to be gone")
        holder = _journal_of(bed, app.pid)["holders"][0][0]
        assert process_state(holder) not in ("", "Z", "X")  # it kept its state
        restarted = c.restart_agent()
        assert "adopted the tree a former agent held" in restarted.log.read_text(errors="replace")
        killed = recover(bed, "recover.redeliver:kill")  # dies with the fresh copy connected
        assert killed.returncode == -9, killed.stdout + killed.stderr
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        assert "Traceback" not in again.stderr
        assert "moved" in {r["outcome"] for r in json.loads(again.stdout)}, again.stdout
        wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the source to be ended")
        wait_until(lambda: process_state(holder) in ("", "Z"), 30, "the source enclave to go")
        third = recover(bed)
        assert third.returncode == EXIT_OK, third.stdout + third.stderr
        figures[f"decision written x guardian {guardian} + destination agent (restarted)"] = {
            "outcome": "moved after one recover (a recover killed midway changed nothing)",
            "exit": run.returncode, "recover": again.returncode, "seconds": c.seconds(),
        }  # fmt: skip
        only_copy(bed, app, "dst", c.digest)


def _journal_of(bed: Testbed, app_pid: int) -> dict[str, Any]:
    """The source host's journal of the migration of ``app_pid``."""

    for path in (bed.state("src") / "agent" / "migrations").glob("*.json"):
        data = json.loads(path.read_text())
        if data.get("app_pid") == app_pid:
            return dict(data)
    raise AssertionError(f"no journal for {app_pid}")


# W3, the destination agent killed after the claim (``agent.after-claim:kill``,
# ``agent.before-resume:kill``): its enclaves keep a duplicate of its end of their
# connection and the restarted agent resumes the tree with them, ``moved`` after one
# ``recover`` (test_claim_hold.py).  Only the enclave's own death loses the state.


@pytest.mark.parametrize(
    "cell, fault, window",
    [
        ("activate x kill -9 destination enclave", "agent.after-claim:kill-enclave", "W3"),
        ("resume x kill -9 destination enclave", "agent.before-resume:kill-enclave", "W3"),
    ],
)
def test_the_copy_that_runs_dies(
    bed: Testbed, figures: dict[str, dict[str, object]], cell: str, fault: str, window: str
) -> None:
    """The process holding the only runnable copy dies: lost as in a crash, never twice.

    W3: the destination enclave claimed the id and runs, then dies.  The source
    never runs again (the decision stands), and no copy runs with the state: what
    runs on the destination, if anything, runs without its enclave.  The tool says
    so: exit 10 (``lost-after-commit``), never 0.  (The agent's death there keeps
    the state: test_claim_hold.py.)
    Placed last: the source's guardian stays, in doubt, until it is stopped here.
    """

    with destination_fault(bed, fault, stop_guardian=True) as c:
        app = c.app
        run = bed.migrate(app.pid, c.doomed)
        assert "Traceback" not in run.stderr
        assert run.returncode == EXIT_LOST_AFTER_COMMIT, run.stderr
        assert "lost-after-commit" in run.stderr and "runs without its enclave" in run.stderr
        # Nothing is in doubt: the source went as after a success, no guardian stays.
        wait_until(lambda: process_state(app.pid) in ("", "Z"), 20, "CRIU to end the source")
        seconds = c.seconds()
        wait_until(lambda: bed.runnable_copies(app)["src"] == 0, 20, "the source to stay stopped")
        copies = bed.runnable_copies(app)
        assert copies["src"] == 0 and copies["dst"] <= 1
        if copies["dst"]:
            assert ask(bed, app, "dst", "DIGEST").startswith("ERR")  # its enclave is gone
        outcome = "lost (W3: the process with the only runnable copy died)"
        figures[cell] = {"outcome": outcome, "exit": run.returncode, "seconds": seconds}
