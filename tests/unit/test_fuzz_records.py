"""Garbage fed to every durable record parser: only ``MigSGXError`` comes out, never a trip.

A crash, a full disk or a hostile local user can leave any of these files
truncated, bit-flipped, wrong-typed, oversized or nested without end: the tool's
migration journal (``migsgx recover``), the destination's ``held.json``, a
checkpoint's ``migsgx.json``, journal and restore record, the platform store's
decision records.  Each property starts from a record the code itself wrote and
damages it the ways those faults do; the parser must either accept it (and then
every accessor works) or raise a :class:`MigSGXError` with its stable code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from fuzz_damage import damaged_encoding, nested
from hypothesis import given, settings
from hypothesis import strategies as st

from migsgx.agent import ckpt_journal
from migsgx.agent.ckpt_recover import resolve_checkpoint
from migsgx.agent.ckpt_restore import load_metadata
from migsgx.agent.held import LOST, RECORD, HeldRecord, held_records, lost_detail
from migsgx.agent.journal import Journal, journal_dir
from migsgx.containers.oci import load_json
from migsgx.datapath.checkpoint import CheckpointIn
from migsgx.errors import CounterError, MigSGXError, RecordDamagedError
from migsgx.sgx.collateral import Collateral
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.pcs import PCS_STATE, PcsState
from migsgx.sgx.store_types import Decision, RecordUpdate

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True)
NO_PID = 2**22 + 7  # above pid_max's default: never a live process

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=24)
)
JSON_VALUES = nested(JSON_SCALARS, keys=st.text(max_size=8))


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def damaged(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """``valid`` as JSON, damaged the way a crash, a disk or a local user damages it."""

    return damaged_encoding(
        valid, _encode, JSON_VALUES, extra_keys=st.text(min_size=1, max_size=8),
        max_bytes=200, more={"deep": _deep, "huge": _huge},
    )  # fmt: skip


def _deep(draw: st.DrawFn, raw: bytes) -> bytes:
    """Nesting past json's recursion limit."""

    depth = draw(st.integers(2000, 200_000))
    return b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))


def _huge(draw: st.DrawFn, raw: bytes) -> bytes:
    """Bigger than any record."""

    return b" " * (1 << 20) + raw


def _only_migsgx_errors(parse: Callable[[], object]) -> object:
    try:
        return parse()
    except MigSGXError as exc:
        assert exc.code and str(exc)
        return exc


