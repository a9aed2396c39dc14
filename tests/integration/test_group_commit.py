"""A migration cut between two enclaves' commits, with real CRIU between two namespaced hosts.

The kvstore example runs two enclaves (keys spread over both) with acknowledged
writes in each.  The fault point ``tool.between-commits`` lies after the first
source enclave recorded its COMMIT and before the second decided.  The first
COMMIT is the commit point of the whole migration: whoever finishes the
migration commits the rest (the guardian; or, when the guardian died too,
``migsgx recover`` on the connections it takes back from the enclaves, which
each hold a duplicate of their own; an undecided enclave whose connection
closes commits itself: its platform store refuses its ABORT in a migration
group that committed), and after at most one
``migsgx recover`` exactly one copy runs, on the destination, with every
acknowledged write of both enclaves (``docs/spec/commit.md``, section 1.1).
"""

from __future__ import annotations

import json

import pytest
from bed_helpers import ask, end_copies, kvstore, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    migrate_with,
    no_images_left,  # noqa: F401
    recover,
    stop_guardian_of,
)

from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AgentProcess, AppProcess, Testbed
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.platform import COUNTERS
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 119
KEYS = 6  # spread over both enclaves (hash(key) % 2): each holds some


def two_enclave_app(bed: Testbed) -> tuple[AppProcess, str, list[int]]:
    """A kvstore with two enclaves and acknowledged writes in both; its digest and
    its enclave processes."""

    app = kvstore(bed, "--enclaves", "2")
    for i in range(KEYS):
        assert ask(bed, app, "src", f"PUT k{i} {f'v{i}'.encode().hex()}").startswith("OK")
    state = json.loads(ask(bed, app, "src", "STATE").removeprefix("STATE "))
    pids = [int(p) for p in state["enclave_pids"]]
    assert len(pids) == 2
    return app, ask(bed, app, "src", "DIGEST"), pids


def only_on_destination(bed: Testbed, app: AppProcess, digest: str) -> None:
    """Exactly one runnable copy, on ``dst``, with both enclaves' acknowledged writes."""

    wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the source tree to end")
    wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 30, "the destination to run")
    assert bed.runnable_copies(app) == {"src": 0, "dst": 1}
    assert ask(bed, app, "dst", "DIGEST") == digest
    for i in range(KEYS):  # every key, in whichever enclave holds it, answers
        assert ask(bed, app, "dst", f"GET k{i}") == f"VALUE {f'v{i}'.encode().hex()}"
    assert ask(bed, app, "dst", "PUT after " + b"x".hex()).startswith("OK")  # ECALLs work
    end_copies(bed, app)


def decisions(bed: Testbed) -> list[str]:
    """The kinds of every decision recorded on the source host (oldest first)."""

    return [d.kind for d in CounterStore(bed.state("src") / COUNTERS).decisions()]


