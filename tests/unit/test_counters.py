"""Monotonic counters: they grow, persist, stay on their host and with their owner."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import cbor2
import pytest
from platform_fixtures import World, make_image

from migsgx.errors import CounterError, StateDirError
from migsgx.sgx import record_store as record_store_mod
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.platform import COUNTERS, EmulatedPlatform, LocalServices, counter_owner
from migsgx.sgx.store_types import COUNTER_MAX
from migsgx.sgx.structs import ReportBody

OWNER = b"S" + bytes(32) + b"\x01\x00"
OTHER = b"S" + bytes([1]) * 32 + b"\x01\x00"


@pytest.fixture
def store(tmp_path: Path) -> CounterStore:
    return CounterStore(tmp_path / "counters.cbor")


def test_create_read_increment(store: CounterStore) -> None:
    cid, value = store.create(OWNER, 5)
    assert value == 5 and store.read(OWNER, cid) == 5
    assert store.increment(OWNER, cid) == 6
    assert store.increment(OWNER, cid, 10) == 16
    assert store.read(OWNER, cid) == 16
    other_cid, _ = store.create(OWNER)
    assert other_cid != cid and store.read(OWNER, other_cid) == 0


def test_values_never_decrease(store: CounterStore) -> None:
    cid, _ = store.create(OWNER, 3)
    for by in (0, -1, -(1 << 70)):
        with pytest.raises(CounterError):
            store.increment(OWNER, cid, by)
    assert store.read(OWNER, cid) == 3
    with pytest.raises(CounterError):
        store.create(OWNER, -1)
    with pytest.raises(CounterError):
        store.create(OWNER, COUNTER_MAX + 1)


def test_overflow_refused(store: CounterStore) -> None:
    cid, _ = store.create(OWNER, COUNTER_MAX - 1)
    assert store.increment(OWNER, cid) == COUNTER_MAX
    with pytest.raises(CounterError):
        store.increment(OWNER, cid)
    assert store.read(OWNER, cid) == COUNTER_MAX


def test_owner_isolation(store: CounterStore) -> None:
    cid, _ = store.create(OWNER, 7)
    for op in (
        lambda: store.read(OTHER, cid),
        lambda: store.increment(OTHER, cid),
        lambda: store.destroy(OTHER, cid),
    ):
        with pytest.raises(CounterError) as err:
            op()
        # One answer for "absent" and "not yours": no probing of others' counters.
        with pytest.raises(CounterError) as absent:
            store.read(OTHER, "0" * 32)
        assert str(err.value).replace(cid, "X") == str(absent.value).replace("0" * 32, "X")
    assert store.read(OWNER, cid) == 7


def test_destroy(store: CounterStore) -> None:
    cid, _ = store.create(OWNER)
    store.destroy(OWNER, cid)
    with pytest.raises(CounterError):
        store.read(OWNER, cid)
    with pytest.raises(CounterError):
        store.destroy(OWNER, cid)


def test_persistent_and_private(tmp_path: Path) -> None:
    path = tmp_path / "counters.cbor"
    first = CounterStore(path)
    cid, _ = first.create(OWNER)
    first.increment(OWNER, cid, 41)
    assert path.stat().st_mode & 0o777 == 0o600
    assert CounterStore(path).read(OWNER, cid) == 41


def test_two_stores_on_one_file_do_not_lose_increments(tmp_path: Path) -> None:
    """As two platform processes would: each increment is read-modify-write under a lock."""

    path = tmp_path / "counters.cbor"
    stores = [CounterStore(path), CounterStore(path)]
    cid, _ = stores[0].create(OWNER)

    def bump(s: CounterStore) -> None:
        for _ in range(25):
            s.increment(OWNER, cid)

    threads = [threading.Thread(target=bump, args=(stores[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[1].read(OWNER, cid) == 100


def test_limit_per_owner(store: CounterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record_store_mod, "MAX_COUNTERS_PER_OWNER", 3)
    for _ in range(3):
        store.create(OWNER)
    with pytest.raises(CounterError):
        store.create(OWNER)
    store.create(OTHER)  # the limit is per owner


def test_corrupt_or_exposed_store(tmp_path: Path) -> None:
    path = tmp_path / "counters.cbor"
    store = CounterStore(path)
    path.write_bytes(b"\xff\x00garbage")
    with pytest.raises(CounterError):
        store.read(OWNER, "x")
    path.write_bytes(cbor2.dumps([1, 2]))
    with pytest.raises(CounterError):
        store.read(OWNER, "x")
    path.write_bytes(cbor2.dumps({"v": 1, "counters": {}}))
    path.chmod(0o644)
    with pytest.raises(StateDirError):
        store.read(OWNER, "x")


# --- through the platform ---------------------------------------------------------------
def _services(world: World, platform: EmulatedPlatform, **manifest: Any) -> LocalServices:
    return platform.services_for(platform.einit(make_image(world.author, **manifest))[0])


def test_counters_belong_to_signer_and_product(world: World) -> None:
    mine = _services(world, world.host_a)
    cid, _ = mine.counter_create(1)
    # Another enclave of the same author and product (an update, say) shares it ...
    update = _services(world, world.host_a, name="probe-update", svn=2)
    assert update.counter_increment(cid) == 2
    # ... another product or another author does not.
    for stranger in (
        _services(world, world.host_a, product_id=99),
        world.host_a.services_for(world.host_a.einit(make_image(world.other_author))[0]),
    ):
        with pytest.raises(CounterError):
            stranger.counter_read(cid)
        with pytest.raises(CounterError):
            stranger.counter_increment(cid)
        with pytest.raises(CounterError):
            stranger.counter_destroy(cid)
    assert mine.counter_read(cid) == 2


def test_counter_owner_ignores_mrenclave() -> None:
    a = ReportBody(bytes(32), bytes([1]) * 32, isv_prod_id=1)
    b = ReportBody(bytes([9]) * 32, bytes([1]) * 32, isv_prod_id=1)
    c = ReportBody(bytes(32), bytes([2]) * 32, isv_prod_id=1)
    assert counter_owner(a) == counter_owner(b) != counter_owner(c)


def test_counters_persist_across_a_reopened_platform(world: World, tmp_path: Path) -> None:
    state = tmp_path / "host"
    EmulatedPlatform.init(state, world.ca, host_id="c")
    svc = _services(world, EmulatedPlatform(state))
    cid, _ = svc.counter_create()
    svc.counter_increment(cid, 5)
    reopened = _services(world, EmulatedPlatform(state))
    assert reopened.counter_read(cid) == 5
    assert reopened.counter_increment(cid) == 6
    assert (state / COUNTERS).stat().st_mode & 0o777 == 0o600


def test_counters_are_per_host(world: World) -> None:
    on_a = _services(world, world.host_a)
    on_b = _services(world, world.host_b)
    cid, _ = on_a.counter_create(3)
    with pytest.raises(CounterError):
        on_b.counter_read(cid)
    with pytest.raises(CounterError):
        on_b.counter_increment(cid)
    assert on_a.counter_read(cid) == 3
