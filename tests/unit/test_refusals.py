"""A destination host refuses a migration id for good: then no claim of it ever succeeds.

The claim store's refusal (``docs/spec/commit.md``, section 2.2) is what lets a
committed source run again: it must exclude a claim of the same id whatever
the order, the owner, a restart of the store, or two writers racing.  The
real store, on disk.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migsgx.errors import ClaimedBeforeError, CounterError, MigrationRefusedError, StoreFullError
from migsgx.sgx import claims as claims_mod
from migsgx.sgx.claims import ClaimStore
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.record_store import LEGACY_CLAIMS
from migsgx.sgx.store_types import RecordUpdate

OWNER = b"S" + bytes(32) + b"\x01\x00"
OTHER = b"S" + bytes([1]) * 32 + b"\x01\x00"
MID = bytes(range(16))


@pytest.fixture
def store(tmp_path: Path) -> CounterStore:
    return CounterStore(tmp_path / "counters.cbor")


def test_a_refused_id_is_never_claimed_by_any_owner_even_after_a_restart(
    store: CounterStore, tmp_path: Path
) -> None:
    assert store.refuse(OWNER, MID) is True
    assert store.refused(MID)
    assert store.claim(OWNER, MID) is False
    assert store.claim(OTHER, MID) is False
    with pytest.raises(MigrationRefusedError):
        store.record_transaction(OWNER, [], claim=MID)
    again = CounterStore(tmp_path / "counters.cbor")
    assert again.refused(MID)
    assert again.claim(OWNER, MID) is False
    assert not again.claimed(OWNER, MID) and not again.claimed_by_any(MID)


def test_a_claim_with_an_install_changes_nothing_when_the_id_was_refused(
    store: CounterStore,
) -> None:
    store.refuse(OTHER, MID)
    install = RecordUpdate(b"state", create={"a" * 32: 7}, expect_absent=True)
    with pytest.raises(MigrationRefusedError):
        store.record_transaction(OWNER, [("app", install)], claim=MID)
    assert store.record_read(OWNER, "app") is None
    with pytest.raises(CounterError):
        store.read(OWNER, "a" * 32)


def test_a_claimed_id_cannot_be_refused_and_stays_claimed(store: CounterStore) -> None:
    assert store.claim(OWNER, MID)
    with pytest.raises(ClaimedBeforeError) as caught:
        store.refuse(OWNER, MID)
    assert not isinstance(caught.value, MigrationRefusedError)
    with pytest.raises(ClaimedBeforeError):
        store.refuse(OTHER, MID)  # (another owner's claim binds as well)
    assert not store.refused(MID) and store.claimed(OWNER, MID)


def test_a_claim_of_the_former_claim_store_also_forbids_the_refusal(
    store: CounterStore, tmp_path: Path
) -> None:
    assert ClaimStore(tmp_path / LEGACY_CLAIMS).claim(OWNER, MID)
    with pytest.raises(ClaimedBeforeError):
        store.refuse(OWNER, MID)
    assert not store.refused(MID)


def test_refusing_twice_is_one_refusal(store: CounterStore) -> None:
    assert store.refuse(OWNER, MID) is True
    assert store.refuse(OWNER, MID) is False
    assert store.refuse(OTHER, MID) is False


def test_a_refusal_takes_a_sixteen_byte_id(store: CounterStore) -> None:
    for bad in (b"", b"x" * 15, b"x" * 17):
        with pytest.raises(CounterError):
            store.refuse(OWNER, bad)


def test_refusals_count_against_the_claim_quotas(
    store: CounterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claims_mod, "MAX_CLAIMS_PER_OWNER", 3)
    store.refuse(OWNER, bytes([1]) * 16)
    store.refuse(OWNER, bytes([2]) * 16)
    store.claim(OWNER, bytes([3]) * 16)
    with pytest.raises(StoreFullError):
        store.refuse(OWNER, bytes([4]) * 16)
    with pytest.raises(StoreFullError):
        store.record_transaction(OWNER, [], claim=bytes([5]) * 16)
    assert not store.refused(bytes([4]) * 16)
    assert store.refuse(OTHER, bytes([4]) * 16)  # (another owner's quota is its own)


def test_a_damaged_refusal_entry_makes_the_store_unreadable(store: CounterStore) -> None:
    data = cbor2.loads(store._path.read_bytes())
    data["refusals"] = {"zz": {"owner": OWNER}}
    store._path.write_bytes(cbor2.dumps(data))
    with pytest.raises(CounterError):
        store.claim(OWNER, MID)


def _race(path: Path, mid: bytes) -> dict[str, bool]:
    """A claim and a refusal of ``mid`` from two store instances (two writers) at once."""

    a, b = CounterStore(path), CounterStore(path)
    results: dict[str, bool] = {}
    start = threading.Barrier(2)

    def claim() -> None:
        start.wait()
        results["claim"] = a.claim(OWNER, mid)

    def refuse() -> None:
        start.wait()
        try:
            results["refuse"] = b.refuse(OTHER, mid)
        except ClaimedBeforeError:
            results["refuse"] = False

    threads = [threading.Thread(target=claim), threading.Thread(target=refuse)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_a_claim_and_a_refusal_racing_from_two_writers_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "counters.cbor"
    for n in range(20):
        mid = bytes([n]) * 16
        results = _race(path, mid)
        assert results["claim"] != results["refuse"]
        store = CounterStore(path)
        assert store.claimed_by_any(mid) == results["claim"]
        assert store.refused(mid) == results["refuse"]


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["claim", "refuse", "reopen"]),
        st.sampled_from([OWNER, OTHER]),
        st.sampled_from([bytes([1]) * 16, bytes([2]) * 16]),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_any_interleaving_leaves_each_id_claimed_or_refused_never_both(
    ops: list[tuple[str, bytes, bytes]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "counters.cbor"
        store = CounterStore(path)
        claimed: set[bytes] = set()
        refused: set[bytes] = set()
        for op, owner, mid in ops:
            if op == "reopen":
                store = CounterStore(path)
            elif op == "claim":
                won = store.claim(owner, mid)
                # (a model: the first claim of (owner, mid) wins unless the id was refused)
                assert won == (mid not in refused and (owner, mid) not in claimed_by(claimed))
                if won:
                    claimed.add(owner + mid)
            else:
                if any(c.endswith(mid) for c in claimed):
                    with pytest.raises(ClaimedBeforeError):
                        store.refuse(owner, mid)
                else:
                    assert store.refuse(owner, mid) == (mid not in refused)
                    refused.add(mid)
        for mid in (bytes([1]) * 16, bytes([2]) * 16):
            assert not (store.claimed_by_any(mid) and store.refused(mid))
            assert store.refused(mid) == (mid in refused)
            assert store.claimed_by_any(mid) == any(c.endswith(mid) for c in claimed)


def claimed_by(claimed: set[bytes]) -> set[tuple[bytes, bytes]]:
    return {(c[:-16], c[-16:]) for c in claimed}
