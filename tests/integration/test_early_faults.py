"""The fault matrix before the commit: prepare, handshake, dump, transfer.

The cells of ``test_commit_faults.py`` start at LOADED; these come before it,
with the same checks (``fault_helpers``): the kvstore example on one of two
namespaced hosts, real CRIU, one fault per cell reached through a named point
(``MIGSGX_FAULT``, no sleeping), then exactly one runnable copy holding every
acknowledged write, on the side the outcome names, the honest exit status, no
traceback.  Where the source stays, the seconds from the fault to the source
answering again are figures (``fault-matrix`` JSON at the end), not asserts.

The steps, in the order a default (early-handshake) migration reaches them:

- handshake: ``tool.after-handshake``, the destination enclaves launched and
  attested, the application still running (no guardian yet);
- prepare: ``tool.after-prepare``, the application frozen, its enclaves handed
  to the tool and the guardian;
- dump: ``tool.before-dump``, the enclaves stream, CRIU about to dump;
- transfer: ``tool.before-images``, every enclave LOADED, CRIU's dump complete,
  the images not yet sent (the LOADED rows of the other module come after it);
  the tool runs with ``--no-overlap-restore``, the order in which that moment
  exists;
- restored-loading (the default, overlapped order): ``tool.restored-loading``,
  CRIU's dump complete, the images sent and the tree restored (held), the
  enclave stream held from :data:`HELD_AT` on until then, so no enclave has
  LOADED (``test_overlap_faults.py`` has the destination's cells of that window).
"""

from __future__ import annotations

import pytest
from bed_helpers import enclave_processes, end_copies, wait_until
from fault_helpers import (
    EXIT_MOVED_NOT,
    EXIT_OK,
    EXIT_SOURCE_GONE,
    ask,
    enclave_lost,
    heal,
    loaded_app,
    migrate_with,
    no_images_left,  # noqa: F401  (autouse: after every cell, no images left in /dev/shm)
    only_copy,
    stayed,
)

from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AgentProcess, AppProcess, MigrateRun, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 173

STEPS = {
    "handshake": "tool.after-handshake",
    "prepare": "tool.after-prepare",
    "dump": "tool.before-dump",
    "transfer": "tool.before-images",
}
#: The overlapped window: its point, after the enclave stream's hold (test_overlap_faults.py).
HELD_AT = 256 << 10
RESTORED_LOADING = f"tool.enclave-stream:hold-to-restored={HELD_AT},tool.restored-loading"

#: column -> the tool's action at a step's point.
COLUMNS = {
    "kill -9 tool": "kill",
    "kill -9 guardian": "kill-guardian",
    "kill -9 source application": "kill-source",
    "kill -9 source enclave": "kill-source-enclave",
    "kill -9 source platform service": "kill-source-platform",
    "control connection drop": "drop-control",
    "control connection stall": "stall-control",
    "control connection corrupted record": "corrupt-control",
    "data connection drop": "drop-data",
    "data connection stall": "stall-data",
}

#: What each cell ends in: ``stayed`` (the source runs on, nothing at the
#: destination), ``moved`` (the destination runs, the source is gone), ``gone``
#: (the application died: nothing runs, its enclaves ended with it), ``lost``
#: (the source enclave, the only holder of the state, died: no copy with the
#: state runs, the source process runs without it, and the tool exits 11,
#: ``source-enclave-lost``, naming it).
EXPECT: dict[tuple[str, str], str] = {
    **{(step, "kill -9 tool"): "stayed" for step in ("handshake", "dump", "transfer")},
    **{(step, "kill -9 guardian"): "moved" for step in ("prepare", "dump", "transfer")},
    # Once CRIU's dump is complete the images hold every write: the migration
    # goes on without the source process (the destination copy is the one).
    **{(step, "kill -9 source application"): "gone" for step in ("handshake", "prepare", "dump")},
    ("transfer", "kill -9 source application"): "moved",
    **{(step, "kill -9 source enclave"): "lost" for step in STEPS},
    **{(step, "kill -9 source platform service"): "stayed" for step in STEPS},
    **{
        (step, column): "stayed"
        for step in STEPS
        for column in COLUMNS
        if column.startswith(("control", "data"))
    },
    # Every enclave LOADED: the token goes again over the agents' TLS channel.
    ("transfer", "data connection drop"): "moved",
    ("transfer", "data connection stall"): "moved",
    # Restored, no enclave LOADED: the images hold every write, the stream decides.
    ("restored-loading", "kill -9 guardian"): "moved",
    ("restored-loading", "kill -9 source application"): "moved",
    ("restored-loading", "kill -9 source enclave"): "lost",
    ("restored-loading", "control connection drop"): "stayed",
    ("restored-loading", "data connection drop"): "stayed",
}

#: Cells that find a bug not fixed yet: they stay in the table, skipped with the reason.
KNOWN_BUGS: dict[tuple[str, str], str] = {}

TOOL_CELLS = [
    pytest.param(
        step,
        column,
        outcome,
        id=f"{step} x {column}",
        marks=[pytest.mark.skip(reason=KNOWN_BUGS[step, column])]
        if (step, column) in KNOWN_BUGS
        else [],
    )
    for (step, column), outcome in EXPECT.items()
]


