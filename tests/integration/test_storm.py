"""A short storm: eight migrations back and forth, each under a fault drawn from seed 33.

The fault matrix checks each named cell alone; here the faults follow each other
on the same hosts, with whatever the previous one left (restarted services and
agents, journals, guardians), as ``benchmarks/storm.py`` does for hundreds of
migrations.  Each migration is judged by :mod:`migsgx.lab.storm_checks`: exactly
one runnable copy after at most one ``migsgx recover`` per host (or none, where
the party killed held the only copy), every acknowledged write in it, an exit
status that tells the truth, no traceback, nothing left behind.
"""

from __future__ import annotations

import json
import sys

import pytest

from migsgx.lab.storm import Storm, as_json, summary
from migsgx.lab.storm_ckpt import CheckpointStorm
from migsgx.lab.testbed import Testbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 211
SEED = 33  # (its eight: both directions, most parties killed, a source enclave undecided)
COUNT = 8


def test_a_short_storm_keeps_one_copy_and_every_write(bed: Testbed) -> None:
    storm = Storm(bed, SEED, bound=60.0)  # (seconds back are figures here, not asserts)
    outcomes = []
    for index in range(COUNT):
        out = storm.one(index)
        sys.stdout.write(as_json(out) + "\n")
        outcomes.append(out)
    result = summary(outcomes)
    sys.stdout.write("storm-summary " + json.dumps(result, sort_keys=True) + "\n")
    storm.target.remove()
    assert not result["failures"], json.dumps(result["failures"], indent=1)
    assert any(o.reached for o in outcomes)  # the faults were reached, not only drawn
    # Where the tool rolled back, the steps from the fault to the source answering
    # again are measured, not guessed: the tool's own marks and the probe's answer.
    rolled_back = [o for o in outcomes if o.outcome == "stayed" and o.exit == 6]
    assert rolled_back  # (seed 33's index 7: the destination agent killed after the restore)
    for o in rolled_back:
        assert o.back_seconds is not None and o.write_back_seconds is not None, as_json(o)
        assert {"roll-back", "enclaves-aborted", "handed-back", "answer"} <= set(o.timeline)
        assert o.noticed.startswith("tool: "), as_json(o)


CKPT_SEED = 30  # (its three: a guardian killed after the commit, a restored tree killed
#               held, a restore killed before the activation)
CKPT_COUNT = 3


def test_a_short_checkpoint_storm_restores_once_with_every_write(bed: Testbed) -> None:
    """Checkpoint and restore rounds, each under a fault drawn from seed 30: one copy
    after at most one ``recover --checkpoint`` and one more restore, every write in it,
    a second restore refused."""

    storm = CheckpointStorm(bed, CKPT_SEED)
    outcomes = []
    for index in range(CKPT_COUNT):
        out = storm.one(index)
        sys.stdout.write(as_json(out) + "\n")
        outcomes.append(out)
    result = summary(outcomes)
    sys.stdout.write("storm-summary " + json.dumps(result, sort_keys=True) + "\n")
    assert not result["failures"], json.dumps(result["failures"], indent=1)
    assert all(o.reached for o in outcomes)
