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
from bed_helpers import end_copies, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
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

from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AgentProcess, Testbed

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
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], cell: str,
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
