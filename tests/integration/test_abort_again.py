"""An ABORT that reached nobody is asked again from the live source enclave.

The tool rolls back after LOADED because its first COMMIT failed (the source
platform service died at ``tool.after-group``): the source enclaves abort in
memory (``none_committed``), their store records fail, and the ABORT frames
they return exist only in the tool, which dies before any reaches the
destination: right after the enclave answered (``tool.abort-answered``), or
after the frame went on a data connection that a network fault had cut
(``tool.before-commit:drop-data``, then ``tool.after-abort``).  Nothing in the
store, nothing in the journal, and the destination keeps its loaded copy held,
waiting for a decision.  The guardian's ``__mig_abort`` finds nothing under
way (no frame); it asks the enclave for the frame of the journal's migration
id (``__mig_abort_frame``), keeps it in the journal and carries it: the
destination's enclave judges it and the held tree goes, with no ``migsgx
recover`` and no operator (before: it stayed held, in doubt, until an
operator removed it).  ``docs/spec/commit.md`` 1 rule 6.

Checked before the platform service comes back (the fix needs no store), then
one ``migsgx recover`` finds nothing in doubt.  The seconds from the fault to
the source answering again go to ``fault-matrix`` (min / median / max).
"""

from __future__ import annotations

import json

import cbor2
import pytest
from bed_helpers import ask, end_copies, kvstore, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_MOVED_NOT,
    EXIT_OK,
    fault_time,
    loaded_app,
    migrate_with,
    no_images_left,  # noqa: F401
    only_copy,
    record_back,
    recover,
    source_answers,
)

from migsgx.agent.handback import call_enclave
from migsgx.agent.holders import take_held
from migsgx.agent.journal import Journal
from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AgentProcess, Testbed
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.platform import COUNTERS
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 157
ANSWERED = (
    "abort answered x kill -9 source platform service, then tool",
    "tool.after-group:kill-source-platform,tool.abort-answered:kill",
)
CUT = (
    "abort sent x data connection drop + kill -9 source platform service, then tool",
    "tool.before-commit:drop-data,tool.after-group:kill-source-platform,tool.after-abort:kill",
)


@pytest.mark.parametrize(
    "cell, fault", [ANSWERED, ANSWERED, ANSWERED, CUT],
    ids=["answered-1", "answered-2", "answered-3", "cut"],
)  # fmt: skip
def test_an_abort_the_dead_tool_held_is_asked_again_and_carried(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    cell: str,
    fault: str,
) -> None:
    app, digest = loaded_app(bed)
    journals = bed.state("src") / "agent" / "migrations"
    before = set(journals.glob("*.json"))
    logged = len(agent.log.read_text(errors="replace"))
    try:
        run = migrate_with(bed, app, agent, fault)
        assert run.returncode == -9, run.stderr
        assert "Traceback" not in run.stderr
        assert "migration aborted" in run.stderr, run.stderr  # (it rolled back, then died)
        # (from the first fault: the platform service's death)
        back = source_answers(bed, app, digest, run.stderr) - fault_time(run.stderr)
        wait_until(lambda: bed.copies(app)["dst"] == [], 40, "the held tree to be discarded")
        # (an ABORT delivered over the agents' TLS channel, judged by the held copy)
        said = agent.log.read_text(errors="replace")[logged:]
        assert "the source host aborted it" in said, said
        # Neither the store nor the tool kept it: the enclave handed it out again.
        (path,) = set(journals.glob("*.json")) - before
        journal = json.loads(path.read_text())
        assert journal["phase"] == "done" and all(journal["aborts"]), journal
        store = cbor2.loads((bed.state("src") / "counters.cbor").read_bytes())
        assert not set(journal["enclave_mids"]) & set(store.get("decisions", {})), store
        log = path.with_suffix(".log")
        if log.exists():
            assert "Traceback" not in log.read_text(errors="replace")
    finally:
        bed.services["src"].stop()  # killed: the host's supervisor starts a fresh one
        bed.services["src"] = start_service(bed.state("src"), prefix=bed.host("src").command([]))
    try:
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        assert all(r["outcome"] != "in-doubt" for r in json.loads(again.stdout)), again.stdout
        record_back(figures, cell, run, back)
        figures[cell]["outcome"] = "stayed, the held tree discarded (the ABORT asked again)"
        only_copy(bed, app, "src", digest)
    finally:
        end_copies(bed, app)


