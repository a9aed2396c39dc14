"""``migsgx recover --checkpoint``: the journal and the decisions that need no enclave.

The cells with enclaves, whose gates decide, run with real CRIU in
``tests/integration/test_checkpoint_faults.py`` (``test_recover_*``).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from migsgx.agent import ckpt_recover
from migsgx.agent.ckpt_journal import JOURNAL, read_journal, start_time, write_journal
from migsgx.agent.ckpt_recover import resolve_checkpoint
from migsgx.agent.holders import take_held


def test_the_journal_keeps_earlier_fields_and_names_its_tool(tmp_path: Path) -> None:
    write_journal(tmp_path, "writing", pid=123, start="456", enclaves=1)
    write_journal(tmp_path, "fenced")
    data = read_journal(tmp_path)
    assert data is not None
    assert data["phase"] == "fenced" and data["pid"] == 123 and data["enclaves"] == 1
    assert data["tool_pid"] == os.getpid() and data["tool_start"] == start_time(os.getpid())
    assert not (tmp_path / (JOURNAL + ".tmp")).exists()


def test_an_unknown_phase_is_refused_and_a_bad_journal_is_none(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_journal(tmp_path, "maybe")
    (tmp_path / JOURNAL).write_text(json.dumps({"phase": "maybe"}))
    assert read_journal(tmp_path) is None
    (tmp_path / JOURNAL).write_text("{not json")
    assert read_journal(tmp_path) is None


def test_an_empty_directory_holds_nothing_to_resolve(tmp_path: Path) -> None:
    found = resolve_checkpoint(tmp_path, None)
    assert (found.decision, found.outcome) == ("none", "done")


def test_a_checkpoint_whose_tool_runs_is_left_alone(tmp_path: Path) -> None:
    write_journal(tmp_path, "writing", pid=1, start="x", enclaves=1)
    data = json.loads((tmp_path / JOURNAL).read_text())
    data["tool_pid"] = os.getppid()  # a live process that is not this one
    data["tool_start"] = start_time(os.getppid())
    (tmp_path / JOURNAL).write_text(json.dumps(data))
    (tmp_path / "pages-1.img").write_bytes(b"x")
    found = resolve_checkpoint(tmp_path, None)
    assert found.outcome == "in-progress"
    assert (tmp_path / "pages-1.img").exists()


def test_no_metadata_means_no_commit_and_the_files_go(tmp_path: Path) -> None:
    """The tool died before CRIU's post-dump: nothing can have committed."""

    write_journal(tmp_path, "writing", pid=2**22 + 7, start="1", enclaves=1)
    data = json.loads((tmp_path / JOURNAL).read_text())
    data["tool_pid"] = 2**22 + 9  # gone
    (tmp_path / JOURNAL).write_text(json.dumps(data))
    (tmp_path / "enclave-0.state").write_bytes(b"sealed")
    for _ in range(2):  # idempotent
        found = resolve_checkpoint(tmp_path, None)
        assert (found.decision, found.outcome) == ("abort", "gone")
        assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL]
    assert read_journal(tmp_path) == {**data, "phase": "aborted", "tool_pid": os.getpid(),
                                      "tool_start": start_time(os.getpid()),
                                      "holders": []}  # fmt: skip


def test_enclave_gates_need_the_platform_socket(tmp_path: Path) -> None:
    (tmp_path / "migsgx.json").write_text(json.dumps({"enclaves": 1, "files": {}}))
    found = resolve_checkpoint(tmp_path, None)
    assert found.outcome == "in-doubt" and "platform-socket" in found.detail


def _journal(tmp_path: Path, **fields: object) -> dict[str, object]:
    write_journal(tmp_path, "fenced", pid=2**22 + 7, start="1", enclaves=1)
    data = json.loads((tmp_path / JOURNAL).read_text())
    data.update(tool_pid=2**22 + 9, **fields)  # the tool is gone
    (tmp_path / JOURNAL).write_text(json.dumps(data))
    return data


def test_a_live_guardian_is_waited_for_then_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guardian resolves the checkpoint itself; recover does not race it."""

    monkeypatch.setattr(ckpt_recover, "GUARDIAN_WAIT", 0.2)
    _journal(tmp_path, guardian=[os.getppid(), start_time(os.getppid())])
    (tmp_path / "pages-1.img").write_bytes(b"x")
    found = resolve_checkpoint(tmp_path, None)
    assert found.outcome == "in-progress" and "guardian" in found.detail
    assert (tmp_path / "pages-1.img").exists()


def test_held_descriptors_are_taken_only_from_the_recorded_process(tmp_path: Path) -> None:
    """A pid whose start time differs (reused) is never touched; nor is a malformed entry."""

    data = _journal(
        tmp_path,
        holders=[[os.getpid(), 0, "not-its-start"], ["x", 1, "y"], [os.getpid(), 0]],
    )
    assert take_held(data["holders"]) == {}


def test_a_forged_holder_that_is_no_enclave_is_never_touched(tmp_path: Path) -> None:
    """The journal is no order to root: a live process that is not an enclave is skipped."""

    a, b = socket.socketpair()
    with a, b:
        data = _journal(tmp_path, holders=[[os.getpid(), a.fileno(), start_time(os.getpid())]])
        assert take_held(data["holders"]) == {}


def test_a_guardian_that_saw_every_enclave_abort_needs_no_gate(tmp_path: Path) -> None:
    """``aborted``: the enclaves said so themselves; no platform socket, no probe."""

    (tmp_path / "migsgx.json").write_text(json.dumps({"enclaves": 1, "files": {}}))
    _journal(tmp_path, holders=[[2**22 + 11, 5, "1"]])
    found = resolve_checkpoint(tmp_path, None, aborted=True)
    assert (found.decision, found.outcome) == ("abort", "gone")
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL]
    data = read_journal(tmp_path)
    assert data is not None and data["phase"] == "aborted" and data["holders"] == []
