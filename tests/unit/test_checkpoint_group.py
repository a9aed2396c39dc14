"""A checkpoint of several enclaves: their gates under the store's group rule.

``docs/spec/checkpoint.md`` (section 3, step 6) and ``docs/spec/commit.md`` (1.1):
the first committed gate is the commit point of the whole checkpoint, and the
platform store refuses, in the same locked write that would move the gate, an
abort once a sibling committed and a commit once a sibling aborted.  The
trusted halves run here in memory against real emulated platform stores.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from platform_fixtures import World, shared_world
from test_persistent import CHUNK, _instance, migrator_of

from migsgx.core.stream import TAG_SIZE
from migsgx.datapath.ring import ShmRing
from migsgx.enclave.migrator import Migrator
from migsgx.errors import (
    CheckpointGateError,
    CounterError,
    GroupDecidedError,
    GroupUncheckedError,
    ProtocolError,
)
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.store_types import Decision, RecordUpdate

OWNER = b"S" + bytes(32) + b"\x02\x00"
META = hashlib.sha256(b"migsgx.json as written").digest()


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


def _written(out: Migrator, group: bytes) -> tuple[dict[str, Any], list[tuple[bytes, bool]]]:
    """``__ckpt_out`` in ``group`` and the dump, drained into memory as the driver would."""

    started = out.call("__ckpt_out", [group])
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
    return started, slots


def _pair(world: World) -> tuple[Migrator, Migrator, bytes, list[dict[str, Any]]]:
    """Two enclaves of one application, each with its checkpoint written, one group."""

    group = os.urandom(16)
    first, second = migrator_of(_instance(world)), migrator_of(_instance(world))
    started = [_written(m, group)[0] for m in (first, second)]
    return first, second, group, started


def _opens(world: World, started: dict[str, Any]) -> bool:
    """Whether a fresh enclave of this host opens the checkpoint (its gate committed)."""

    probe = migrator_of(_instance(world))
    try:
        probe.ckpt_in(started["key"], META)
    except CheckpointGateError:
        return False
    probe.abort("probe")
    return True


def test_an_abort_after_a_sibling_committed_is_refused_and_it_commits_later(
    world: World,
) -> None:
    """The race the group rule closes: a guardian's abort reaches the second enclave
    after the first committed its gate.  It is refused, the gate stays pending (the
    enclave frozen), and the roll-forward's commit makes the checkpoint whole."""

    first, second, group, started = _pair(world)
    first.call("__ckpt_commit", [META])
    with pytest.raises(GroupDecidedError, match="stays frozen"):
        second.call("__mig_abort", ["the tool died"])
    assert second.checkpoint is not None and not second.committed  # pending, frozen
    assert world.host_a.counters.group_decision(group) == "commit"
    assert not _opens(world, started[1])
    second.call("__ckpt_commit", [META])
    assert _opens(world, started[0]) and _opens(world, started[1])


def test_a_commit_after_a_sibling_aborted_is_refused_and_it_may_abort(world: World) -> None:
    """The other order: the guardian aborted one enclave first, then the dead tool's
    commit of another runs.  It is refused (nothing retired, the gate pending), and
    that enclave aborts as the group did: the source is whole."""

    first, second, group, started = _pair(world)
    first.call("__mig_abort", ["the tool died"])
    assert first.checkpoint is None  # runs on
    with pytest.raises(GroupDecidedError, match="aborted first"):
        second.call("__ckpt_commit", [META])
    assert second.checkpoint is not None and not second.committed
    second.call("__mig_abort", ["the tool died"])
    assert world.host_a.counters.group_decision(group) == "abort"
    assert not _opens(world, started[0]) and not _opens(world, started[1])