def test_a_committed_source_gives_no_abort_and_a_planted_one_is_not_carried(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """Attack: ask a committed source enclave for an ABORT, and plant another migration's
    (authentic under its own keys) in the committed migration's journal.

    The tool and its guardian die right after the commit; the test takes a
    duplicate of the enclave's connection (as ``recover`` would) and asks: the
    enclave, judging from its own state, answers ``committed`` to
    ``__mig_abort_frame`` and to ``__mig_abort``.  The planted frame is never
    carried beside the COMMIT: one ``migsgx recover`` delivers the token and the
    application moves, with every write.
    """

    app, digest = loaded_app(bed)
    journals = bed.state("src") / "agent" / "migrations"
    before = set(journals.glob("*.json"))
    failed = migrate_with(bed, app, agent, "tool.before-commit:fail")
    assert failed.returncode == EXIT_MOVED_NOT, failed.stderr
    (old,) = set(journals.glob("*.json")) - before
    (old_mid,) = Journal.load(old).enclave_mids
    stale = CounterStore(bed.state("src") / COUNTERS).decision(old_mid)
    assert stale is not None and stale.kind == "abort" and stale.frame
    source_answers(bed, app, digest, failed.stderr)
    before = set(journals.glob("*.json"))
    try:
        run = migrate_with(bed, app, agent, "tool.after-commit:kill-guardian-and-tool")
        assert run.returncode == -9, run.stderr
        (path,) = set(journals.glob("*.json")) - before
        journal = Journal.load(path)
        (mid,) = journal.enclave_mids
        taken = take_held(journal.holders)
        try:
            (sock,) = taken.values()
            for fn, args in (("__mig_abort_frame", [mid]), ("__mig_abort", ["attack"])):
                answer = call_enclave(sock, fn, args)
                assert answer is not None and answer.get("code") == "committed", (fn, answer)
        finally:
            for taken_sock in taken.values():
                taken_sock.close()
        journal.update(aborts=[stale.frame.hex()])
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        outcomes = {r["mid"]: r["outcome"] for r in json.loads(again.stdout)}
        assert outcomes.get(journal.data["mid"]) == "moved", again.stdout
        figures["decision written x kill -9 tool + guardian, another ABORT planted (attack)"] = {
            "outcome": "moved: the committed enclave gave no ABORT, the planted one not carried",
            "exit": run.returncode, "recover": again.returncode,
        }  # fmt: skip
        wait_until(lambda: process_state(app.pid) in ("", "Z"), 30, "the source tree to end")
        only_copy(bed, app, "dst", digest)
    finally:
        end_copies(bed, app)


def test_a_group_cut_between_two_aborts_carries_both(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """Two enclaves in one migration group; the roll-back is cut between their aborts.

    The first enclave aborted in memory (``none_committed``, no record: the
    platform service is gone) and its frame died with the tool; the second was
    never asked and, in a group, cannot abort unchecked (``group-unchecked``).
    The guardian asks the first for its frame again and the second until the
    restarted service records its ABORT; both frames reach the destination, the
    held tree goes, the source runs with both enclaves' writes.
    """

    app = kvstore(bed, "--enclaves", "2")
    for i in range(6):  # spread over both enclaves
        assert ask(bed, app, "src", f"PUT k{i} {f'v{i}'.encode().hex()}").startswith("OK")
    digest = ask(bed, app, "src", "DIGEST")
    journals = bed.state("src") / "agent" / "migrations"
    before = set(journals.glob("*.json"))
    try:
        run = migrate_with(bed, app, agent, ANSWERED[1])
        assert run.returncode == -9, run.stderr
        assert "Traceback" not in run.stderr
    finally:
        bed.services["src"].stop()  # killed: the host's supervisor starts a fresh one
        bed.services["src"] = start_service(bed.state("src"), prefix=bed.host("src").command([]))
    try:
        back = source_answers(bed, app, digest, run.stderr) - fault_time(run.stderr)
        wait_until(lambda: bed.copies(app)["dst"] == [], 40, "the held tree to be discarded")
        (path,) = set(journals.glob("*.json")) - before
        wait_until(lambda: json.loads(path.read_text())["phase"] == "done", 30, "journal done")
        journal = json.loads(path.read_text())
        first, second = (bytes.fromhex(m) for m in journal["enclave_mids"])
        store = CounterStore(bed.state("src") / COUNTERS)
        # The first: no record, its frame asked again; the second: recorded once checked.
        assert store.decision(first) is None and journal["aborts"][0], journal
        held = store.decision(second)
        assert held is not None and held.kind == "abort", held
        again = recover(bed)
        assert again.returncode == EXIT_OK, again.stdout + again.stderr
        assert all(r["outcome"] != "in-doubt" for r in json.loads(again.stdout)), again.stdout
        figures["abort answered (first of two enclaves in a group) x kill -9 source platform "
                "service, then tool; the service restarted"] = {
            "outcome": "stayed, the held tree discarded (one ABORT asked again, one recorded)",
            "exit": run.returncode, "source_back_seconds": round(back, 3),
        }  # fmt: skip
        only_copy(bed, app, "src", digest)
    finally:
        end_copies(bed, app)
