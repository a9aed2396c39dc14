"""``migsgx recover`` after one that found a source enclave hung, beside a guardian that
still asks, and after a guardian that died while it waited for the platform service.

Each cell: exactly one runnable copy with every acknowledged write, after the
``recover`` runs its story needs, each with an honest status (7 while a source
enclave has not aborted, 0 once resolved); no source given back beside an enclave
that has not aborted (the application takes its enclaves all or none, and a
frozen one answers no call).  Reached by fault points and by SIGSTOP/SIGCONT of
a source enclave or of the source's platform service (whose enclaves then wait
for their answer: alive, their connections open), never by sleeping.

* **A second ``recover``** (``docs/spec/commit.md`` section 5): before, the first
  one stopped at the first enclave that did not answer its abort, and the second,
  seeing that enclave's ABORT recorded meanwhile, asked no abort at all: the
  other enclave, never asked, went back to the application still frozen (its
  calls hung), and ``recover`` said ``stayed``, exit 0.
* **Beside the guardian** (section 5, "A source platform service that ends inside a
  COMMIT"): the guardian asks the aborts until the restarted service checks them;
  before, a ``recover`` run meanwhile saw one enclave's ABORT and gave the source
  back while the other was still frozen.
* **The guardian killed while it waits for the platform service** (the window the
  spec reasoned about, without a cell before): one ``recover`` once the service
  is back.  Before, the enclave let the duplicate of its connection go with its
  ``group-unchecked`` answer, and the guardian's death ended it with the state.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed_helpers import end_copies, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    EXIT_OK,
    guardians_of,
    loaded_app,
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
    restart_platform,
)

from migsgx import _proc
from migsgx.agent.journal import Journal
from migsgx.lab.testbed import AgentProcess, AppProcess, Testbed
from migsgx.sgx.counters import COUNTERS, CounterStore
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 229


def _recorded(bed: Testbed, journal: Path) -> list[str]:
    """Each enclave's recorded decision kind of the migration of ``journal`` (``none``)."""

    store = CounterStore(bed.state("src") / COUNTERS)
    found = [store.decision(mid) for mid in Journal.load(journal).enclave_mids]
    return [d.kind if d is not None else "none" for d in found]


def _enclave_pids(journal: Path) -> list[int]:
    """The source enclaves' processes, in the journal's order (its ``holders``)."""

    return [int(h[0]) for h in Journal.load(journal).holders]  # type: ignore[index]


def _ours(run: subprocess.CompletedProcess[str], journal: Path) -> dict[str, object]:
    said = run.stdout + run.stderr
    assert "Traceback" not in run.stderr, said
    [ours] = [r for r in json.loads(run.stdout) if r["mid"] == journal.stem]
    return dict(ours)


def _stopped(app: AppProcess) -> bool:
    """The source application is still fenced (stopped), not given back."""

    return process_state(app.pid) in ("T", "t")


@contextlib.contextmanager
def _continued_after(bed: Testbed, app: AppProcess) -> Iterator[list[int]]:
    """At the end, whatever happened: the source's platform service and the enclaves the
    cell names (it adds their pids to the list) continued (a stopped one would outlive
    the cell), the guardian ended, every copy ended."""

    stopped: list[int] = []
    try:
        yield stopped
    finally:
        for pid in [bed.services["src"].process.pid, *stopped]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stop_guardian_of(app.pid)
        end_copies(bed, app)


