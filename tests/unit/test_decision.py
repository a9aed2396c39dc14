"""The durable migration decision (``docs/spec/commit.md``): store and trusted halves."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest
from platform_fixtures import World, shared_world
from test_persistent import Move, _instance, migrator_of

from migsgx.core.commit import CommitError
from migsgx.enclave.migrator import ABORTS_KEPT
from migsgx.errors import (
    AwaitingDecisionError,
    CommittedError,
    CounterError,
    GroupDecidedError,
    GroupUncheckedError,
    MigrationError,
    MigSGXError,
    ProtocolError,
    ReplayError,
)
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.store_types import Decision, RecordUpdate

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


# --- a migration group: several enclaves of one application ------------------------------------
OTHER = b"X" + OWNER[1:]


def test_a_group_is_decided_by_its_first_decision(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "c.cbor")
    group, first, second, third = _mid(), _mid(), _mid(), _mid()
    store.decide(OWNER, Decision(first, "commit", b"t1", group=group))
    # Another enclave (another owner) of the same migration cannot abort now ...
    with pytest.raises(GroupDecidedError):
        store.decide(OTHER, Decision(second, "abort", b"a2", group=group))
    assert store.decision(second) is None  # ... and the refusal wrote nothing
    # ... it commits too.
    assert store.decide(OTHER, Decision(second, "commit", b"t2", group=group)).kind == "commit"
    # Without the group (or in another one) the rule does not apply.
    assert store.decide(OWNER, Decision(third, "abort", b"", group=_mid())).kind == "abort"
    # Durable, and readable by anyone: the group goes with the record.
    again = CounterStore(tmp_path / "c.cbor")
    held = again.decision(second)
    assert held is not None and held.group == group
    assert again.group_decision(group) == "commit"


def test_an_aborted_group_refuses_a_commit(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "c.cbor")
    group, first, second = _mid(), _mid(), _mid()
    epoch = uuid.uuid4().hex
    store.record_update(OWNER, "rec", RecordUpdate(b"blob", create={epoch: 1}, expect_absent=True))
    retire = [("rec", RecordUpdate(None, destroy=(epoch,), check={epoch: 1}, expect=_sha(b"blob")))]
    store.decide(OTHER, Decision(first, "abort", b"a1", group=group))
    with pytest.raises(GroupDecidedError):
        store.decide(OWNER, Decision(second, "commit", b"t2", group=group), retire)
    # Nothing retired: the source keeps its persistent record.
    assert store.record_read(OWNER, "rec") == b"blob"
    assert store.decision(second) is None
    # A decision already held is returned as before, group or not.
    assert store.decide(OTHER, Decision(first, "commit", b"x", group=group)).kind == "abort"
    with pytest.raises(CounterError):
        Decision(_mid(), "commit", b"", group=b"short")


def _grouped_pair(world: World) -> tuple[Move, Move, bytes]:
    """Two enclaves of one application, both LOADED at the destination, one group."""

    group = _mid()
    first = Move(_instance(world), _instance(world, world.host_b))
    second = Move(_instance(world), _instance(world, world.host_b))
    for move in (first, second):
        move.transfer()
        move.out.call("__mig_group", [group])
    return first, second, group


def test_an_enclave_whose_group_committed_rolls_forward_instead_of_aborting(
    world: World,
) -> None:
    """The tool died between two enclaves' commits: whoever aborts the second
    (the guardian, or the enclave itself when its driver went away) commits it."""

    first, second, group = _grouped_pair(world)
    token = first.out.commit()
    with pytest.raises(CommittedError, match="committed too"):
        second.out.call("__mig_abort", ["the tool died"])
    held = world.host_a.counters.decision(_mid_of(second))
    assert held is not None and held.kind == "commit" and held.group == group
    assert second.out.committed and second.out.call("__mig_token", []) == held.frame
    # Both destinations activate on their recorded tokens: one copy, all of it.
    assert first.into.commit_in(token) == {"active": True}
    assert second.into.commit_in(held.frame) == {"active": True}
    assert world.host_a.counters.group_decision(group) == "commit"


def test_an_abort_the_store_cannot_check_against_the_group_stays_frozen(world: World) -> None:
    """The store fails while the second enclave aborts (here: its mode is wrong, as
    after an operator's mistake; a full or restarting store does the same).  An
    unrecorded abort would resume it although the first one committed: split."""

    first, second, group = _grouped_pair(world)
    token = first.out.commit()
    store = world.host_a.counters._path
    store.chmod(0o644)
    try:
        with pytest.raises(GroupUncheckedError, match="stays frozen"):
            second.out.call("__mig_abort", ["the tool died"])
    finally:
        store.chmod(0o600)
    assert world.host_a.counters.decision(_mid_of(second)) is None
    assert second.out.source_commit is not None and not second.out.committed  # still frozen
    # The store answers again: the abort is checked, and rolls forward as the group did.
    with pytest.raises(CommittedError, match="committed too"):
        second.out.call("__mig_abort", ["the tool died"])
    held = world.host_a.counters.decision(_mid_of(second))
    assert held is not None and held.kind == "commit" and held.group == group
    assert first.into.commit_in(token) == {"active": True}
    assert second.into.commit_in(held.frame) == {"active": True}


def test_the_tool_that_saw_no_commit_aborts_a_group_the_store_cannot_check(world: World) -> None:
    """The tool rolls back after its first COMMIT failed (the platform service gone):
    it says none committed, and the enclaves run again without their record."""

    first, second, _group = _grouped_pair(world)
    mid = _mid_of(second)
    store = world.host_a.counters._path
    store.chmod(0o644)
    try:
        with pytest.raises(GroupUncheckedError):  # a caller that does not know: frozen
            second.out.call("__mig_abort", ["the tool died"])
        with pytest.raises(ProtocolError, match="boolean"):
            second.out.call("__mig_abort", ["rolled back", "yes"])
        for pair in (first, second):
            pair.out.call("__mig_abort", ["rolled back", True])
            assert pair.out.source_commit is None  # aborted in memory: runs again
    finally:
        store.chmod(0o600)
    assert world.host_a.counters.decision(mid) is None  # (nothing recorded)


def test_an_enclave_whose_group_aborted_cannot_commit(world: World) -> None:
    first, second, group = _grouped_pair(world)
    mid = _mid_of(second)
    first.abort()
    with pytest.raises(MigrationError, match="another enclave of this migration aborted"):
        second.out.commit()
    assert world.host_a.counters.decision(mid) is None
    second.abort()  # still possible, and consistent with the group
    held = world.host_a.counters.decision(mid)
    assert held is not None and held.kind == "abort"
    assert world.host_a.counters.group_decision(group) == "abort"


def test_a_group_is_joined_once_by_a_source_before_its_decision(world: World) -> None:
    first, second, group = _grouped_pair(world)
    first.out.call("__mig_group", [group])  # the same again: a retry
    with pytest.raises(MigSGXError):
        first.out.call("__mig_group", [_mid()])  # another group
    with pytest.raises(MigSGXError):
        first.out.call("__mig_group", [b"short"])
    with pytest.raises(MigSGXError):
        first.into.call("__mig_group", [group])  # a destination is in none
    first.commit()
    with pytest.raises(MigSGXError):
        first.out.call("__mig_group", [group])  # decided already
    second.commit()


# --- an ABORT asked again (``commit.md`` 1 rule 6) ------------------------------------------
def test_an_abort_whose_frame_was_lost_is_asked_again_from_the_live_source(world: World) -> None:
    """The tool got the only ABORT (its store record failed: no platform service) and
    died with it.  The source enclave, asked again, hands out the same frame for that
    migration id, and the waiting destination ends on it."""

    move = Move(_instance(world), _instance(world, world.host_b))
    move.transfer()
    mid = _mid_of(move)
    store = world.host_a.counters._path
    store.chmod(0o644)
    try:
        frame = move.out.call("__mig_abort", ["rolled back"])  # (returned to a tool that dies)
    finally:
        store.chmod(0o600)
    assert frame and world.host_a.counters.decision(mid) is None
    assert move.out.call("__mig_abort", ["the tool died"]) == b""  # (nothing under way)
    assert move.out.call("__mig_abort_frame", [mid]) == frame
    assert move.out.call("__mig_abort_frame", [mid]) == frame  # any number of times
    # A later migration of the same enclave: the old one's frame is still there.
    later = Move(move.source, _instance(world, world.host_b))
    later.transfer()
    assert move.out.call("__mig_abort_frame", [mid]) == frame
    with pytest.raises(ProtocolError, match="under way"):
        move.out.call("__mig_abort_frame", [_mid_of(later)])  # only __mig_abort decides it
    flipped = bytearray(frame)
    flipped[-1] ^= 0x01
    with pytest.raises(CommitError, match="authentication"):
        move.into.commit_in(bytes(flipped))  # (as carried by an untrusted party: judged)
    assert not move.into.discarded
    with pytest.raises(MigrationError, match="source aborted"):
        move.into.commit_in(frame)
    assert move.into.discarded
    later.abort()


def test_an_abort_frame_is_never_made_for_a_committed_or_unknown_migration(
    world: World,
) -> None:
    """The untrusted caller names the id; the enclave answers from its own state."""

    other = Move(_instance(world), _instance(world, world.host_b))
    other.transfer()
    other_mid = _mid_of(other)
    other_frame = other.out.abort("aborted elsewhere")
    move = Move(_instance(world), _instance(world, world.host_b))
    move.transfer()
    mid = _mid_of(move)
    for bad in (_mid(), other_mid, b"short", "text"):
        with pytest.raises(ProtocolError):
            move.out.call("__mig_abort_frame", [bad])
    assert other.out.call("__mig_abort_frame", [other_mid]) == other_frame  # (its own: yes)
    # A replayed ABORT of another migration, or one with a flipped byte, ends nothing.
    damaged = bytearray(other_frame)
    damaged[len(damaged) // 2] ^= 0x01
    for frame in (other_frame, bytes(damaged)):
        with pytest.raises(CommitError, match="authentication"):
            move.into.commit_in(frame)
        assert not move.into.discarded
    token = move.out.commit()
    with pytest.raises(CommittedError):
        move.out.call("__mig_abort_frame", [mid])  # committed: never an ABORT for it
    assert move.into.commit_in(token) == {"active": True}


def test_an_enclave_keeps_a_bounded_number_of_abort_frames(world: World) -> None:
    source = _instance(world)
    mids = []
    for _ in range(ABORTS_KEPT + 1):
        move = Move(source, _instance(world, world.host_b))
        move.transfer()
        mids.append(_mid_of(move))
        move.abort()
    migrator = migrator_of(source)
    with pytest.raises(ProtocolError, match="no migration of that id"):
        migrator.call("__mig_abort_frame", [mids[0]])  # the oldest went
    assert all(migrator.call("__mig_abort_frame", [m]) for m in mids[1:])
