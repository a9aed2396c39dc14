"""A source's platform service that dies inside a COMMIT: the enclave lives, its answer lost.

The enclave sent its COMMIT; the service received it (``platform.before-commit``)
or wrote it, retiring the persistent record in the same update
(``platform.after-commit``), and ended before it answered.  The enclave cannot
tell which.  Before, the tool took the failed first COMMIT for "nothing
decided" and rolled back with ``none_committed``: the enclave aborted in memory
(its abort record unwritable, the service gone) and the source ran on while the
store could hold a COMMIT whose token a later ``recover`` or guardian delivers:
two copies.  Now the enclave knows its request went out and its answer was lost:
it aborts only once a platform service answered the abort (first decision wins;
its own COMMIT held, it is committed), and the tool ends in doubt (7); the
guardian asks until the restarted service answers, and one ``migsgx recover``
then finds exactly one copy with every write (``docs/spec/commit.md``, 1 rule 4
and section 5).

The moment is reached in the source's platform service itself
(``MIGSGX_FAULT=platform.after-commit:exit``: it ends there).  One bed; each
cell restarts the source's platform service with its fault, then starts the
application (its enclave a child of that service, which outlives it).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from bed_helpers import enclave_processes, end_copies, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    guardians_of,
    migrate_with,
    no_images_left,  # noqa: F401
    only_copy,
    recover,
    stop_guardian_of,
)
from platform_faults import (  # (faulty_platform: a fixture)
    AFTER,
    BEFORE,
    faulty_platform,  # noqa: F401
    journals,
    loaded,
    restart_platform,
)

from migsgx import _proc
from migsgx.agent.journal import Journal
from migsgx.lab.testbed import AgentProcess, Testbed
from migsgx.sgx.counters import COUNTERS, CounterStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 167


def _recorded(bed: Testbed, journal: Path) -> list[str]:
    """Each enclave's recorded decision kind of the migration of ``journal`` (``none``)."""

    store = CounterStore(bed.state("src") / COUNTERS)
    kinds = []
    for mid in Journal.load(journal).enclave_mids:
        found = store.decision(mid)
        kinds.append(found.kind if found is not None else "none")
    return kinds


@pytest.mark.parametrize("point", [BEFORE, AFTER])
@pytest.mark.usefixtures("faulty_platform")
def test_platform_service_dies_before_it_answers_a_commit(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    point: str,
) -> None:
    """Both: the tool ends in doubt (7), the source stopped, the enclave frozen (before:
    6, the source ran on, its enclave aborted in memory).  ``after`` (the COMMIT and the
    retirement written): once the service is back, one ``recover`` finds the application
    moved, one copy with every write.  ``before`` (received, not written): the guardian's
    abort is recorded by the restarted service, and one ``recover`` finds it stayed: the
    source, with every write."""

    app, digest = loaded(bed, f"{point}:exit")
    enclaves = enclave_processes(bed, "src")  # (this application's: the service is new)
    assert len(enclaves) == 1, enclaves
    before = journals(bed)
    try:
        run = migrate_with(bed, app, agent, "")
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "its COMMIT may be recorded" in run.stderr, run.stderr
        [journal] = journals(bed) - before
        assert _recorded(bed, journal) == (["commit"] if point == AFTER else ["none"])
        restart_platform(bed, "")
        if point == BEFORE:
            # The guardian asks the abort until the restarted service answers it, then
            # gives the source back and ends.
            wait_until(lambda: _recorded(bed, journal) == ["abort"], 60, "the abort recorded")
            wait_until(lambda: not guardians_of(app.pid), 60, "the guardian to end")
        again = recover(bed, timeout=150)
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
        [ours] = [r for r in json.loads(again.stdout) if r["mid"] == journal.stem]
        if point == AFTER:
            assert ours["outcome"] in ("moved", "done"), again.stdout
            assert _recorded(bed, journal) == ["commit"]
            only_copy(bed, app, "dst", digest)
            # The frozen source enclave takes its recorded COMMIT from the restarted
            # service once released (the guardian, woken as recover wakes it), and ends.
            for pid in guardians_of(app.pid):
                os.kill(pid, signal.SIGUSR1)
            wait_until(lambda: not any(map(_proc.alive, enclaves)), 60, "the release")
            outcome = "moved after one recover (exit 7): one copy with every write"
        else:
            assert ours["outcome"] in ("stayed", "done"), again.stdout
            only_copy(bed, app, "src", digest)
            outcome = "stayed after one recover (exit 7): the source with every write"
        figures[f"{point.removeprefix('platform.')} x source platform service ends"] = {
            "outcome": outcome, "exit": run.returncode,
        }  # fmt: skip
    finally:
        stop_guardian_of(app.pid)
        end_copies(bed, app)
