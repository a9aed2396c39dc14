"""A guardian killed after its abort found the decision unknown: the enclave keeps its state.

The source's platform service ends inside the COMMIT (``platform.before-commit:exit``:
received, not written); the tool ends in doubt (7), its guardian asks the abort, which
answers ``group-unchecked`` (no service to check it), and the guardian is killed right
after that answer (``guardian.abort-answered:kill``).  Before, the enclave let the
duplicate of its connection go with any error answer to an abort: with the guardian
gone it saw end of file, its runtime's own abort failed (no service) and it wiped the
state anyway.  The store held nothing, the destination's copy never got a token: the
application was lost.  Now an abort that leaves the state frozen, committed or undecided
keeps the duplicate (``channels.md`` 7.1, ``commit.md`` sections 1 rule 4 and 5), and
one ``migsgx recover`` once the service is back takes it back, aborts (the restarted
service records the ABORT) and hands it to the application: the source runs with every
acknowledged write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bed_helpers import enclave_processes, end_copies, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    EXIT_OK,
    guardians_of,
    migrate_with,
    no_images_left,  # noqa: F401
    only_copy,
    recover,
    stop_guardian_of,
)
from platform_faults import (  # (faulty_platform: a fixture)
    BEFORE,
    faulty_platform,  # noqa: F401
    journals,
    loaded,
    restart_platform,
)

from migsgx import _proc
from migsgx.lab.testbed import AgentProcess, Testbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 251

KILLED = "migsgx fault: guardian.abort-answered:kill"


def _guardian_log(journal: Path, stderr: str) -> str:
    """Where the guardian reported: the tool's stderr, then its journal's log."""

    log = journal.with_suffix(".log")
    return stderr + (log.read_text(errors="replace") if log.exists() else "")


@pytest.mark.usefixtures("faulty_platform")
def test_guardian_killed_after_a_group_unchecked_abort(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The tool in doubt (7); the guardian killed after its first abort answered
    ``group-unchecked``; the enclave lives on, frozen, holding its duplicate; the service
    restarted, one ``recover`` finds it stayed: the source, one copy, every write."""

    app, digest = loaded(bed, f"{BEFORE}:exit")
    enclaves = enclave_processes(bed, "src")  # (this application's: the service is new)
    assert len(enclaves) == 1, enclaves
    before = journals(bed)
    try:
        run = migrate_with(bed, app, agent, "guardian.abort-answered:kill")
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "its COMMIT may be recorded" in run.stderr, run.stderr
        [journal] = journals(bed) - before
        wait_until(lambda: not guardians_of(app.pid), 60, "the guardian killed at its abort")
        assert KILLED in _guardian_log(journal, run.stderr)
        # Every holder of the connection but the enclave's duplicate is gone: the
        # enclave keeps the only copy (before, it wiped it and ended).
        assert all(map(_proc.alive, enclaves)), "the enclave ended with its state"
        restart_platform(bed, "")
        again = recover(bed, timeout=150)
        assert again.returncode == EXIT_OK and "Traceback" not in again.stderr, again.stderr
        [ours] = [r for r in json.loads(again.stdout) if r["mid"] == journal.stem]
        assert ours["outcome"] in ("stayed", "done"), again.stdout
        only_copy(bed, app, "src", digest)
        figures["decision unknown x guardian killed after group-unchecked"] = {
            "outcome": "stayed after one recover (exit 7): the source with every write",
            "exit": run.returncode,
        }
    finally:
        stop_guardian_of(app.pid)
        end_copies(bed, app)