def test_tool_killed_between_two_commits_the_guardian_commits_the_rest(
    bed: Testbed, agent: AgentProcess
) -> None:
    app, digest, _ = two_enclave_app(bed)
    before = len(decisions(bed))
    run = migrate_with(bed, app, agent, "tool.between-commits:kill")
    assert run.returncode == -9, run.stderr
    # The guardian found one COMMIT, committed the other enclave and delivered both.
    only_on_destination(bed, app, digest)
    assert decisions(bed)[before:] == ["commit", "commit"]
    # One group, and not the session id (the destination and the journal know that).
    groups = {d.group for d in CounterStore(bed.state("src") / COUNTERS).decisions()[before:]}
    sessions = {p.stem for p in (bed.state("src") / "agent" / "migrations").glob("*.json")}
    [group] = groups
    assert len(group) == 16 and sessions and group.hex() not in sessions
    again = recover(bed, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(r["outcome"] != "in-doubt" for r in json.loads(again.stdout))


def test_tool_and_guardian_killed_between_two_commits_one_recover_moves_it(
    bed: Testbed, agent: AgentProcess
) -> None:
    app, digest, enclaves = two_enclave_app(bed)
    before = len(decisions(bed))
    run = migrate_with(bed, app, agent, "tool.between-commits:kill-guardian-and-tool")
    assert run.returncode == -9, run.stderr
    # Nobody holds the source enclaves now, but each holds a duplicate of its own
    # connection (no end of file): the committed one keeps its state, the undecided
    # one stays undecided, both wait for recover.
    assert all(process_state(p) not in ("", "Z") for p in enclaves)
    assert decisions(bed)[before:] == ["commit"]
    assert bed.runnable_copies(app)["dst"] == 0  # held, until a token comes
    # recover takes their connections back, commits the undecided one (the first
    # COMMIT was the commit point) and delivers both tokens; then releases them.
    result = recover(bed, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    [moved] = [r for r in json.loads(result.stdout) if r["outcome"] != "done"]
    assert (moved["decision"], moved["outcome"]) == ("commit", "moved"), moved
    assert decisions(bed)[before:] == ["commit", "commit"]
    wait_until(lambda: all(process_state(p) in ("", "Z") for p in enclaves), 30,
               "the source enclaves to be released")  # fmt: skip
    only_on_destination(bed, app, digest)


def test_source_platform_killed_between_two_commits_the_rest_commits_once_it_is_back(
    bed: Testbed, agent: AgentProcess
) -> None:
    """The second enclave cannot record its COMMIT: the tool ends in doubt (7), nothing
    aborts; with the platform service back, one recover (the guardian it wakes)
    commits it and the migration completes."""

    app, digest, _ = two_enclave_app(bed)
    before = len(decisions(bed))
    try:
        run = migrate_with(bed, app, agent, "tool.between-commits:kill-source-platform")
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "Traceback" not in run.stderr
        assert decisions(bed)[before:] == ["commit"]
        assert bed.runnable_copies(app) == {"src": 0, "dst": 0}  # stopped here, held there
    finally:
        bed.services["src"].stop()  # killed: a fresh one (the enclaves reattach to it)
        bed.services["src"] = start_service(bed.state("src"), prefix=bed.host("src").command([]))
    # The guardian retries by itself (it may be done before this recover wakes it).
    result = recover(bed, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {r["outcome"] for r in json.loads(result.stdout)} <= {"done", "moved"}
    assert decisions(bed)[before:] == ["commit", "commit"]
    only_on_destination(bed, app, digest)


def test_guardian_killed_between_two_commits_the_tool_goes_on(
    bed: Testbed, agent: AgentProcess
) -> None:
    """The tool holds the enclaves itself: it commits the second and the move ends (exit 0)."""

    app, digest, _ = two_enclave_app(bed)
    before = len(decisions(bed))
    run = migrate_with(bed, app, agent, "tool.between-commits:kill-guardian")
    assert run.returncode == 0, run.stderr
    assert decisions(bed)[before:] == ["commit", "commit"]
    only_on_destination(bed, app, digest)


def test_second_source_enclave_killed_between_two_commits_is_lost_and_said(
    bed: Testbed, agent: AgentProcess
) -> None:
    """Window W1 of the later enclave: it dies undecided after the group committed.

    Its state is lost (its destination copy needs a token only it could make): the
    tool ends in doubt (7), nothing runs twice (nor at all: the source is fenced,
    the destination tree held), and recover says what remains.  Runs last: its
    migration stays in doubt.
    """

    app, _, _ = two_enclave_app(bed)
    before = len(decisions(bed))
    try:
        run = migrate_with(bed, app, agent, "tool.between-commits:kill-source-enclave")
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "Traceback" not in run.stderr
        assert decisions(bed)[before:] == ["commit"]
        assert bed.runnable_copies(app) == {"src": 0, "dst": 0}
    finally:
        stop_guardian_of(app.pid)  # (it would retry the commit for 10 minutes)
    result = recover(bed, timeout=120)
    assert result.returncode == EXIT_IN_DOUBT, result.stdout + result.stderr
    [doubt] = [r for r in json.loads(result.stdout) if r["outcome"] != "done"]
    assert (doubt["decision"], doubt["outcome"]) == ("mixed", "in-doubt"), doubt
    assert "no guardian holds them" in doubt["detail"], doubt
    assert bed.runnable_copies(app) == {"src": 0, "dst": 0}
    end_copies(bed, app)
