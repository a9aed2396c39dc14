"""The fault matrix of the overlapped restore: the tree restored while the enclaves load.

By default (``migrate --overlap-restore``) the tool sends CRIU's images and
asks for the restore while the enclave streams still run; the destination
holds the tree stopped, its record not answered (``held-loading``), until
``enclaves_done`` finds every enclave LOADED and alive.  The cells reach that
window deterministically: the tool holds an enclave stream from byte
:data:`HELD_AT` on until the destination answered ``restored``
(``tool.enclave-stream:hold-to-restored``), so no enclave can have LOADED when
the fault fires.  Each cell ends with the source running again with every
acknowledged write, nothing of the migration left on the destination (a dead
agent's tree is removed by the restarted agent: it was never answered), and
exactly one runnable copy.  The seconds from the fault to the source answering
again are figures (``fault-matrix`` JSON at the end), not asserts.
"""

from __future__ import annotations

import pytest
from bed_helpers import wait_until
from fault_helpers import (
    EXIT_MOVED_NOT,
    destination_fault,
    fault_time,
    loaded_app,
    migrate_with,
    no_images_left,  # noqa: F401  (autouse: after every cell, no images left in /dev/shm)
    only_copy,
    source_answers,
    stayed,
)

from migsgx.lab.testbed import AgentProcess, Testbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 239

#: Where the held enclave stream stops: past the handshake, inside the 64 MiB state.
HELD_AT = 256 << 10
HOLD = f"tool.enclave-stream:hold-to-restored={HELD_AT}"


@pytest.mark.parametrize(
    "cell, fault",
    [
        ("restored, loading x kill -9 destination enclave", "agent.after-restore:kill-enclave"),
        ("restored, loading x kill -9 destination platform service",
         "agent.after-restore:kill-platform"),
        ("all LOADED, not answered x kill -9 destination enclave",
         "agent.enclaves-loaded:kill-enclave"),
    ],
)  # fmt: skip
def test_destination_copy_lost_while_held_loading(
    bed: Testbed, figures: dict[str, dict[str, object]], cell: str, fault: str
) -> None:
    """The destination enclave (or its platform) dies with the tree held, before the
    source could decide: the load or the liveness check fails, the source runs on."""

    tool = HOLD if "loading" in cell else ""
    with destination_fault(bed, fault, restart_platform="platform" in cell) as c:
        run = bed.migrate(c.app.pid, c.doomed, env={"MIGSGX_FAULT": tool} if tool else None)
        assert "Traceback" not in run.stderr, run.stderr
        stayed(bed, figures, cell, run, c.app, c.digest,
               fault_log=c.doomed.log.read_text(errors="replace"))  # fmt: skip


@pytest.mark.parametrize(
    "cell, fault",
    [
        ("restored, loading x kill -9 destination agent", "agent.after-restore:kill"),
        ("all LOADED, not answered x kill -9 destination agent", "agent.enclaves-loaded:kill"),
    ],
)
def test_destination_agent_killed_while_held_loading(
    bed: Testbed, figures: dict[str, dict[str, object]], cell: str, fault: str
) -> None:
    """The agent dies holding a tree whose record was never answered: the source runs
    on, and the restarted agent removes the tree, never adopts it."""

    tool = HOLD if "loading" in cell else ""
    with destination_fault(bed, fault) as c:
        app = c.app
        run = bed.migrate(app.pid, c.doomed, env={"MIGSGX_FAULT": tool} if tool else None)
        assert run.returncode == EXIT_MOVED_NOT, run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        t_back = source_answers(bed, app, c.digest, run.stderr)
        assert c.doomed.proc.wait(timeout=30) == -9
        assert [s for _, s in bed.copies(app)["dst"]] == ["T"]  # the orphan, stopped
        log = c.restart_agent().log.read_text(errors="replace")
        assert "never reported held" in log and "adopted the tree" not in log, log
        wait_until(lambda: all(s in ("Z", "") for _, s in bed.copies(app)["dst"]), 30,
                   "the orphan tree to be killed")  # fmt: skip
        figures[cell + ", restarted"] = {
            "outcome": "stayed; the restarted agent removed the tree it restored",
            "exit": run.returncode,
            "source_back_seconds": round(t_back - fault_time(c.doomed.log.read_text()), 3),
        }  # fmt: skip
        only_copy(bed, app, "src", c.digest)


def test_tool_killed_while_held_loading(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The tool dies after ``restored``, its enclave stream still held: its guardian
    gives the source back, the destination discards the tree it held (the control
    connection was lost before any enclave LOADED)."""

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, f"{HOLD},tool.restored-loading:kill")
    assert "Traceback" not in run.stderr, run.stderr
    stayed(bed, figures, "restored, loading x kill -9 tool", run, app, digest, expected=-9)
    log = agent.log.read_text(errors="replace")
    assert "the tool went away in state held-loading" in log, log[-3000:]


def test_corrupted_enclave_byte_while_the_restore_runs(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """One flipped bit of an enclave stream, let go once the restore is asked: the
    destination enclave refuses it beside the restore, the held tree is discarded,
    the source runs on."""

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, f"tool.enclave-stream:flip-byte-in-restore={HELD_AT}")
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == EXIT_MOVED_NOT, run.stderr
    # (no fault mark: the flip is the relay's; measured from the tool's end)
    source_answers(bed, app, digest, run.stderr)
    wait_until(lambda: bed.copies(app)["dst"] == [], 20, "the destination to let go")
    figures["restore running x data connection corrupted byte"] = {
        "outcome": "stayed",
        "exit": run.returncode,
    }
    only_copy(bed, app, "src", digest)


def test_no_overlap_restore_keeps_the_sequential_order(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """``--no-overlap-restore``: the images and the restore come only after every enclave
    LOADED (the agent never enters held-loading), and the migration completes."""

    app, digest = loaded_app(bed)
    seen = len(agent.log.read_text(errors="replace"))  # (the agent served earlier cells)
    run = bed.migrate(app.pid, agent, args=("--no-overlap-restore",))
    assert run.returncode == 0, run.stderr
    log = agent.log.read_text(errors="replace")[seen:]
    assert "restored process" in log, log[-3000:]
    assert "enclaves still loading" not in log, log[-3000:]
    figures["--no-overlap-restore"] = {"outcome": "moved", "exit": run.returncode}
    only_copy(bed, app, "dst", digest)
