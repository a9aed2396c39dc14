"""Persistent enclave state in memory: the record, migratable sealing and counters, the
freeze, and whole migrations and checkpoints between enclave instances on emulated hosts.

The enclaves here are ``EnclaveInstance`` objects driven by the real ``Migrator`` (the
trusted half of a migration) over an in-process ring; enclave code is played by the
test calling the enclave's context directly.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from platform_fixtures import World, make_image

from migsgx.core.stream import TAG_SIZE
from migsgx.datapath.ring import ShmRing
from migsgx.enclave.instance import EnclaveInstance
from migsgx.enclave.migrator import Migrator
from migsgx.enclave.persistent_format import RESERVED
from migsgx.enclave.sdk import EnclaveContext
from migsgx.enclave.sealing import seal_with_msk
from migsgx.errors import (
    AwaitingDecisionError,
    CounterError,
    EnclaveBusyError,
    FrozenError,
    MigrationError,
    PersistentStateError,
    ProtocolError,
    ReplayError,
    RollbackError,
    SealError,
    error_from_wire,
)
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.platform import EmulatedPlatform, counter_owner
from migsgx.sgx.store_types import COUNTER_MAX, RecordUpdate

CHUNK = 64 << 10
OWNER = b"S" + bytes(32) + b"\x01\x00"
SECRET = b"the launch codes"


@pytest.fixture
def name() -> str:
    """A record name of its own for each test: the hosts are shared by the session."""

    return f"t-{uuid.uuid4().hex[:12]}"


_IMAGES: dict[tuple[tuple[str, Any], ...], Any] = {}


def _instance(
    world: World, host: EmulatedPlatform | None = None, **manifest: Any
) -> EnclaveInstance:
    key = tuple(sorted(manifest.items()))
    if key not in _IMAGES:
        _IMAGES[key] = make_image(world.author, **manifest)
    image = _IMAGES[key]
    platform = host or world.host_a
    identity, _ = platform.einit(image)
    return EnclaveInstance(image, platform.services_for(identity))


def _ctx(inst: EnclaveInstance) -> EnclaveContext:
    return inst.context


# --- an in-memory migration ---------------------------------------------------------------
_MIGRATORS: dict[EnclaveInstance, Migrator] = {}


def migrator_of(inst: EnclaveInstance) -> Migrator:
    """One migrator per enclave for its whole life, as in the enclave process."""

    if inst not in _MIGRATORS:
        _MIGRATORS[inst] = Migrator(inst)
    return _MIGRATORS[inst]


class Move:
    """The real trusted halves of a migration, back to back in this process."""

    def __init__(self, source: EnclaveInstance, destination: EnclaveInstance) -> None:
        self.source, self.destination = source, destination
        self.out, self.into = migrator_of(source), migrator_of(destination)
        self.loaded = b""

    def handshake(self) -> None:
        message = self.out.out_start()
        self.into.in_start()
        while True:
            reply = self.into.hs(message)
            if self.out.keys is not None and self.into.keys is not None:
                return
            message = self.out.hs(reply["send"])["send"]

    def transfer(self) -> None:
        """Everything up to a verified LOADED at the source; nothing is given up."""

        self.handshake()
        producer, consumer = ShmRing.pair(3, CHUNK + TAG_SIZE)
        self.out.ring, self.into.ring = producer, consumer
        errors: list[BaseException] = []

        def dump() -> None:
            try:
                self.out.dump(CHUNK)
            except BaseException as exc:
                errors.append(exc)
                producer.close()

        thread = threading.Thread(target=dump, daemon=True)
        thread.start()
        try:
            self.loaded = self.into.load()["loaded"]
        finally:
            thread.join(30)
        if errors:
            raise errors[0]
        self.out.loaded(self.loaded)

    def commit(self) -> None:
        token = self.out.commit()
        self.into.commit_in(token)

    def abort(self) -> None:
        frame = self.out.abort("the test gives up")
        if self.into.dest_commit is not None and self.into.dest_commit.loaded_frame:
            # After LOADED only the source's authenticated ABORT ends the destination.
            with pytest.raises(MigrationError, match="source aborted"):
                self.into.commit_in(frame)
        else:
            self.into.abort("the test gives up")


def migrate(source: EnclaveInstance, host: EmulatedPlatform, world: World) -> EnclaveInstance:
    destination = _instance(world, host)
    move = Move(source, destination)
    move.transfer()
    move.commit()
    return destination


def open_fresh(world: World, host: EmulatedPlatform, name: str) -> EnclaveContext:
    ctx = _ctx(_instance(world, host))
    ctx.open_persistent(name)
    return ctx


# --- the platform's record store ----------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> CounterStore:
    return CounterStore(tmp_path / "counters.cbor")


def test_record_update_is_all_or_nothing(store: CounterStore) -> None:
    epoch, other = "a" * 32, "b" * 32
    store.record_update(OWNER, "r", RecordUpdate(b"one", create={epoch: 1}, expect_absent=True))
    assert store.record_read(OWNER, "r") == b"one" and store.read(OWNER, epoch) == 1
    failing = [
        RecordUpdate(b"two", create={other: 0}, advance={epoch: 2}, check={epoch: 5}),
        RecordUpdate(b"two", create={other: 0}, advance={epoch: 1}),  # does not grow
        RecordUpdate(b"two", create={epoch: 0}),  # exists already
        RecordUpdate(b"two", create={"not-hex": 0}),
        RecordUpdate(b"two", create={other: 0}, destroy=("c" * 32,)),  # no such counter
        RecordUpdate(b"two", create={other: 0}, expect_absent=True),
        RecordUpdate(b"two", advance={epoch: 2}, destroy=(epoch,)),  # one counter twice
        RecordUpdate(b"x" * (300 << 10)),
        # No compare-and-set: a blind overwrite, an outdated one, a blind delete.
        RecordUpdate(b"two", advance={epoch: 2}, check={epoch: 1}),
        RecordUpdate(b"two", advance={epoch: 2}, check={epoch: 1}, expect=bytes(32)),
        RecordUpdate(None, destroy=(epoch,), check={epoch: 1}),
    ]
    for update in failing:
        with pytest.raises(CounterError):
            store.record_update(OWNER, "r", update)
        assert store.record_read(OWNER, "r") == b"one"
        assert store.read(OWNER, epoch) == 1
        with pytest.raises(CounterError):
            store.read(OWNER, other)
    one, two = hashlib.sha256(b"one").digest(), hashlib.sha256(b"two").digest()
    store.record_update(
        OWNER, "r",
        RecordUpdate(b"two", create={other: 0}, advance={epoch: 2}, check={epoch: 1}, expect=one),
    )  # fmt: skip
    assert store.record_read(OWNER, "r") == b"two" and store.read(OWNER, epoch) == 2
    store.record_update(
        OWNER, "r", RecordUpdate(None, destroy=(epoch, other), check={epoch: 2}, expect=two)
    )
    assert store.record_read(OWNER, "r") is None
    with pytest.raises(CounterError):
        store.read(OWNER, epoch)


def test_records_belong_to_their_owner_and_name(store: CounterStore) -> None:
    other_owner = b"S" + bytes([1]) * 32 + b"\x01\x00"
    store.record_update(OWNER, "r", RecordUpdate(b"mine", create={"a" * 32: 1}))
    assert store.record_read(other_owner, "r") is None
    assert store.record_read(OWNER, "s") is None
    with pytest.raises(CounterError):  # not its counter
        store.record_update(other_owner, "r", RecordUpdate(b"x", advance={"a" * 32: 5}))
    for bad in ("", "a/b", "x" * 65, "ü"):
        with pytest.raises(CounterError):
            store.record_read(OWNER, bad)
    # Survives a reopened store; an old file without records still loads.
    assert CounterStore(store._path).record_read(OWNER, "r") == b"mine"
    old = store._path.with_name("old.cbor")
    old.write_bytes(cbor2.dumps({"v": 1, "counters": {}}))
    old.chmod(0o600)
    assert CounterStore(old).record_read(OWNER, "r") is None


def test_record_update_crosses_the_platform_channel_as_plain_data() -> None:
    update = RecordUpdate(b"r", create={"a" * 32: 1}, advance={"b" * 32: 3}, destroy=("c" * 32,),
                          check={"b" * 32: 2}, expect_absent=True)  # fmt: skip
    wire = cbor2.loads(cbor2.dumps(update.to_wire()))
    assert RecordUpdate.from_wire(wire) == update
    for broken in ({**wire, "create": {"a": True}}, {**wire, "destroy": [1]},
                   {**wire, "record": "text"}, {**wire, "check": []}):  # fmt: skip
        with pytest.raises(CounterError):
            RecordUpdate.from_wire(broken)


# --- the record --------------------------------------------------------------------------------
def test_open_creates_then_a_restart_reopens(world: World, name: str) -> None:
    first = _ctx(_instance(world))
    assert first.open_persistent(name) is True
    blob = first.seal_migratable(SECRET, aad=b"k")
    first.mcounter_create("c", 7)
    assert first.mcounter_increment("c") == 8
    with pytest.raises(PersistentStateError):
        first.open_persistent(name)  # once per enclave

    restarted = _ctx(_instance(world))  # the same enclave, started again on the same host
    assert restarted.open_persistent(name) is False
    assert restarted.unseal_migratable(blob, aad=b"k") == SECRET
    assert restarted.mcounter_read("c") == 8
    assert restarted.mcounter_names() == ["c"]
    # Opening took the record over: the first instance can no longer use it.
    for op in (
        lambda: first.seal_migratable(b"x"),
        lambda: first.unseal_migratable(blob, aad=b"k"),
        lambda: first.mcounter_read("c"),
        lambda: first.mcounter_increment("c"),
        lambda: first.mcounter_create("d"),
    ):
        with pytest.raises(PersistentStateError):
            op()
    assert restarted.mcounter_increment("c") == 9


def test_nothing_works_before_open(world: World) -> None:
    ctx = _ctx(_instance(world))
    for op in (
        lambda: ctx.seal_migratable(b"x"),
        lambda: ctx.mcounter_create("c"),
        lambda: ctx.mcounter_read("c"),
    ):
        with pytest.raises(PersistentStateError):
            op()
    with pytest.raises(ValueError):
        ctx.open_persistent("no spaces")


def test_record_opens_only_for_its_enclave_on_its_host(world: World, name: str) -> None:
    owner = _ctx(_instance(world))
    owner.open_persistent(name)
    record = world.host_a.services_for(owner.identity).persist_read(name)
    assert record is not None and owner.persistent._keys[0] not in record  # sealed
    # Another build of the same author and product finds the record and cannot open it.
    update = _ctx(_instance(world, name="probe-update", svn=2))
    with pytest.raises(PersistentStateError):
        update.open_persistent(name)
    # The record copied to another host (by its administrator) does not open there.
    on_b = world.host_b.services_for(world.identity(_IMAGES[()], world.host_b))
    on_b.persist_update(name, RecordUpdate(record, expect_absent=True))
    with pytest.raises(PersistentStateError):
        open_fresh(world, world.host_b, name)
    owner.mcounter_create("still-mine")  # the owner is not disturbed


def test_rolled_back_record_is_refused(world: World, name: str) -> None:
    ctx = _ctx(_instance(world))
    ctx.open_persistent(name)
    svc = world.host_a.services_for(ctx.identity)
    old = svc.persist_read(name)
    assert old is not None
    ctx.mcounter_create("c")  # a new record, the epoch advances
    # The host's administrator puts the old record back (the counters stay as they are).
    current = svc.persist_read(name)
    assert current is not None
    world.host_a.counters.record_update(
        counter_owner(ctx.identity), name,
        RecordUpdate(old, expect=hashlib.sha256(current).digest()),
    )  # fmt: skip
    with pytest.raises(RollbackError):
        open_fresh(world, world.host_a, name)


# --- migratable sealing and counters ----------------------------------------------------
def test_migratable_sealing(world: World, name: str) -> None:
    ctx = open_fresh(world, world.host_a, name)
    blob = ctx.seal_migratable(SECRET, aad=b"alice")
    assert SECRET not in blob and ctx.sealed_binding(blob) is None
    assert ctx.unseal_migratable(blob) == SECRET
    assert ctx.unseal_migratable(blob, aad=b"alice") == SECRET
    with pytest.raises(SealError):
        ctx.unseal_migratable(blob, aad=b"bob")
    for at in (10, 30, 60, 80, len(blob) - 1):
        bad = bytearray(blob)
        bad[at] ^= 1
        with pytest.raises(SealError):
            ctx.unseal_migratable(bytes(bad))
    with pytest.raises(SealError):
        ctx.unseal_migratable(blob[:50])
    # Another persistent state (another enclave instance's record) does not open it,
    # nor does a blob made with another key under this record's id.
    stranger = open_fresh(world, world.host_a, name + "-x")
    with pytest.raises(SealError):
        stranger.unseal_migratable(blob)
    forged = seal_with_msk(bytes(32), blob[8:24], SECRET)
    with pytest.raises(SealError):
        ctx.unseal_migratable(forged)
    # Platform sealing still works beside it, and stays bound to the host.
    assert ctx.unseal(ctx.seal(SECRET)) == SECRET


def test_counter_bound_blobs_detect_rollback(world: World, name: str) -> None:
    ctx = open_fresh(world, world.host_a, name)
    ctx.mcounter_create("db")
    v1 = ctx.seal_migratable(b"balance=10", counter="db")
    v2 = ctx.seal_migratable(b"balance=3", counter="db")
    assert ctx.sealed_binding(v1) == ("db", 1) and ctx.sealed_binding(v2) == ("db", 2)
    assert ctx.unseal_migratable(v2) == b"balance=3"
    with pytest.raises(RollbackError):
        ctx.unseal_migratable(v1)
    assert ctx.unseal_migratable(v1, fresh=False) == b"balance=10"  # knowingly old
    with pytest.raises(PersistentStateError):
        ctx.seal_migratable(b"x", counter="missing")
    # The host's administrator sets the platform counter back: the newest blob now
    # claims a value above the counter's, which is as suspicious.
    cid = ctx.persistent._counters["db"].cid
    counters = world.host_a.counters._load()
    counters[cid]["value"] = 1
    world.host_a.counters._save(counters)
    with pytest.raises(RollbackError):
        ctx.unseal_migratable(v2)
    ctx.mcounter_destroy("db")
    with pytest.raises(RollbackError):
        ctx.unseal_migratable(v2)


def test_migratable_counters(world: World, name: str) -> None:
    ctx = open_fresh(world, world.host_a, name)
    assert ctx.mcounter_create("a") == 0
    assert ctx.mcounter_create("b", 40) == 40
    assert ctx.mcounter_increment("a") == 1
    assert ctx.mcounter_increment("b", 2) == 42
    assert ctx.mcounter_read("b") == 42
    with pytest.raises(PersistentStateError):
        ctx.mcounter_create("a")
    for by in (0, -1):
        with pytest.raises(CounterError):
            ctx.mcounter_increment("a", by)
    ctx.mcounter_create("top", COUNTER_MAX - 1)
    assert ctx.mcounter_increment("top") == COUNTER_MAX
    with pytest.raises(CounterError):
        ctx.mcounter_increment("top")
    ctx.mcounter_destroy("a")
    assert ctx.mcounter_names() == ["b", "top"]
    with pytest.raises(PersistentStateError):
        ctx.mcounter_read("a")


def test_errors_cross_the_wire_typed() -> None:
    for cls in (FrozenError, RollbackError, PersistentStateError):
        err = cls("x")
        assert type(error_from_wire(err.code, err.message)) is cls
    assert issubclass(FrozenError, EnclaveBusyError) and issubclass(RollbackError, SealError)


# --- migrations ---------------------------------------------------------------------------
def test_sealed_data_and_counters_move_and_the_source_keeps_nothing(
    world: World, name: str
) -> None:
    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", 5)
    ctx.mcounter_increment("c", 3)
    blob = ctx.seal_migratable(SECRET, aad=b"k", counter="c")  # c = 9
    svc_a = world.host_a.services_for(ctx.identity)
    counters_before = set(world.host_a.counters._load())

    dest = _ctx(migrate(source, world.host_b, world))
    assert dest.unseal_migratable(blob, aad=b"k") == SECRET
    assert dest.mcounter_read("c") == 9
    assert dest.mcounter_increment("c") == 10
    assert dest.persistent.status() == {"name": name, "open": True, "frozen": False,
                                        "counters": ["c"]}  # fmt: skip
    # Host a holds neither the record nor any of its counters any more.
    assert svc_a.persist_read(name) is None
    assert len(counters_before - set(world.host_a.counters._load())) == 2  # epoch + c
    # A fresh enclave on a (no migration came back) or on a third host gets a new,
    # empty persistent state of that name; the migrated blob does not open there.
    for host in (world.host_a, world.host_old_cpu):
        other = open_fresh(world, host, name)
        assert other.mcounter_names() == []
        with pytest.raises(SealError):
            other.unseal_migratable(blob, aad=b"k")


def test_counters_continue_across_two_migrations(world: World, name: str) -> None:
    first = _instance(world)
    ctx = _ctx(first)
    ctx.open_persistent(name)
    ctx.mcounter_create("x")
    ctx.mcounter_increment("x", 11)
    old = ctx.seal_migratable(b"v1", counter="x")  # 12
    on_b = migrate(first, world.host_b, world)
    assert _ctx(on_b).mcounter_read("x") == 12
    new = _ctx(on_b).seal_migratable(b"v2", counter="x")  # 13
    back = migrate(on_b, world.host_a, world)
    ctx = _ctx(back)
    assert ctx.mcounter_read("x") == 13
    assert ctx.mcounter_increment("x") == 14
    with pytest.raises(RollbackError):
        ctx.unseal_migratable(old)
    assert ctx.unseal_migratable(new, fresh=False) == b"v2"
    # Back on a, under the same name, with fresh platform counters.
    assert world.host_a.services_for(ctx.identity).persist_read(name) is not None


def test_enclave_without_persistent_state_migrates(world: World) -> None:
    source = _instance(world)
    source.call("store", b"plain")
    dest = migrate(source, world.host_b, world)
    assert dest.call("load", 5) == b"plain"
    assert dest.context.persistent.status()["open"] is False


def test_frozen_from_dump_until_abort(world: World, name: str) -> None:
    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c")
    blob = ctx.seal_migratable(SECRET)
    platform_blob = ctx.seal(SECRET)
    cid, _ = ctx.counter_create()
    move = Move(source, _instance(world, world.host_b))
    move.transfer()
    assert ctx.persistent.frozen
    operations: list[Callable[[], object]] = [
        lambda: ctx.seal_migratable(b"x"),
        lambda: ctx.unseal_migratable(blob),
        lambda: ctx.mcounter_increment("c"),
        lambda: ctx.mcounter_read("c"),
        lambda: ctx.mcounter_create("d"),
        lambda: ctx.seal(b"x"),
        lambda: ctx.unseal(platform_blob),
        lambda: ctx.counter_increment(cid),
        lambda: ctx.counter_read(cid),
        lambda: ctx.counter_create(),
    ]
    for op in operations:
        with pytest.raises(FrozenError):
            op()
    move.abort()  # e.g. the destination died before the commit
    assert not ctx.persistent.frozen
    assert ctx.mcounter_increment("c") == 1  # nothing was lost, nothing retired
    assert ctx.unseal_migratable(blob) == SECRET
    assert ctx.counter_increment(cid) == 1
    # The destination never installed anything.
    assert world.host_b.services_for(ctx.identity).persist_read(name) is None


def test_freeze_waits_for_an_operation_under_way(world: World, name: str) -> None:
    state = _ctx(_instance(world)).persistent
    state.open(name)
    inside, leave = threading.Event(), threading.Event()

    def slow() -> None:
        with state.guard():
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=slow)
    worker.start()
    assert inside.wait(10)
    with pytest.raises(EnclaveBusyError):
        state.freeze(timeout=0.05)  # gives up, and is open again
    assert not state.frozen
    freezer = threading.Thread(target=state.freeze)
    freezer.start()
    freezer.join(0.1)
    assert freezer.is_alive()  # waits for the operation under way
    leave.set()
    freezer.join(10)
    worker.join(10)
    assert state.frozen
    with pytest.raises(FrozenError):
        state.counter_names()
    state.thaw()
    assert state.counter_names() == []


def test_source_keeps_its_state_when_the_destination_never_commits(world: World, name: str) -> None:
    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", 100)
    move = Move(source, _instance(world, world.host_b))
    move.transfer()
    # After LOADED the destination refuses to drop its copy on a local request...
    with pytest.raises(AwaitingDecisionError):
        move.into.abort("a local request after LOADED")
    frame = move.out.abort("no commit came")  # ...the source's decision is what counts,
    with pytest.raises(MigrationError, match="source aborted"):
        move.into.commit_in(frame)  # and it ends the copy there, with its name's reservation
    assert ctx.mcounter_read("c") == 100
    assert ctx.mcounter_increment("c") == 101
    assert world.host_a.services_for(ctx.identity).persist_read(name) is not None
    assert world.host_b.services_for(ctx.identity).persist_read(name) is None


def test_destination_with_that_name_refuses_before_loaded(world: World, name: str) -> None:
    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", 1)
    open_fresh(world, world.host_b, name)  # another enclave of that name lives on b
    move = Move(source, _instance(world, world.host_b))
    with pytest.raises(PersistentStateError):
        move.transfer()
    move.abort()
    assert ctx.mcounter_increment("c") == 2


def test_destination_must_be_without_persistent_state(world: World, name: str) -> None:
    source = _instance(world)
    dest = _instance(world, world.host_b)
    _ctx(dest).open_persistent(name)
    with pytest.raises(ProtocolError):
        Move(source, dest).handshake()


def test_commit_refused_when_another_instance_took_the_record(world: World, name: str) -> None:
    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c")
    move = Move(source, _instance(world, world.host_b))
    move.transfer()
    thief = open_fresh(world, world.host_a, name)  # takes the record over after the dump
    thief.mcounter_increment("c")
    with pytest.raises(PersistentStateError):
        move.out.commit()
    assert move.out.committed is False
    move.abort()
    assert thief.mcounter_read("c") == 1


# --- checkpoints --------------------------------------------------------------------------
def test_checkpoint_carries_the_persistent_state(world: World, name: str) -> None:
    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", 3)
    blob = ctx.seal_migratable(SECRET, counter="c")
    out = migrator_of(source)
    started = out.ckpt_out()
    producer, consumer = ShmRing.pair(3, CHUNK + TAG_SIZE)
    out.ring = producer
    slots: list[tuple[bytes, bool]] = []

    def drain() -> None:
        while True:
            index, view, final = consumer.next(30)
            slots.append((bytes(view), final))
            consumer.release(index)
            if final:
                return

    drainer = threading.Thread(target=drain)
    drainer.start()
    out.dump(CHUNK)
    drainer.join(30)
    assert ctx.persistent.frozen
    out.ckpt_commit()
    assert world.host_a.services_for(ctx.identity).persist_read(name) is None

    restored = _instance(world)
    into = migrator_of(restored)
    into.ckpt_in(started["key"])
    producer, consumer = ShmRing.pair(3, CHUNK + TAG_SIZE)
    into.ring = consumer

    def fill() -> None:
        for data, final in slots:
            index, slot = producer.acquire(30)
            slot[: len(data)] = data
            producer.publish(index, len(data), final)

    filler = threading.Thread(target=fill)
    filler.start()
    into.load()
    filler.join(30)
    into.ckpt_activate()
    rctx = _ctx(restored)
    assert rctx.unseal_migratable(blob) == SECRET
    assert rctx.mcounter_read("c") == 4


def test_migration_to_the_same_host(world: World, name: str) -> None:
    """An enclave moved on its own host (say, into a newer build): the record follows."""

    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", 9)
    blob = ctx.seal_migratable(SECRET)
    moved = _ctx(migrate(source, world.host_a, world))
    assert moved.mcounter_read("c") == 9
    assert moved.unseal_migratable(blob) == SECRET
    assert open_fresh(world, world.host_a, name + "-b").mcounter_names() == []
    # It is an ordinary record of this host now: a restart takes it over.
    assert open_fresh(world, world.host_a, name).mcounter_read("c") == 9
    with pytest.raises(PersistentStateError):
        moved.mcounter_read("c")


def test_rolled_back_source_host_keeps_only_the_past(world: World, name: str) -> None:
    """The documented limit: root on the source rolls its counter file back after the commit.

    The old record then opens again on the source (a fork of the persistent state, with
    the values of the dump); but what the destination seals after its arrival uses a key
    generation the source never had, and does not open there.
    """

    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", 1)
    before = ctx.seal_migratable(b"sealed before the move")
    saved = (world.host_a.state_dir / "counters.cbor").read_bytes()
    dest = _ctx(migrate(source, world.host_b, world))
    after = dest.seal_migratable(b"sealed after the move")
    assert dest.unseal_migratable(before) == b"sealed before the move"

    (world.host_a.state_dir / "counters.cbor").write_bytes(saved)  # the rollback
    revived = _ctx(_instance(world))
    try:
        assert revived.open_persistent(name) is False
        assert revived.unseal_migratable(before) == b"sealed before the move"
        with pytest.raises(SealError):
            revived.unseal_migratable(after)
    finally:
        revived.persistent.retire("test cleanup")


# --- atomic transactions and commit preconditions (issue 9, items 3-5) --------------------
def test_a_record_transaction_is_all_or_nothing(store: CounterStore) -> None:
    epoch, gate = "a" * 32, "b" * 32
    rec, g = hashlib.sha256(b"rec").digest(), hashlib.sha256(b"g").digest()
    store.record_update(OWNER, "r", RecordUpdate(b"rec", create={epoch: 1}, expect_absent=True))
    store.record_update(
        OWNER, "!ckpt-" + "0" * 32, RecordUpdate(b"g", create={gate: 0}, expect_absent=True)
    )
    retire = ("r", RecordUpdate(None, destroy=(epoch,), check={epoch: 1}, expect=rec))
    stale_gate = (
        "!ckpt-" + "0" * 32,
        RecordUpdate(b"g", advance={gate: 1}, check={gate: 7}, expect=g),
    )
    with pytest.raises(CounterError):
        store.record_transaction(OWNER, [retire, stale_gate])
    assert store.record_read(OWNER, "r") == b"rec" and store.read(OWNER, epoch) == 1
    assert store.read(OWNER, gate) == 0
    with pytest.raises(CounterError):  # one record twice
        store.record_transaction(OWNER, [retire, retire])
    gate_open = (
        "!ckpt-" + "0" * 32,
        RecordUpdate(b"g", advance={gate: 1}, check={gate: 0}, expect=g),
    )
    store.record_transaction(OWNER, [retire, gate_open])
    assert store.record_read(OWNER, "r") is None and store.read(OWNER, gate) == 1
    with pytest.raises(CounterError):  # the runtime's names are its own pattern only
        store.record_read(OWNER, "!ckpt-xyz")


def test_no_new_dump_after_loaded_and_no_retirement_without_a_token(
    world: World, name: str
) -> None:
    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", 40)
    move = Move(source, _instance(world, world.host_b))
    move.transfer()
    with pytest.raises(ProtocolError):
        move.out.dump(CHUNK)  # a new dump stream after LOADED
    # A stream started behind the migrator's back: the commit refuses before it retires.
    assert move.out.keys is not None
    move.out.keys.streams.sealer("state", CHUNK)
    with pytest.raises(ProtocolError):
        move.out.commit()
    assert move.out.committed is False
    assert world.host_a.services_for(ctx.identity).persist_read(name) is not None
    move.abort()
    assert ctx.mcounter_increment("c") == 41


def test_the_name_is_reserved_before_loaded_so_the_install_cannot_lose_it(
    world: World, name: str
) -> None:
    """Issue 9, item 4: an enclave on the destination opening the name between LOADED
    and COMMIT used to take it, and the install after the commit failed: state lost."""

    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", 7)
    destination = _instance(world, world.host_b)
    move = Move(source, destination)
    move.transfer()  # LOADED: the name is reserved on b
    with pytest.raises(PersistentStateError, match="reserved"):
        open_fresh(world, world.host_b, name)
    move.commit()  # claim and install: one platform update
    assert _ctx(destination).mcounter_increment("c") == 8


def test_an_aborted_arrival_releases_its_reservation(world: World, name: str) -> None:
    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    move = Move(source, _instance(world, world.host_b))
    move.transfer()
    move.abort()
    assert world.host_b.services_for(ctx.identity).persist_read(name) is None
    open_fresh(world, world.host_b, name)  # the name is free again


def test_a_claimed_id_installs_nothing(world: World, name: str) -> None:
    """The claim and the install are one update: a replayed id leaves no state behind."""

    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", 1)
    destination = _instance(world, world.host_b)
    move = Move(source, destination)
    move.transfer()
    services = world.host_b.services_for(ctx.identity)
    assert move.out.keys is not None
    assert services.claim_migration(move.out.keys.migration_id)  # claimed behind its back
    token = move.out.commit()  # the source gave its state up: the token is all there is
    with pytest.raises(ReplayError):
        move.into.commit_in(token)
    blob = services.persist_read(name)
    assert blob is not None and blob.startswith(RESERVED)  # no record was installed
