"""``migsgx recover`` and a source enclave that does not answer (SIGSTOP: alive, its
connection open, no answer), with the tool and its guardian dead.

The tool stops the first source enclave at a fault point, kills its guardian and
dies (``stop-first-source-enclave-guardian-and-tool``).  ``recover`` then holds
nothing: it takes the connections back from the enclaves themselves
(``__mig_held`` first).  Before, each of its calls on the stopped enclave
waited 30 s, and then took it for one whose duplicate was let go: undecided, it
reported "the source enclaves never decided; if they are gone, so is their
state" (after 30 s); committed, it delivered the tokens and left the stopped
enclave unreleased without a word.  Now the guardian's rule (:mod:`migsgx.agent.
enclave_ask`): one bounded answer (5 s), the enclave told dead (end of file),
decided (its store) or hung, and a hung one reported in doubt (exit 7), named
with its pid, nothing done on its silence.  Continued (SIGCONT), a second
``recover`` resolves it: exactly one runnable copy with every acknowledged
write.  The seconds of the first ``recover`` go to ``fault-matrix``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest
from bed_helpers import enclave_processes, end_copies
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    EXIT_OK,
    loaded_app,
    migrate_with,
    no_images_left,  # noqa: F401
    only_copy,
    recover,
)

from migsgx.lab.testbed import AgentProcess, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 97


def _stopped(bed: Testbed) -> list[int]:
    return [p for p in enclave_processes(bed, "src") if process_state(p) in ("T", "t")]


@pytest.mark.parametrize(
    "cell, point, outcome, at",
    [
        ("before-commit x SIGSTOP source enclave + kill -9 guardian, tool; recover",
         "tool.before-commit", "stayed", "src"),
        ("after-commit x SIGSTOP source enclave + kill -9 guardian, tool; recover",
         "tool.after-commit", "moved", "dst"),
    ],
)  # fmt: skip
def test_recover_names_a_hung_enclave_and_resolves_once_it_answers(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    cell: str,
    point: str,
    outcome: str,
    at: str,
) -> None:
    app, digest = loaded_app(bed)
    try:
        run = migrate_with(bed, app, agent, f"{point}:stop-first-source-enclave-guardian-and-tool")
        assert run.returncode == -9 and "Traceback" not in run.stderr, run.stderr
        [stopped] = _stopped(bed)
        started = time.monotonic()
        first = recover(bed)
        seconds = time.monotonic() - started
        said = first.stdout + first.stderr
        assert first.returncode == EXIT_IN_DOUBT and "Traceback" not in first.stderr, said
        [result] = [r for r in json.loads(first.stdout) if r["outcome"] != "done"]
        assert result["outcome"] == "in-doubt", said
        assert f"enclave 0 (pid {stopped}) is not answering" in result["detail"], said
        # Nothing decided from its silence: still stopped, still holding its state.
        assert process_state(stopped) in ("T", "t")
        os.kill(stopped, signal.SIGCONT)
        second = recover(bed)
        said = second.stdout + second.stderr
        assert second.returncode == EXIT_OK and "Traceback" not in second.stderr, said
        results = [r for r in json.loads(second.stdout) if r["outcome"] != "done"]
        assert [r["outcome"] for r in results] == [outcome], said
        figures[cell] = {
            "outcome": f"in doubt (the enclave named), then {outcome} after SIGCONT and a "
            "second recover, every write",
            "exit": run.returncode, "recover": [first.returncode, second.returncode],
            "first_recover_seconds": round(seconds, 3),
        }  # fmt: skip
        only_copy(bed, app, at, digest)
    finally:
        for pid in enclave_processes(bed, "src"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        end_copies(bed, app)
