"""A source enclave killed inside its commit: the store's word, read after its death, is final.

The enclave sends its decision (a migration's COMMIT, a checkpoint gate's
commit) to its platform service and dies before the answer.  Before, the
service still wrote it whenever it got there (the request was in its channel),
while the tool, reading the store after the enclave's end of file, could read
before that write: it gave the source back (exit 11, or 6) while the store
held a COMMIT that a later ``recover`` delivered, and a checkpoint tool
removed the files of a gate that had committed.  Now the service refuses,
under the store's lock, a request of an enclave whose channel hung up, and
the tool reads the store (under the same lock) once the enclave's process
ended: a write that began before the death is the decision, one that had not
is refused for good (``docs/spec/commit.md``, section 5).

The moment is reached in the source host's platform service itself
(``MIGSGX_FAULT=platform.before-commit:kill-enclave``: the request received,
not yet written; ``platform.after-commit``: written, not yet answered): it
SIGKILLs that enclave and goes on once its channel hung up.  One bed; each
cell restarts the source's platform service with its fault, then starts the
application (its enclave a child of that service).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from bed_helpers import ask, end_copies, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    EXIT_OK,
    enclave_lost,
    fault_time,
    migrate_with,
    no_images_left,  # noqa: F401
    only_copy,
    recover,
    stop_guardian_of,
)
from platform_faults import (  # (faulty_platform: a fixture)
    AFTER,
    BEFORE,
    cli,
    faulty_platform,  # noqa: F401
    journals,
    loaded,
    service_log,
)

from migsgx.agent.journal import Journal
from migsgx.lab.testbed import AgentProcess, Testbed
from migsgx.sgx.counters import COUNTERS, CounterStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 163


#: Where each source service log stood when the cell restarted the service.
def _commits_recorded(bed: Testbed, journal: Path) -> list[str]:
    """Each enclave's recorded decision kind of the migration of ``journal`` (``none``)."""

    store = CounterStore(bed.state("src") / COUNTERS)
    kinds = []
    for mid in Journal.load(journal).enclave_mids:
        found = store.decision(mid)
        kinds.append(found.kind if found is not None else "none")
    return kinds


@pytest.mark.parametrize("point", [BEFORE, AFTER])
@pytest.mark.usefixtures("faulty_platform")
def test_migrate_source_enclave_killed_inside_its_commit(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    point: str,
) -> None:
    """``before``: the COMMIT is refused for good: the tool names the enclave lost (11),
    the destination discards its tree (``source_lost``), the store holds no COMMIT and
    ``recover`` says ``stayed`` with the enclave in ``lost_enclaves`` (before: the
    service wrote the COMMIT after the death; the tool said 6 or 11 and gave the
    source back, the destination kept its tree held, and a later ``recover`` moved the
    application there: the source's writes since were lost).  ``after``: the COMMIT
    was written: the tool ends in doubt (7), never rolls back, and the decision is
    delivered: one copy, on the destination, with every write (before: 6, the
    source given back beside a recorded COMMIT)."""

    app, digest = loaded(bed, f"{point}:kill-enclave")
    before = journals(bed)
    try:
        run = migrate_with(bed, app, agent, "")
        ended = time.monotonic()
        assert "Traceback" not in run.stderr, run.stderr
        assert f"migsgx fault: {point}:kill-enclave" in service_log(bed)
        [journal] = journals(bed) - before
        if point == BEFORE:
            enclave_lost(run, 0)
            assert _commits_recorded(bed, journal) == ["none"]
            wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the held tree to be discarded")
            assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
            assert ask(bed, app, "src", "GET k0").startswith("ERR")  # (its state died with it)
            again = recover(bed)
            assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
            [ours] = [r for r in json.loads(again.stdout) if r["mid"] == journal.stem]
            assert ours["outcome"] in ("stayed", "done"), again.stdout
            assert [e["index"] for e in ours["lost_enclaves"]] == [0], again.stdout
            assert _commits_recorded(bed, journal) == ["none"]  # (and never will)
            assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
            outcome = "stayed without the dead enclave's state (exit 11), named; nothing held"
        else:
            assert run.returncode == EXIT_IN_DOUBT, run.stderr
            assert "after its COMMIT was recorded" in run.stderr, run.stderr
            assert _commits_recorded(bed, journal) == ["commit"]
            again = recover(bed, timeout=150)
            assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
            [ours] = [r for r in json.loads(again.stdout) if r["mid"] == journal.stem]
            assert ours["outcome"] in ("moved", "done"), again.stdout
            only_copy(bed, app, "dst", digest)
            outcome = "moved after one recover (exit 7): one copy with every write"
        figures[f"{point.removeprefix('platform.')} x kill -9 source enclave (migrate)"] = {
            "outcome": outcome, "exit": run.returncode,
            # (from the service's fault mark to the tool's exit: the store read included)
            "tool_exit_after_fault": round(ended - fault_time(service_log(bed)), 3),
        }  # fmt: skip
    finally:
        stop_guardian_of(app.pid)
        end_copies(bed, app)


@pytest.mark.parametrize("point", [BEFORE, AFTER])
@pytest.mark.usefixtures("faulty_platform")
def test_checkpoint_enclave_killed_inside_its_gate_commit(
    bed: Testbed, tmp_path: Path, point: str
) -> None:
    """``before``: the gate's commit is refused for good: the tool names the enclave lost
    (11), removes the files, the source runs on (without that state), and ``recover
    --checkpoint --json`` names it (``lost_enclaves``).  ``after``: the gate committed:
    the checkpoint holds the state, the tool finishes it (0, the source gone) and the
    restore gives one copy with every write.  Before, both exited 6 and removed the
    files (after: the only copy of the enclave's state)."""

    app, digest = loaded(bed, f"{point}:kill-enclave")
    ck = tmp_path / "ck"
    sock = {"MIGSGX_PLATFORM_SOCKET": str(bed.services["src"].socket)}
    try:
        run = cli("checkpoint", str(app.pid), "--dir", str(ck), env=sock)
        assert "Traceback" not in run.stderr, run.stderr
        assert f"migsgx fault: {point}:kill-enclave" in service_log(bed)
        if point == BEFORE:
            enclave_lost(run, 0)
            assert sorted(p.name for p in ck.iterdir()) == ["checkpoint-journal.json"]
            assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
            assert ask(bed, app, "src", "GET k0").startswith("ERR")
            again = cli("recover", "--checkpoint", str(ck), "--json", env=sock)
            assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
            [ours] = json.loads(again.stdout)
            assert ours["outcome"] == "stayed", again.stdout
            named = ours["lost_enclaves"]
            assert [e["index"] for e in named] == [0] and len(named[0]["mr_enclave"]) == 64
        else:
            assert run.returncode == EXIT_OK, run.stderr
            wait_until(lambda: bed.runnable_copies(app)["src"] == 0, 15, "the source to end")
            restored = cli(
                "restore", "--dir", str(ck), "--netns", bed.host("src").netns,
                "--platform-socket", str(bed.services["src"].socket), env={},
            )  # fmt: skip
            assert restored.returncode == 0, restored.stderr
            wait_until(lambda: bed.runnable_copies(app)["src"] == 1, 15, "one copy")
            assert ask(bed, app, "src", "DIGEST") == digest
            assert ask(bed, app, "src", "PUT after 01").startswith("OK")  # ECALLs work
    finally:
        end_copies(bed, app)