# --- the migration journal (``migsgx recover``) ---------------------------------------------------
_JOURNAL = {
    "mid": bytes(range(16)).hex(),
    "to": ["10.0.0.2", 7070],
    "tool_pid": NO_PID,
    "app_pid": NO_PID,
    "app_name": "app",
    "enclave_mids": [bytes(16).hex()],
    "fenced": [NO_PID],
    "phase": "committed",
    "guardian_pid": NO_PID,
    "undo": ["thaw /sys/fs/cgroup/x"],
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(raw=damaged(_JOURNAL))
def test_a_damaged_journal_is_refused_or_usable(scratch: Path, raw: bytes) -> None:
    path = journal_dir(scratch / "agent") / "j.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    path.chmod(0o600)  # (as the tool writes it: only its contents are damaged)
    try:
        journal = Journal.load(path)
    except RecordDamagedError as exc:
        assert exc.code == "record-damaged" and isinstance(exc, ValueError)
        assert Journal.all(scratch / "agent") == []  # skipped, not a trip
        return
    # Accepted: every accessor ``recover`` uses works.
    assert isinstance(journal.mid, bytes) and journal.phase in (
        "begun",
        "loaded",
        "fenced",
        "committed",
        "done",
        "aborted",
    )
    host, port = journal.to
    assert isinstance(host, str) and 0 <= port < 1 << 16
    assert all(isinstance(m, bytes) for m in journal.enclave_mids)
    assert all(isinstance(p, int) for p in journal.fenced)
    assert isinstance(journal.guardian_pid, int) and isinstance(journal.undo, list)


def test_the_journal_the_tool_writes_loads(tmp_path: Path) -> None:
    journal = Journal.start(tmp_path, bytes(16), ("10.0.0.2", 7070), NO_PID, "app")
    journal.update(
        enclave_mids=[bytes(16).hex()],
        fenced=[NO_PID],
        phase="fenced",
        undo=["thaw /sys/fs/cgroup/x"],
    )
    assert Journal.load(journal.path).data == journal.data


# --- the destination's held-tree record -----------------------------------------------------------
_HELD = {
    "session_id": bytes(16).hex(),
    "root": NO_PID,
    "start": 123,
    "driver": "pid",
    "peer": "10.0.0.1",
    "local": "10.0.0.2",
    "enclaves": [bytes(3).hex()],
    "arrivals": [bytes(16).hex(), ""],
    "handle": {"id": "kv", "bundle": "/s/agent/runc/kv", "netns": ""},
    "enclave_procs": [[7, 12345]],
    "answered": False,
    "restoring": False,
}


@FUZZ
@given(raw=damaged(_HELD))
def test_a_damaged_held_record_is_refused_or_usable(scratch: Path, raw: bytes) -> None:
    session = scratch / "work" / "s"
    session.mkdir(parents=True, exist_ok=True)
    (session / RECORD).write_bytes(raw)
    (session / RECORD).chmod(0o600)  # (as the agent writes it; anyone else's is not read)
    loaded = _only_migsgx_errors(lambda: HeldRecord.load(session / RECORD))
    [(where, record)] = held_records(scratch / "work")
    assert where == session
    if isinstance(loaded, MigSGXError):
        assert loaded.code == "record-damaged" and record is None
        return
    assert isinstance(loaded, HeldRecord) and record == loaded
    assert not loaded.still_held()
    assert all(isinstance(bytes.fromhex(i), bytes) for i in (*loaded.enclaves, *loaded.arrivals))
    assert all(isinstance(v, str) for v in loaded.handle.values())
    assert all(len(p) == 2 for p in loaded.enclave_procs)


@FUZZ
@given(raw=damaged({"detail": "the enclave died after it claimed its id"}))
def test_a_damaged_lost_note_still_says_lost(scratch: Path, raw: bytes) -> None:
    session_id = bytes(range(16))
    (scratch / "lost" / session_id.hex()).mkdir(parents=True, exist_ok=True)
    (scratch / "lost" / session_id.hex() / LOST).write_bytes(raw)
    assert isinstance(lost_detail(scratch / "lost", session_id), str)  # never None: it is there


def test_the_held_record_the_agent_writes_loads(tmp_path: Path) -> None:
    record = HeldRecord(**_HELD)
    record.write(tmp_path)
    assert HeldRecord.load(tmp_path / RECORD) == record


# --- a checkpoint directory: metadata, journal, restore record ------------------------------------
_PAGES = b"pages of the checkpointed process"
_META = {
    "format": 1,
    "enclaves": 0,
    "pid": NO_PID,
    "start": "123",
    "tcp_close": False,
    "files": {"pages-1.img": [len(_PAGES), hashlib.sha256(_PAGES).hexdigest()]},
}
_CKPT_JOURNAL = {
    "phase": "fenced",
    "tool_pid": NO_PID,
    "tool_start": "123",
    "guardian": [NO_PID, "123"],
    "enclaves": 1,
}


def _checkpoint(directory: Path, meta: bytes, journal: bytes | None = None) -> Path:
    (directory / "pages-1.img").write_bytes(_PAGES)
    (directory / ckpt_journal.CHECKPOINT_META).write_bytes(meta)
    if journal is not None:
        (directory / ckpt_journal.JOURNAL).write_bytes(journal)
    return directory


@FUZZ
@given(raw=damaged(_META))
def test_damaged_checkpoint_metadata_is_refused_before_anything_runs(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = _checkpoint(Path(name), raw)
        loaded = _only_migsgx_errors(lambda: load_metadata(directory))
        if isinstance(loaded, MigSGXError):
            assert loaded.code in ("record-damaged", "config", "checkpoint-damaged")
            return
        assert isinstance(loaded, tuple)
        _raw, meta, count = loaded
        assert isinstance(meta, dict) and 0 <= count <= ckpt_journal.MAX_CHECKPOINT_ENCLAVES


def test_intact_checkpoint_metadata_loads(tmp_path: Path) -> None:
    _checkpoint(tmp_path, _encode(_META))
    assert load_metadata(tmp_path)[1:] == (_META, 0)


@FUZZ
@given(meta=damaged(_META), journal=damaged(_CKPT_JOURNAL))
def test_recover_resolves_a_damaged_checkpoint_without_a_trip(meta: bytes, journal: bytes) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = _checkpoint(Path(name), meta, journal)
        result = _only_migsgx_errors(lambda: resolve_checkpoint(directory, None))
        assert not isinstance(result, MigSGXError) or result.code


@FUZZ
@given(held=damaged({"pid": NO_PID, "start": "123"}), journal=damaged(_CKPT_JOURNAL))
def test_damaged_checkpoint_journals_and_restore_records_are_hints(
    scratch: Path, held: bytes, journal: bytes
) -> None:
    directory = scratch / "ckpt"
    directory.mkdir(exist_ok=True)
    (directory / ckpt_journal.JOURNAL).write_bytes(journal)
    (directory / ckpt_journal.HELD).write_bytes(held)
    found = ckpt_journal.read_journal(directory)
    assert found is None or found["phase"] in ckpt_journal.PHASES
    ckpt_journal.remove_held_leftover(directory)  # never raises, whatever the record says


def test_an_intact_restore_record_is_done_with(tmp_path: Path) -> None:
    (tmp_path / ckpt_journal.HELD).write_text(json.dumps({"pid": NO_PID, "start": "123"}))
    ckpt_journal.remove_held_leftover(tmp_path)
    assert not (tmp_path / ckpt_journal.HELD).exists()


# --- the platform store's decision records --------------------------------------------------------
_MID = bytes(range(16))
CBOR_VALUES = st.recursive(
    JSON_SCALARS | st.binary(max_size=40) | st.integers(min_value=2**1030, max_value=2**1040),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _store_bytes(path: Path) -> bytes:
    store = CounterStore(path)
    store.decide(b"S" + bytes(34), Decision(_MID, "commit", b"token"))
    return path.read_bytes()


@st.composite
def damaged_store(draw: st.DrawFn, valid: bytes) -> bytes:
    data = cbor2.loads(valid)
    how = draw(st.sampled_from(["truncate", "flip", "entry", "field", "key", "top", "bytes"]))
    if how == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if how == "flip":
        raw = bytearray(valid)
        bit = draw(st.integers(0, len(raw) * 8 - 1))
        raw[bit // 8] ^= 1 << (bit % 8)
        return bytes(raw)
    if how == "entry":
        data["decisions"][_MID.hex()] = draw(CBOR_VALUES)
    elif how == "field":
        entry = data["decisions"][_MID.hex()]
        entry[draw(st.sampled_from(sorted(entry)))] = draw(CBOR_VALUES)
    elif how == "key":
        data["decisions"][draw(st.text(max_size=40))] = data["decisions"].pop(_MID.hex())
    elif how == "top":
        data[draw(st.sampled_from(sorted(data)))] = draw(CBOR_VALUES)
    else:
        return draw(st.binary(max_size=200))
    return bytes(cbor2.dumps(data))


_VALID_STORE = _store_bytes(Path(tempfile.mkdtemp()) / "counters.cbor")


@FUZZ
@given(raw=damaged_store(_VALID_STORE))
def test_damaged_decision_records_raise_counter_errors(scratch: Path, raw: bytes) -> None:
    path = scratch / "store" / "counters.cbor"
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(raw)
    store = CounterStore(path)
    for read in (store.decisions, lambda: store.decision(_MID)):
        try:
            read()
        except CounterError as exc:
            assert exc.code == "counter"
    try:
        store.decide(b"S" + bytes(34), Decision(bytes(16), "abort", b""))
    except CounterError as exc:
        assert exc.code in ("counter", "store-full", "record-conflict")


# --- the platform store as a whole: any entry of any section damaged ------------------------------
_OWNER = b"S" + bytes(34)


def _full_store(path: Path) -> tuple[bytes, str]:
    store = CounterStore(path)
    cid, _ = store.create(_OWNER, 1)
    store.record_update(_OWNER, "db", RecordUpdate(b"r", {}, {}, (), {}))
    store.decide(_OWNER, Decision(_MID, "commit", b"token"))
    store.claim(_OWNER, bytes(range(1, 17)))
    return path.read_bytes(), cid


_FULL_STORE, _CID = _full_store(Path(tempfile.mkdtemp()) / "counters.cbor")


def _entry_paths(value: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _entry_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _entry_paths(item, (*prefix, i))
    return found


@st.composite
def store_with_one_bad_entry(draw: st.DrawFn) -> bytes:
    data = cbor2.loads(_FULL_STORE)
    where = draw(st.sampled_from(_entry_paths(data)))
    value = draw(CBOR_VALUES)
    if not where:
        return bytes(cbor2.dumps(value))
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    return bytes(cbor2.dumps(data))


@FUZZ
@given(raw=store_with_one_bad_entry())
def test_every_store_operation_refuses_a_damaged_entry_with_counter_errors(
    scratch: Path, raw: bytes
) -> None:
    path = scratch / "full" / "counters.cbor"
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(raw)
    store = CounterStore(path)
    operations: list[Callable[[], object]] = [
        lambda: store.create(_OWNER, 0),
        lambda: store.read(_OWNER, _CID),
        lambda: store.increment(_OWNER, _CID),
        lambda: store.record_read(_OWNER, "db"),
        store.records,
        lambda: store.record_update(_OWNER, "db", RecordUpdate(b"q", {}, {}, (), {})),
        lambda: store.decide(_OWNER, Decision(bytes([1] * 16), "abort", b"")),
        store.decisions,
        lambda: store.claim(_OWNER, bytes([2] * 16)),
        lambda: store.claimed_by_any(bytes(range(1, 17))),
        lambda: store.destroy(_OWNER, _CID),
    ]
    for operation in operations:
        _only_migsgx_errors(operation)


# --- a checkpoint's per-enclave files, a container's configuration, CA state ----------------------
@FUZZ
@given(
    meta=damaged({"chunk_bytes": 65536, "enclave": 0}),
    image=st.one_of(st.binary(max_size=64), CBOR_VALUES.map(cbor2.dumps)),
)
def test_a_damaged_per_enclave_checkpoint_file_is_refused(meta: bytes, image: bytes) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        (directory / "enclave-0.json").write_bytes(meta)
        (directory / "enclave-0.image").write_bytes(image)
        (directory / "enclave-0.key").write_bytes(b"k" * 60)
        (directory / "enclave-0.state").write_bytes(b"")
        enclave = CheckpointIn(directory, 0, directory / "no-platform.sock", b"m" * 32)
        _only_migsgx_errors(enclave.load)


@FUZZ
@given(raw=damaged({"ociVersion": "1.0.2", "process": {"args": ["/bin/app"]}}))
def test_a_damaged_container_configuration_is_a_protocol_error(scratch: Path, raw: bytes) -> None:
    path = scratch / "config.json"
    path.write_bytes(raw)
    _only_migsgx_errors(lambda: load_json(path, "container configuration"))


@FUZZ
@given(raw=damaged({"version": 1, "tcb_info": "{}", "signature": "00"}))
def test_damaged_collateral_is_a_collateral_error(raw: bytes) -> None:
    _only_migsgx_errors(lambda: Collateral.from_json(raw))


@FUZZ
@given(
    raw=damaged(
        {"fmspc": "00" * 6, "levels": {"3": "UpToDate"}, "hosts": {}, "evaluation": 1,
         "crl_number": 1}
    )
)  # fmt: skip
def test_a_damaged_ca_state_is_a_state_dir_error(scratch: Path, raw: bytes) -> None:
    (scratch / PCS_STATE).write_bytes(raw)
    _only_migsgx_errors(lambda: PcsState.load(scratch))
