"""A migration journal's ``holders`` and ``undo`` fields, whatever a local edit left there.

``migsgx recover`` takes descriptors from the processes ``holders`` names and
signals the pids an ``undo`` note names; :meth:`Journal.load` checks both
(types, ranges, the notes' known shapes) and a journal that fails is
``[record-damaged]``, naming the field (``recover`` reports it in doubt).
Their consumers stand on their own too: never an ``[internal]`` error.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migsgx import cli
from migsgx.agent import holders as holders_module
from migsgx.agent.ckpt_journal import start_time
from migsgx.agent.holders import take_held
from migsgx.agent.journal import Journal
from migsgx.agent.source_host import give_back
from migsgx.errors import RecordDamagedError

NO_PID = 2**22 + 7  # above pid_max's limit: never a live process
MID = bytes(range(16))
KINDS = ["criu", "netup", "thaw", "ungate", "runc", "podman", "containerd", "scratch"]

_scalars = (
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=8)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_ints = st.integers(-(2**80), 2**80) | st.sampled_from([0, 1, 2**31 - 1, 2**31, 1 << 63, 1 << 70])
_holder = st.one_of(
    st.lists(_ints | _scalars, max_size=5),
    st.tuples(_ints, _ints, st.text(max_size=6), st.text(max_size=8)).map(list),
    _json,
)
_note = st.one_of(
    st.text(max_size=24),
    st.tuples(st.sampled_from(KINDS), st.text(max_size=24)).map(" ".join),
    st.tuples(st.sampled_from(KINDS), _ints).map(lambda kv: f"{kv[0]} {kv[1]}"),
    _json,
)


def _pidlike(token: str) -> bool:
    """Whether ``int()`` reads ``token`` as a number that may be a live process."""

    try:
        return abs(int(token)) < 2**23
    except ValueError:
        return False


def _journal(directory: Path, **fields: Any) -> Journal:
    journal = Journal.start(directory / "agent", MID, ("10.0.0.2", 7070), NO_PID, "-")
    journal.update(tool_pid=NO_PID, phase="fenced")
    journal.path.write_text(json.dumps({**journal.data, **fields}))
    return journal


@settings(max_examples=150, deadline=None)
@given(holders=st.lists(_holder, max_size=3) | _json, undo=st.lists(_note, max_size=3) | _json)
def test_a_journal_loads_only_with_usable_holders_and_undo_notes(holders: Any, undo: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        journal = _journal(Path(tmp), holders=holders, undo=undo)
        try:
            loaded = Journal.load(journal.path)
        except RecordDamagedError as exc:
            assert "holders" in str(exc) or "undo" in str(exc), exc
            return
    for item in loaded.holders:
        assert isinstance(item, list) and len(item) in (0, 3, 4)
        if item:
            pid, fd = item[:2]
            assert type(pid) is int and 0 < pid < 2**31 and type(fd) is int and 0 <= fd < 2**31
            assert isinstance(item[2], str)
    for note in loaded.undo:
        kind, _, arg = note.partition(" ")
        assert kind in KINDS[:-1], note
        if kind == "criu":
            assert all(re.fullmatch(r"[0-9]+", p) and 0 < int(p) < 2**31 for p in arg.split())


@pytest.mark.parametrize(
    "field,value",
    [
        ("undo", ["criu ../../"]),
        ("undo", ["criu 99999999999999999999999"]),
        ("undo", ["thaw"]),
        ("undo", ["netup  "]),
        ("undo", ["scratch /x"]),
        ("holders", [[1, 1 << 70, "1", "00"]]),
        ("holders", [[0, 3, "1"]]),
        ("holders", [[True, 3, "1"]]),
        ("holders", [[1, 3, 7]]),
        ("holders", [[1, 3, "1", "not hex"]]),
        ("holders", [7]),
    ],
)
def test_the_damaged_field_is_named(tmp_path: Path, field: str, value: object) -> None:
    journal = _journal(tmp_path, **{field: value})
    with pytest.raises(RecordDamagedError, match=f"{field}"):
        Journal.load(journal.path)


_fds = st.integers(-(2**80), 2**80).filter(lambda fd: not 0 <= fd < 2**20) | st.sampled_from(
    [1 << 70, 2**31, 2**31 - 1, -1]
)


@settings(max_examples=60, deadline=None)
@given(fd=_fds)
def test_take_held_never_trips_on_a_descriptor_number(fd: int) -> None:
    """(As if this process were an enclave runtime: the entry reaches pidfd_getfd.)"""

    entry = [os.getpid(), fd, start_time(os.getpid())]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(holders_module, "is_enclave_runtime", lambda pid: True)
        taken = take_held([entry, [*entry, "00" * 16]])
    assert taken == {}


_tokens = st.text(max_size=12).filter(lambda t: not any(_pidlike(p) for p in t.split()))


@settings(max_examples=80, deadline=None)
@given(notes=st.lists(_tokens.map(lambda a: f"criu {a}"), max_size=3))
def test_give_back_never_trips_on_a_criu_note(notes: list[str]) -> None:
    """(The journal unchecked, as in memory: the consumer stands on its own.)"""

    data = {"undo": notes, "fenced": [], "app_pid": NO_PID, "app_name": "-"}
    give_back(Journal(Path("/nonexistent"), data))


@pytest.mark.parametrize(
    "field,value,phase,mids",
    [("undo", ["criu ../../"], "begun", []), ("holders", "own", "loaded", [MID.hex()])],
)
def test_recover_over_an_edited_journal_reports_it_not_an_internal_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    field: str, value: object, phase: str, mids: list[str],
) -> None:  # fmt: skip
    """(Before: the source given back tripped on ``int()`` of the note; the holder's
    descriptor number overflowed ``pidfd_getfd``'s argument: ``[internal]``, exit 1.)"""

    if value == "own":  # (this process as the enclave runtime: the entry reaches pidfd_getfd)
        monkeypatch.setattr(holders_module, "is_enclave_runtime", lambda pid: True)
        value = [[os.getpid(), 1 << 70, start_time(os.getpid()), "00" * 16]]
    journal = _journal(tmp_path, **{field: value}, enclave_mids=mids, phase=phase)
    with pytest.raises(SystemExit) as exited:
        cli.main(["recover", "--state", str(tmp_path), "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "[internal]" not in err, err
    assert exited.value.code == cli.EXIT_IN_DOUBT, err
    assert f"its {field} field" in out and journal.path.exists(), out
