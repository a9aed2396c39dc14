"""The durable migration decision (``docs/spec/commit.md``): store and trusted halves."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest
from platform_fixtures import World, shared_world
from test_persistent import Move, _instance

from migsgx.errors import (
    AwaitingDecisionError,
    CommittedError,
    CounterError,
    MigrationError,
    MigSGXError,
    ReplayError,
)
from migsgx.sgx.counters import CounterStore, Decision, RecordUpdate

OWNER = b"S" + bytes(32) + b"\x01\x00"


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


def _mid() -> bytes:
    return os.urandom(16)


def _sha(blob: bytes) -> bytes:
    return hashlib.sha256(blob).digest()


# --- the store ----------------------------------------------------------------------------
def test_first_decision_wins_and_is_final(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "c.cbor")
    mid = _mid()
    assert store.decide(OWNER, Decision(mid, "commit", b"token")).kind == "commit"
    held = store.decide(OWNER, Decision(mid, "abort", b"frame"))
    assert (held.kind, held.frame) == ("commit", b"token")
    # Durable: a fresh store on the same file (a restarted platform) sees it.
    again = CounterStore(tmp_path / "c.cbor").decision(mid)
    assert again is not None and (again.kind, again.frame) == ("commit", b"token")
    assert [d.migration_id for d in store.decisions()] == [mid]


def test_retire_happens_only_with_the_first_decision(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "c.cbor")
    epoch = uuid.uuid4().hex
    store.record_update(OWNER, "rec", RecordUpdate(b"blob", create={epoch: 1}, expect_absent=True))
    retire = [("rec", RecordUpdate(None, destroy=(epoch,), check={epoch: 1}, expect=_sha(b"blob")))]
    first, second = _mid(), _mid()
    store.decide(OWNER, Decision(first, "abort", b""))
    store.decide(OWNER, Decision(first, "commit", b"t"), retire)  # not the first: no retire
    assert store.record_read(OWNER, "rec") == b"blob"
    store.decide(OWNER, Decision(second, "commit", b"t"), retire)
    assert store.record_read(OWNER, "rec") is None
    assert store.decision(second) is not None


def test_a_refused_retire_records_no_decision(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "c.cbor")
    epoch = uuid.uuid4().hex
    store.record_update(OWNER, "rec", RecordUpdate(b"blob", create={epoch: 5}, expect_absent=True))
    mid = _mid()
    stale = [("rec", RecordUpdate(None, destroy=(epoch,), check={epoch: 4}, expect=_sha(b"blob")))]
    with pytest.raises(CounterError):
        store.decide(OWNER, Decision(mid, "commit", b"t"), stale)
    assert store.decision(mid) is None
    assert store.record_read(OWNER, "rec") == b"blob"


def test_a_decision_composes_with_a_multi_record_transaction(tmp_path: Path) -> None:
    """The source's retirement and a checkpoint gate's move go with the COMMIT, or none."""

    store = CounterStore(tmp_path / "c.cbor")
    epoch, gate = uuid.uuid4().hex, uuid.uuid4().hex
    store.record_update(OWNER, "rec", RecordUpdate(b"blob", create={epoch: 1}, expect_absent=True))
    store.record_update(OWNER, "gate", RecordUpdate(b"g0", create={gate: 0}, expect_absent=True))
    retire = ("rec", RecordUpdate(None, destroy=(epoch,), check={epoch: 1}, expect=_sha(b"blob")))
    bad_gate = ("gate", RecordUpdate(b"g1", advance={gate: 1}, expect=_sha(b"other")))
    mid = _mid()
    with pytest.raises(CounterError):  # the second update fails: nothing at all is written
        store.decide(OWNER, Decision(mid, "commit", b"t"), [retire, bad_gate])
    assert store.decision(mid) is None
    assert store.record_read(OWNER, "rec") == b"blob"
    good_gate = ("gate", RecordUpdate(b"g1", advance={gate: 1}, expect=_sha(b"g0")))
    assert store.decide(OWNER, Decision(mid, "commit", b"t"), [retire, good_gate]).kind == "commit"
    assert store.record_read(OWNER, "rec") is None
    assert store.record_read(OWNER, "gate") == b"g1"
    with pytest.raises(CounterError):  # one record twice in one update
        store.decide(OWNER, Decision(_mid(), "commit", b"t"), [good_gate, good_gate])


def test_another_owner_cannot_decide_the_same_id(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "c.cbor")
    mid = _mid()
    store.decide(OWNER, Decision(mid, "commit", b"t"))
    with pytest.raises(CounterError):
        store.decide(b"X" + OWNER[1:], Decision(mid, "abort", b""))


def test_malformed_decisions_are_refused() -> None:
    with pytest.raises(CounterError):
        Decision(_mid(), "maybe", b"")
    with pytest.raises(CounterError):
        Decision(b"short", "commit", b"")


# --- the trusted halves -------------------------------------------------------------------
def _mid_of(move: Move) -> bytes:
    assert move.out.keys is not None
    return move.out.keys.migration_id


def test_commit_is_recorded_with_its_token_and_keeps_the_state_until_release(
    world: World,
) -> None:
    move = Move(_instance(world), _instance(world, world.host_b))
    move.transfer()
    token = move.out.commit()
    held = world.host_a.counters.decision(_mid_of(move))
    assert held is not None and (held.kind, held.frame) == ("commit", token)
    # Re-delivery: the same token, any number of times, from the committed source.
    assert move.out.call("__mig_token", []) == token
    assert move.out.call("__mig_token", []) == token
    # It never runs again, and an abort (the guardian's, say) is refused.
    with pytest.raises(CommittedError):
        move.out.call("__mig_abort", ["too late"])
    assert not move.out.exit_after_reply
    move.into.commit_in(token)
    with pytest.raises(ReplayError):
        move.into.commit_in(token)  # delivered twice: activates once
    move.out.call("__mig_release", [])
    assert move.out.exit_after_reply


def test_abort_is_recorded_and_a_later_commit_is_impossible(world: World) -> None:
    move = Move(_instance(world), _instance(world, world.host_b))
    move.transfer()
    mid = _mid_of(move)
    frame = move.out.abort("the tool gave up")
    held = world.host_a.counters.decision(mid)
    assert held is not None and (held.kind, held.frame) == ("abort", frame)
    with pytest.raises(MigSGXError):
        move.out.commit()
    assert world.host_a.counters.decision(mid) == held
    # The recorded ABORT, carried over later by anyone, ends the destination.
    with pytest.raises(MigrationError, match="source aborted"):
        move.into.commit_in(held.frame)
    assert move.into.discarded


def test_destination_keeps_its_copy_after_loaded(world: World) -> None:
    move = Move(_instance(world), _instance(world, world.host_b))
    move.transfer()
    with pytest.raises(AwaitingDecisionError):
        move.into.abort("the agent timed out")
    with pytest.raises(AwaitingDecisionError):
        move.into.call("__mig_abort", ["the agent timed out"])
    assert not move.into.discarded
    assert move.into.commit_in(move.out.commit()) == {"active": True}  # late, still runs
    assert not move.into.discarded


def test_a_recover_query_sees_claims_of_any_owner(tmp_path: Path) -> None:
    """The destination agent answers ``deliver`` for an ended session from the claims."""

    store = CounterStore(tmp_path / "c.cbor")
    mid = _mid()
    assert not store.claimed_by_any(mid)
    assert store.claim(OWNER, mid)
    assert store.claimed_by_any(mid)
    assert not store.claimed_by_any(_mid())
