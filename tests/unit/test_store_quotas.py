"""The platform's stores are bounded per owner and per host, and never evict.

One owner (a self-signed enclave's MRSIGNER + product id) fills every store it
can reach; each refuses with ``StoreFullError`` and changes nothing, and other
owners go on as before.  The real stores, at their real limits, on disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from migsgx.errors import CounterError, RecordConflictError, StoreFullError
from migsgx.sgx import claims as claims_mod
from migsgx.sgx import record_store as record_store_mod
from migsgx.sgx.claims import MAX_CLAIMS_PER_OWNER, ClaimStore
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.record_store import (
    MAX_COUNTERS_PER_OWNER,
    MAX_RECORD_BYTES,
    MAX_RECORD_BYTES_PER_OWNER,
)
from migsgx.sgx.store_types import RecordUpdate

GREEDY = b"S" + bytes([9]) * 32 + b"\x01\x00"
VICTIM = b"S" + bytes([1]) * 32 + b"\x01\x00"


@pytest.fixture
def store(tmp_path: Path) -> CounterStore:
    return CounterStore(tmp_path / "counters.cbor")


def test_one_owner_fills_the_counters_and_others_are_unaffected(store: CounterStore) -> None:
    mine, _ = store.create(VICTIM, 3)
    for _ in range(MAX_COUNTERS_PER_OWNER):
        store.create(GREEDY)
    with pytest.raises(StoreFullError):
        store.create(GREEDY)
    with pytest.raises(StoreFullError):
        store.record_update(GREEDY, "r", RecordUpdate(b"x", create={"a" * 32: 0}))
    assert store.increment(VICTIM, mine) == 4
    store.create(VICTIM)


def test_one_owner_fills_its_record_quota_and_others_are_unaffected(store: CounterStore) -> None:
    blob = b"r" * MAX_RECORD_BYTES
    n = MAX_RECORD_BYTES_PER_OWNER // MAX_RECORD_BYTES
    for i in range(n):
        store.record_update(GREEDY, f"r{i}", RecordUpdate(blob, expect_absent=True))
    size = (Path(store._path)).stat().st_size
    with pytest.raises(StoreFullError):
        store.record_update(GREEDY, "one-more", RecordUpdate(b"x", expect_absent=True))
    assert store._path.stat().st_size == size
    store.record_update(VICTIM, "r0", RecordUpdate(blob, expect_absent=True))
    assert store.record_read(VICTIM, "r0") == blob


def test_the_host_wide_cap_holds_however_many_owners(
    store: CounterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record_store_mod, "MAX_COUNTERS_TOTAL", 4)
    for i in range(4):
        store.create(b"S" + bytes([i]) * 32 + b"\x02\x00")
    with pytest.raises(StoreFullError):
        store.create(VICTIM)


def test_migration_claims_are_bounded_per_owner_without_eviction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MAX_CLAIMS_PER_OWNER >= 1024
    monkeypatch.setattr(claims_mod, "MAX_CLAIMS_PER_OWNER", 8)
    claims = ClaimStore(tmp_path / "migrations.cbor")
    for i in range(8):
        assert claims.claim(GREEDY, i.to_bytes(16, "big"))
    with pytest.raises(StoreFullError):
        claims.claim(GREEDY, b"\xff" * 16)
    # Nothing was evicted: every id stays claimed, so no COMMIT token replays.
    assert all(claims.claimed(GREEDY, i.to_bytes(16, "big")) for i in range(8))
    assert not claims.claim(GREEDY, (0).to_bytes(16, "big"))
    assert claims.claim(VICTIM, b"\xff" * 16)
    with pytest.raises(CounterError):
        claims.claim(VICTIM, b"x" * 65)


def test_claims_in_the_counter_store_share_the_bound_and_evict_nothing(
    store: CounterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claims_mod, "MAX_CLAIMS_PER_OWNER", 8)
    for i in range(8):
        assert store.claim(GREEDY, i.to_bytes(16, "big"))
    size = store._path.stat().st_size
    with pytest.raises(StoreFullError):
        store.claim(GREEDY, b"\xff" * 16)
    assert store._path.stat().st_size == size  # refused: nothing written
    assert all(store.claimed(GREEDY, i.to_bytes(16, "big")) for i in range(8))
    assert not store.claim(GREEDY, (0).to_bytes(16, "big"))
    assert store.claim(VICTIM, b"\xff" * 16)


def test_an_owner_cannot_blindly_overwrite_or_delete_a_record(store: CounterStore) -> None:
    """Compare-and-set: an update names the record it replaces (or its absence)."""

    store.record_update(VICTIM, "state", RecordUpdate(b"v1", expect_absent=True))
    for update in (
        RecordUpdate(b"forged"),  # claims there is none
        RecordUpdate(b"forged", expect=bytes(32)),  # replaces something else
        RecordUpdate(None),  # a blind delete
        RecordUpdate(b"forged", expect_absent=True),
    ):
        with pytest.raises(CounterError) as err:
            store.record_update(VICTIM, "state", update)
        assert isinstance(err.value, RecordConflictError) or "exists" in str(err.value)
        assert store.record_read(VICTIM, "state") == b"v1"
    store.record_update(VICTIM, "state", RecordUpdate(b"v2", expect=hashlib.sha256(b"v1").digest()))
    assert store.record_read(VICTIM, "state") == b"v2"
