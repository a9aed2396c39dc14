"""Window W2 with the destination's platform service away longer than its enclave waits.

The source committed; the destination's loaded copy is about to claim the
migration id when its platform service is killed (``agent.before-claim``), and
the test starts the service again only once the agent says the claim failed
for want of it (the enclave's own wait for a restarted service,
``REATTACH_WAIT``, ran out), or once the state delivered again waits for it: a
log line, never a sleep.  Seen in a loaded run: the agent took the live copy
for lost and replaced it, the fresh copy's launch failed at once (the service
not yet back), the failed ``resume`` discarded the held tree, and ``migsgx
recover`` found a committed migration with no copy anywhere: ``lost``.

Each cell checks, after at most one ``migsgx recover``: exactly one runnable
copy, on the destination, holding every acknowledged write
(``docs/spec/commit.md``, 2.1 and section 5, W2 (c)).  One bed, as the other
platform cells (:mod:`platform_faults`); each cell's destination service is
started afresh by the cell.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from bed_helpers import ask, wait_until
from fault_helpers import (
    EXIT_IN_DOUBT,
    EXIT_OK,
    destination_fault,
    no_images_left,  # noqa: F401  (autouse: after every cell, no images left in /dev/shm)
    only_copy,
    recover,
)

from migsgx.lab.testbed import MigrateRun, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 113

#: The agent's word once a live copy's claim failed for want of its platform service.
BLOCKED = "lives but cannot claim: its platform service is away"
#: ... once the state delivered again waits for the service before its fresh enclave.
WAITS = "the state delivered again waits for it"
#: ... once a copy was taken for lost and a fresh one was to receive the state.
REPLACED = "lost its copy before the claim"


@pytest.mark.parametrize(
    "action, mark, persist",
    [
        # (a) the loaded copy lives: it must wait for its service, never be replaced.
        pytest.param("kill-platform", BLOCKED, False, id="service-away"),
        # The same with a persistent state, which the claim installs in one update.
        pytest.param("kill-platform", BLOCKED, True, id="service-away-persistent"),
        # (b) its enclave killed too while the service is away: the state comes again.
        pytest.param("kill-platform-and-enclave", WAITS, False, id="service-away-enclave-killed"),
    ],
)
def test_the_claim_waits_for_a_platform_service_away_past_the_reattach_wait(
    bed: Testbed, figures: dict[str, dict[str, object]], action: str, mark: str, persist: bool
) -> None:
    with destination_fault(bed, f"agent.before-claim:{action}", restart_platform=True) as c:
        app, doomed = c.app, c.doomed
        if persist:
            assert ask(bed, app, "src", f"PERSIST p-{uuid.uuid4().hex[:12]}") == "OK 1"
        result: list[MigrateRun] = []
        mover = threading.Thread(
            target=lambda: result.append(bed.migrate(app.pid, doomed)), daemon=True
        )
        mover.start()
        try:
            # The service stays away until the agent says so (or the tool gave up).
            wait_until(
                lambda: mark in doomed.log.read_text(errors="replace") or not mover.is_alive(),
                120, f"the agent to say {mark!r}",
            )  # fmt: skip
            c.restart_platform()
            mover.join(180)
            assert result, "the migration did not end"
            run = result[0]
            assert "Traceback" not in run.stderr, run.stderr
            if run.returncode == EXIT_IN_DOUBT:
                again = recover(bed)
                assert again.returncode == 0, again.stdout + again.stderr
            else:
                assert run.returncode == EXIT_OK, run.stderr
            wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 60, "the destination to run")
            wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the source to go")
            log = doomed.log.read_text(errors="replace")
            assert mark in log, log[-4000:]
            if action == "kill-platform":
                assert REPLACED not in log, log[-4000:]  # the live copy was never replaced
            else:
                assert REPLACED in log and "the platform service is back" in log, log[-4000:]
            label = f"{action}{', persistent state' if persist else ''}"
            figures[f"decision written x destination platform service away ({label})"] = {
                "outcome": "moved", "exit": run.returncode, "seconds": c.seconds(),
            }  # fmt: skip
            only_copy(bed, app, "dst", c.digest)
        finally:
            mover.join(180)
