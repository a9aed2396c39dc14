"""Two faults after the commit point: the COMMIT's answer lost, then the destination's copy.

The source's platform service writes the enclave's COMMIT (retiring its
persistent record in the same update) and ends before it answers
(``platform.after-commit:exit``): the enclave cannot know that it committed, the
tool ends in doubt (7) and its guardian carries the recorded COMMIT.  That
token's first arrival at the destination kills the loaded copy before it judged
it (``agent.before-claim:kill-enclave``): the destination keeps the tree held for
the state again (``copy-lost``), and only the frozen source enclave still holds
it.  Before, that enclave refused to deliver its state again (only a committed
source re-delivers, and it did not know it had committed): the guardian stayed
in doubt for its 10 minutes and ``recover`` could not move it.  Now the
re-delivery reads the decision from the platform store first (``decision-unknown``
while no service answers): once the service is back, one ``migsgx recover`` finds
the application moved, one copy with every acknowledged write
(``docs/spec/commit.md``, section 5).
"""

from __future__ import annotations

import json

import pytest
from bed_helpers import enclave_processes, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    destination_fault,
    migrate_with,
    no_images_left,  # noqa: F401
    only_copy,
    recover,
)
from platform_faults import (  # (faulty_platform: a fixture)
    AFTER,
    faulty_platform,  # noqa: F401
    journals,
    restart_platform,
)

from migsgx import _proc
from migsgx.agent.journal import Journal
from migsgx.lab.testbed import Testbed
from migsgx.sgx.counters import COUNTERS, CounterStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 227


@pytest.mark.usefixtures("faulty_platform")
def test_commit_answer_lost_then_destination_copy_lost_moves_after_one_recover(
    bed: Testbed, figures: dict[str, dict[str, object]]
) -> None:
    restart_platform(bed, f"{AFTER}:exit")  # (the application's enclave is its child)
    with destination_fault(bed, "agent.before-claim:kill-enclave", stop_guardian=True) as c:
        app = c.app
        enclaves = enclave_processes(bed, "src")
        assert len(enclaves) == 1, enclaves
        before = journals(bed)
        run = migrate_with(bed, app, c.doomed, "")
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "its COMMIT may be recorded" in run.stderr, run.stderr
        [journal] = journals(bed) - before
        store = CounterStore(bed.state("src") / COUNTERS)
        [mid] = Journal.load(journal).enclave_mids
        held = store.decision(mid)
        assert held is not None and held.kind == "commit"
        restart_platform(bed, "")
        again = recover(bed, timeout=150)
        assert again.returncode == 0 and "Traceback" not in again.stderr, (
            again.stdout + again.stderr
        )
        [ours] = [r for r in json.loads(again.stdout) if r["mid"] == journal.stem]
        assert ours["outcome"] in ("moved", "done"), again.stdout
        log = c.doomed.log.read_text(errors="replace")
        assert "before-claim:kill-enclave" in log and "receives the state again" in log, log
        # One decision, one token in the store: the first, as written.
        assert store.decision(mid) == held
        # The committed source enclave is released once the destination runs, and ends.
        wait_until(lambda: not any(map(_proc.alive, enclaves)), 60, "the release")
        figures["decision written, its answer lost x source platform service ends, then "
                "kill -9 destination enclave"] = {
            "outcome": "moved after one recover (the state delivered again)",
            "exit": run.returncode, "recover": again.returncode, "seconds": c.seconds(),
        }  # fmt: skip
        only_copy(bed, app, "dst", c.digest)
