"""A restored tree that runs without its enclaves: the journal's record, and what recover says.

The checkpoint's journal keeps ``unattached`` (the continued tree, the enclaves
an attach failed to give it) with the phase ``restoring`` and the holders, so
that every ``migsgx recover --checkpoint`` says the same: ``in-doubt`` while the
tree and the enclaves live (the attach tried again), ``lost`` once either is
gone, never ``done`` (:mod:`migsgx.agent.ckpt_attach`).  Real processes stand
for the tree and the enclaves (a ``sleep``), dead ones for those that ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migsgx.agent.ckpt_journal import JOURNAL, read_journal, start_time
from migsgx.agent.ckpt_recover import resolve_checkpoint


def _journal(directory: Path, **fields: Any) -> None:
    path = directory / JOURNAL
    path.write_text(json.dumps({"phase": "restoring", **fields}))
    path.chmod(0o600)


@pytest.fixture
def live() -> Iterator[tuple[int, str]]:
    """A process that runs (pid, start time)."""

    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc.pid, start_time(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def dead() -> tuple[int, str]:
    """A process that ran and ended (its pid, its start time then)."""

    proc = subprocess.Popen(["sleep", "300"])
    start = start_time(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start


def _record(tree: tuple[int, str], enclave: tuple[int, str], **more: Any) -> dict[str, Any]:
    return {
        "holders": [[enclave[0], 7, enclave[1], "00" * 16]],
        "unattached": {"pid": tree[0], "start": tree[1], "enclaves": [0], "error": "refused"},
        **more,
    }


def test_the_tree_gone_is_lost_on_every_recover(tmp_path: Path, dead: tuple[int, str]) -> None:
    _journal(tmp_path, **_record(dead, dead))
    for _ in range(2):
        found = resolve_checkpoint(tmp_path, None)
        assert (found.decision, found.outcome) == ("commit", "lost"), found
        assert "is gone" in found.detail and "refused" in found.detail
    journal = read_journal(tmp_path)
    assert journal is not None and journal["phase"] == "restoring"
    assert journal["unattached"]["pid"] == dead[0]  # (kept: the next recover says it too)


def test_the_tree_runs_without_its_enclave_that_ended_is_lost(
    tmp_path: Path, live: tuple[int, str], dead: tuple[int, str]
) -> None:
    _journal(tmp_path, **_record(live, dead))
    for _ in range(2):
        found = resolve_checkpoint(tmp_path, None)
        assert found.outcome == "lost", found
        assert f"{live[0]} runs without" in found.detail and "ended" in found.detail


def test_live_enclaves_not_taken_back_stay_in_doubt(tmp_path: Path, live: tuple[int, str]) -> None:
    """The tree and the holder run, but the holder is no enclave runtime (it cannot be
    taken back): in doubt, the record kept, never ``done``."""

    _journal(tmp_path, **_record(live, live))
    for _ in range(2):
        found = resolve_checkpoint(tmp_path, None)
        assert found.outcome == "in-doubt" and found.in_doubt, found
        assert "cannot be taken back" in found.detail
    journal = read_journal(tmp_path)
    assert journal is not None and journal["unattached"]["pid"] == live[0]


def test_recover_exits_10_for_lost(tmp_path: Path, dead: tuple[int, str]) -> None:
    _journal(tmp_path, **_record(dead, dead))
    done = subprocess.run(
        [sys.executable, "-m", "migsgx", "recover", "--checkpoint", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 10, done.stderr
    assert "Traceback" not in done.stderr
    [found] = json.loads(done.stdout)
    assert found["outcome"] == "lost", found


def test_the_record_as_written_reads_back(tmp_path: Path, live: tuple[int, str]) -> None:
    from migsgx.agent.ckpt_attach import note_unattached, unattached_of

    _journal(tmp_path, holders=[[1, 2, "3", "00" * 16]], infos="")
    note_unattached(tmp_path, live[0], 1, "x" * 10_000)
    journal = read_journal(tmp_path)
    assert journal is not None and journal["phase"] == "restoring"
    assert journal["holders"] == [[1, 2, "3", "00" * 16]]  # (kept: the attach is retried)
    record = unattached_of(journal)
    assert record is not None and record["pid"] == live[0] and record["start"] == live[1]
    assert record["enclaves"] == [0] and len(record["error"]) < 1000


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12,
)  # fmt: skip
_RECORD = st.fixed_dictionaries(
    {},
    optional={
        "pid": _JSON | st.integers(0, 1 << 32), "start": _JSON, "error": _JSON,
        "enclaves": _JSON | st.lists(st.integers(-2, 70), max_size=70),
    },
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_JSON.filter(lambda v: v is not None) | _RECORD, holders=_JSON)
def test_a_garbage_record_is_never_done(record: object, holders: object) -> None:
    """Whatever the journal's ``unattached`` holds (damaged, forged), recover neither
    raises nor says ``done``: the application may run without its enclaves."""

    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        _journal(directory, holders=holders, unattached=record, infos="zz")
        found = resolve_checkpoint(directory, None)
        assert found.outcome in ("in-doubt", "lost"), found
        assert os.path.exists(directory / JOURNAL)