@pytest.mark.parametrize("step, column, outcome", TOOL_CELLS)
def test_fault_on_the_source_host(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    step: str,
    column: str,
    outcome: str,
) -> None:
    """A party of the source host dies, or one of the tool's connections fails, at the step."""

    cell = f"{step} x {column}"
    app, digest = loaded_app(bed)
    before = {h: enclave_processes(bed, h) for h in ("src", "dst")}
    try:
        point = RESTORED_LOADING if step == "restored-loading" else STEPS[step]
        # (the transfer step's moment, every enclave LOADED before the images, exists
        # only in the sequential order)
        args = ("--no-overlap-restore",) if step == "transfer" else ()
        run = migrate_with(bed, app, agent, f"{point}:{COLUMNS[column]}", args)
    finally:
        heal(bed, "src")
        if column == "kill -9 source platform service":
            bed.services["src"].stop()  # killed: a fresh one for the next cells
            bed.services["src"] = start_service(
                bed.state("src"), prefix=bed.host("src").command([])
            )
    assert "Traceback" not in run.stderr, run.stderr
    judge(bed, figures, cell, run, outcome, app, digest, before)


#: Faults the destination agent injects: (step, column, MIGSGX_FAULT of the agent).
AGENT_CELLS = [
    pytest.param("handshake", "kill -9 destination agent", "agent.enclave-receive:kill",
                 id="handshake x kill -9 destination agent"),
    pytest.param("dump", "kill -9 destination agent", "agent.page-stream:kill",
                 id="dump x kill -9 destination agent"),
    pytest.param("dump", "page stream drop", f"agent.page-stream:drop-after-bytes={256 << 10}",
                 id="dump x page stream drop"),
    pytest.param("dump", "page stream stall", f"agent.page-stream:stall-after-bytes={256 << 10}",
                 id="dump x page stream stall"),
]  # fmt: skip


@pytest.mark.parametrize("step, column, fault", AGENT_CELLS)
def test_fault_on_the_destination_host(
    bed: Testbed,
    figures: dict[str, dict[str, object]],
    step: str,
    column: str,
    fault: str,
) -> None:
    """The destination agent dies, or the page stream into it breaks, at the step."""

    doomed = bed.start_agent(env={"MIGSGX_FAULT": fault})
    app, digest = loaded_app(bed)
    try:
        run = migrate_with(bed, app, doomed, "")
    finally:
        heal(bed, "dst")
        doomed.stop()
    assert "Traceback" not in run.stderr, run.stderr
    agent_log = doomed.log.read_text(errors="replace")
    judge(bed, figures, f"{step} x {column}", run, "stayed", app, digest, None, agent_log)


def test_tool_killed_while_it_hands_the_ring_over(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The tool dies between an enclave's ``__mig_ring`` frame and its descriptors.

    The deterministic form of "dump x kill -9 tool", which hit this moment in
    about one run of three under load.  The enclave read the guardian's
    ``__mig_abort`` frame as the hand-over, lost its place in the stream and
    exited with the state: it now looks before it takes (``recv_ring_fds``).
    """

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, "tool.ring-handover:kill")
    judge(bed, figures, "dump x kill -9 tool during the ring hand-over", run, "stayed", app, digest)


def test_corrupted_byte_in_the_handshake(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """One flipped bit 64 bytes into an enclave's data connection: inside its handshake."""

    app, digest = loaded_app(bed)
    run = migrate_with(bed, app, agent, "tool.enclave-stream:flip-byte=64")
    assert "Traceback" not in run.stderr, run.stderr
    judge(bed, figures, "handshake x data connection corrupted byte", run, "stayed", app, digest)


def judge(
    bed: Testbed,
    figures: dict[str, dict[str, object]],
    cell: str,
    run: MigrateRun,
    outcome: str,
    app: AppProcess,
    digest: str,
    before: dict[str, set[int]] | None = None,
    agent_log: str = "",
) -> None:
    """The checks of one cell for its expected ``outcome``, and its figures."""

    if outcome == "stayed":
        expected = -9 if "kill -9 tool" in cell else EXIT_MOVED_NOT
        stayed(bed, figures, cell, run, app, digest, expected=expected, fault_log=agent_log)
    elif outcome == "moved":
        assert run.returncode == EXIT_OK, run.stderr
        figures[cell] = {"outcome": "moved", "exit": run.returncode}
        wait_until(lambda: process_state(app.pid) in ("", "Z"), 20, "CRIU to end the source")
        only_copy(bed, app, "dst", digest)
    elif outcome == "gone":
        # The application's own crash: nothing moved, nothing runs, its enclaves ended.
        assert run.returncode == EXIT_SOURCE_GONE, run.stderr
        assert "[source-gone]" in run.stderr
        assert bed.copies(app) == {"src": [], "dst": []}
        assert process_state(app.pid) == ""
        assert before is not None
        for host in ("src", "dst"):
            wait_until(
                lambda h=host: enclave_processes(bed, h) <= before[h], 15, f"{host} enclaves to end"
            )
        figures[cell] = {"outcome": "gone (the application died)", "exit": run.returncode}
    else:
        # The source enclave held the only copy that could run: lost, as in a crash.
        # Nothing else is lost, nothing runs twice: no destination copy, the source
        # process runs on without its enclave; the tool says so (11, not 6).
        enclave_lost(run, 0)
        wait_until(lambda: bed.runnable_copies(app)["dst"] == 0, 20, "no destination copy")
        wait_until(lambda: process_state(app.pid) in ("S", "R"), 20, "the source to run")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        assert ask(bed, app, "src", "DIGEST").startswith("ERR")  # its enclave is gone
        assert ask(bed, app, "src", "PING") == "PONG"  # the application itself answers
        figures[cell] = {"outcome": "lost (the enclave with the only copy died)",
                         "exit": run.returncode}  # fmt: skip
        end_copies(bed, app)