def test_an_unchecked_abort_in_a_group_stays_frozen_unless_none_committed(
    world: World,
) -> None:
    """The store fails (its mode is wrong): an abort it cannot check changes nothing;
    the driver that saw no commit (``none_committed``) aborts in memory."""

    first, second, _group, started = _pair(world)
    store = world.host_a.counters._path
    store.chmod(0o644)
    try:
        with pytest.raises(GroupUncheckedError, match="stays frozen"):
            first.call("__mig_abort", ["the tool died"])
        assert first.checkpoint is not None
        for m in (first, second):
            m.call("__mig_abort", ["checkpoint abandoned", True])
            assert m.checkpoint is None  # runs again
    finally:
        store.chmod(0o600)
    assert not _opens(world, started[0]) and not _opens(world, started[1])


def test_a_group_is_given_at_the_checkpoint_start(world: World) -> None:
    out = migrator_of(_instance(world))
    with pytest.raises(ProtocolError, match="16 bytes"):
        out.call("__ckpt_out", [b"short"])
    _written(out, os.urandom(16))
    with pytest.raises(ProtocolError, match="only a migrating source"):
        out.call("__mig_group", [os.urandom(16)])  # not a migration's group
    out.call("__mig_abort", ["done"])


# --- the store: records tagged with a group bind its decisions while they exist ----------
def _gate(store: CounterStore, group: bytes) -> tuple[str, str]:
    name, counter = "!ckpt-" + os.urandom(16).hex(), os.urandom(16).hex()
    store.record_update(
        OWNER, name, RecordUpdate(b"g", create={counter: 0}, expect_absent=True, group=group)
    )
    return name, counter


def _opening(counter: str) -> RecordUpdate:
    sha = hashlib.sha256(b"g").digest()
    return RecordUpdate(b"g2", advance={counter: 1}, check={counter: 0}, expect=sha)


def test_a_group_bound_to_records_keeps_its_decisions_while_one_is_there(
    tmp_path: Path,
) -> None:
    store = CounterStore(tmp_path / "c.cbor")
    group = os.urandom(16)
    (a, ca), (b, cb) = _gate(store, group), _gate(store, group)
    first, second = os.urandom(16), os.urandom(16)
    store.decide(OWNER, Decision(first, "commit", b"", group=group), [(a, _opening(ca))])
    # The tag survives the replacement of the record; the sibling's abort is refused.
    sha_b = hashlib.sha256(b"g").digest()
    gone_b = RecordUpdate(None, destroy=(cb,), check={cb: 0}, expect=sha_b)
    with pytest.raises(GroupDecidedError):
        store.decide(OWNER, Decision(second, "abort", b"", group=group), [(b, gone_b)])
    store.decide(OWNER, Decision(second, "commit", b"", group=group), [(b, _opening(cb))])
    # A restore consumes both gates: the group's decisions go with the next decision.
    sha2 = hashlib.sha256(b"g2").digest()
    for name, counter in ((a, ca), (b, cb)):
        store.record_update(
            OWNER, name, RecordUpdate(None, destroy=(counter,), check={counter: 1}, expect=sha2)
        )
    assert store.decision(first) is not None
    lone = os.urandom(16)
    store.decide(OWNER, Decision(lone, "abort", b"", group=os.urandom(16)))  # a migration's
    assert store.decision(first) is None and store.decision(second) is None
    store.decide(OWNER, Decision(os.urandom(16), "commit", b""))
    assert store.decision(lone) is not None  # tags no record: never dropped


def test_a_group_tag_is_set_only_when_a_record_is_created() -> None:
    with pytest.raises(CounterError, match="only when it is created"):
        RecordUpdate(b"x", group=os.urandom(16))
    with pytest.raises(CounterError, match="16 bytes"):
        RecordUpdate(b"x", expect_absent=True, group=b"short")
    tagged = RecordUpdate(b"x", expect_absent=True, group=bytes(16))
    assert RecordUpdate.from_wire(tagged.to_wire()) == tagged
    assert "group" not in RecordUpdate(b"x", expect_absent=True).to_wire()