def test_a_second_recover_asks_every_enclave_the_first_left_frozen(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """Two enclaves in the group, nothing decided; the tool and its guardian killed.  The
    source's platform service is stopped (SIGSTOP): every abort waits for its answer,
    each enclave alive, its connection open.  The first ``recover`` asks each (bounded)
    and gets no answer: in doubt (7), the source stopped.  The service continued, the
    enclaves record their ABORTs; the second ``recover`` asks every enclave again,
    hands both back and gives the source back: every write, both enclaves answer."""

    app, digest = loaded_app(bed, "--enclaves", "2")
    cell = "after-group x SIGSTOP source platform service + kill -9 guardian, tool; recover x2"
    service = bed.services["src"].process.pid
    with _continued_after(bed, app):
        before = journals(bed)
        run = migrate_with(bed, app, agent, "tool.after-group:kill-guardian-and-tool")
        assert run.returncode == -9 and "Traceback" not in run.stderr, run.stderr
        [journal] = journals(bed) - before
        pids = _enclave_pids(journal)
        os.kill(service, signal.SIGSTOP)
        try:
            first = recover(bed)
            assert first.returncode == EXIT_IN_DOUBT, first.stdout + first.stderr
            said = _ours(first, journal)
            assert said["outcome"] == "in-doubt", said
            assert f"enclave 0 (pid {pids[0]}) is not answering (__mig_abort" in str(said["detail"])
            assert _stopped(app)
        finally:
            os.kill(service, signal.SIGCONT)
        # Each reads the abort it was asked once its platform service answers.
        wait_until(lambda: _recorded(bed, journal)[0] == "abort", 30, "enclave 0's ABORT")
        second = recover(bed)
        said = _ours(second, journal)
        assert second.returncode == EXIT_OK and said["outcome"] == "stayed", said
        assert _recorded(bed, journal) == ["abort", "abort"]  # (before: enclave 1 none)
        figures[cell] = {
            "outcome": "in doubt (7), then stayed after the second recover, every write in "
            "both enclaves (before: the second handed enclave 1 back still frozen, exit 0)",
            "exit": run.returncode, "recover": [first.returncode, second.returncode],
        }  # fmt: skip
        only_copy(bed, app, "src", digest)


@pytest.mark.usefixtures("faulty_platform")
def test_recover_beside_a_guardian_still_asking_gives_nothing_back(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """Two enclaves; the source's platform service ends with the first COMMIT received
    (``platform.before-commit:exit``): its decision unknown, the tool ends in doubt (7)
    and its guardian asks both enclaves to abort until a service checks it.  Enclave 1
    hangs (SIGSTOP), the service comes back, enclave 0's ABORT is recorded.  A
    ``recover`` now wakes the guardian, waits for it (bounded) and says in doubt (7),
    the source still stopped (before: it gave the source back at once, exit 0, beside
    enclave 1 frozen).  Enclave 1 continued, the guardian gives the source back;
    one ``recover``: every write."""

    restart_platform(bed, f"{BEFORE}:exit")
    app, digest = loaded_app(bed, "--enclaves", "2")
    cell = "decision received (two enclaves) x source platform service ends + SIGSTOP enclave 1"
    with _continued_after(bed, app) as stopped:
        before = journals(bed)
        run = migrate_with(bed, app, agent, "")
        assert run.returncode == EXIT_IN_DOUBT and "Traceback" not in run.stderr, run.stderr
        assert "its COMMIT may be recorded" in run.stderr, run.stderr
        [journal] = journals(bed) - before
        pids = _enclave_pids(journal)
        stopped.extend(pids)
        os.kill(pids[1], signal.SIGSTOP)
        restart_platform(bed, "")
        wait_until(lambda: _recorded(bed, journal) == ["abort", "none"], 60, "enclave 0's ABORT")
        [guardian] = guardians_of(app.pid)
        first = recover(bed)
        said = _ours(first, journal)
        assert first.returncode == EXIT_IN_DOUBT and said["outcome"] == "in-doubt", said
        assert f"the guardian (pid {guardian}) holds them" in str(said["detail"]), said
        assert _stopped(app) and _recorded(bed, journal) == ["abort", "none"]
        os.kill(pids[1], signal.SIGCONT)
        wait_until(lambda: not guardians_of(app.pid), 60, "the guardian to give the source back")
        second = recover(bed)
        said = _ours(second, journal)
        assert second.returncode == EXIT_OK and said["outcome"] in ("stayed", "done"), said
        assert _recorded(bed, journal) == ["abort", "abort"]
        figures[cell] = {
            "outcome": "in doubt (7) while enclave 1 is frozen, the source stopped; stayed "
            "once it answered, every write (before: recover gave the source back, exit 0)",
            "exit": run.returncode, "recover": [first.returncode, second.returncode],
        }  # fmt: skip
        only_copy(bed, app, "src", digest)


@pytest.mark.usefixtures("faulty_platform")
def test_guardian_killed_while_it_waits_for_the_platform_service(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The source's platform service ends with the COMMIT received, not written; the tool
    ends in doubt (7) and its guardian asks the abort, which answers ``group-unchecked``
    while no service runs.  The guardian is killed there; the service comes back; one
    ``recover`` takes the enclave's connection back (it kept its duplicate and its
    state, frozen), the restarted service records its ABORT: the source, every write.
    Before, the enclave let its duplicate go with that answer and ended with the
    guardian: the state was lost, and ``recover`` said in doubt for good."""

    restart_platform(bed, f"{BEFORE}:exit")
    app, digest = loaded_app(bed)
    cell = "decision received x source platform service ends, guardian killed"
    with _continued_after(bed, app):
        before = journals(bed)
        run = migrate_with(bed, app, agent, "")
        assert run.returncode == EXIT_IN_DOUBT and "Traceback" not in run.stderr, run.stderr
        assert "the platform service cannot check the abort" in run.stderr, run.stderr
        [journal] = journals(bed) - before
        [enclave] = _enclave_pids(journal)
        [guardian] = guardians_of(app.pid)
        os.kill(guardian, signal.SIGKILL)
        wait_until(lambda: not guardians_of(app.pid), 30, "the guardian to end")
        restart_platform(bed, "")
        assert _proc.alive(enclave)  # (it holds the state, frozen, and its duplicate)
        again = recover(bed)
        said = _ours(again, journal)
        assert again.returncode == EXIT_OK and said["outcome"] == "stayed", said
        assert _recorded(bed, journal) == ["abort"]
        figures[cell] = {
            "outcome": "stayed after one recover once the service was back, every write "
            "(before: the enclave ended with the guardian, the state lost)",
            "exit": run.returncode, "recover": again.returncode,
        }  # fmt: skip
        only_copy(bed, app, "src", digest)
