"""The way back from a COMMIT the destination never acted on (``docs/spec/commit.md``, 2.2).

Both trusted halves back to back in memory on the emulated platforms of two
hosts: a source commits, its destination's copy never claims (it "died"), a
fresh destination enclave of the same measurement refuses the migration id in
its host's claim store and answers REFUSED; the source verifies it, revokes
its commit and runs on with its persistent state.  Then every way to abuse it.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from platform_fixtures import World
from test_persistent import SECRET, Move, _ctx, _instance, migrator_of

from migsgx.core.commit import CommitError, CommitState
from migsgx.enclave.migrator import Migrator
from migsgx.errors import (
    ClaimedBeforeError,
    CommittedError,
    FrameError,
    ProtocolError,
    ReplayError,
)


@pytest.fixture
def name() -> str:
    """A record name of its own for each test: the hosts are shared by the session."""

    return f"r-{uuid.uuid4().hex[:12]}"


def _committed(world: World, name: str, value: int = 100) -> tuple[Move, bytes, bytes]:
    """A source with a persistent state, committed; its destination's copy never claims."""

    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(name)
    ctx.mcounter_create("c", value)
    blob = ctx.seal_migratable(SECRET, aad=b"k", counter="c")  # (c is value + 1 now)
    move = Move(source, _instance(world, world.host_b))
    move.transfer()
    token = move.out.commit()
    return move, token, blob


def _redeliver(out: Migrator, world: World) -> Migrator:
    """A re-delivery handshake (same migration id) with a fresh enclave on host b."""

    fresh = migrator_of(_instance(world, world.host_b))
    message = out.redeliver_start()
    fresh.in_start()
    while True:
        reply = fresh.hs(message)
        if out.keys is not None and fresh.keys is not None:
            return fresh
        message = out.hs(reply["send"])["send"]


def _flip(frame: bytes, at: int = -3) -> bytes:
    b = bytearray(frame)
    b[at] ^= 0x01
    return bytes(b)


def _still_committed(move: Move, world: World) -> None:
    mid = move.out._committed_mid
    assert move.out.committed and move.source.quiesced
    held = world.host_a.counters.decision(mid)
    assert held is not None and held.kind == "commit"


def test_a_refusal_brings_the_committed_source_back_with_its_persistent_state(
    world: World, name: str
) -> None:
    move, token, blob = _committed(world, name)
    mid = move.out._committed_mid
    ctx = _ctx(move.source)
    fresh = _redeliver(move.out, world)
    frame = fresh.refuse()
    assert fresh.discarded and world.host_b.counters.refused(mid)
    assert move.out.refused(frame) == {"migration_id": mid, "decision": "revoked"}

    held = world.host_a.counters.decision(mid)
    assert held is not None and held.kind == "revoked"
    assert not move.out.committed and not move.source.quiesced
    # The source runs on with every acknowledged value, and its sealed data opens.
    assert ctx.mcounter_read("c") == 101
    assert ctx.unseal_migratable(blob, aad=b"k") == SECRET
    assert ctx.mcounter_increment("c") == 102
    # The loaded copy on b can never run now: its token's claim is refused.
    with pytest.raises(ReplayError):
        move.into.commit_in(token)
    assert move.into.dest_commit is None or move.into.dest_commit.state is not (CommitState.ACTIVE)
    # A second REFUSED changes nothing: the source is no longer committed.
    with pytest.raises(ProtocolError):
        move.out.refused(frame)
    # And it migrates again, under a new id (the dead copy's name reservation on b
    # released first, as its agent does for an arrival whose id no enclave claimed).
    move.into.persistent.release(move.into._pending_persistent)
    again = Move(move.source, _instance(world, world.host_b))
    again.transfer()
    again.commit()
    assert _ctx(again.destination).mcounter_read("c") == 102


def test_a_source_without_a_persistent_state_comes_back_too(world: World) -> None:
    source = _instance(world)
    move = Move(source, _instance(world, world.host_b))
    move.transfer()
    move.out.commit()
    fresh = _redeliver(move.out, world)
    move.out.refused(fresh.refuse())
    assert not move.out.committed and not source.quiesced


def test_a_forged_or_misplaced_refused_changes_nothing(world: World, name: str) -> None:
    move, token, _ = _committed(world, name)
    fresh = _redeliver(move.out, world)
    frame = fresh.refuse()
    with pytest.raises(CommitError):
        move.out.refused(_flip(frame))
    with pytest.raises(FrameError):
        move.out.refused(frame[:-1])
    with pytest.raises(CommitError):
        move.out.refused(token)  # (the source's own COMMIT: another key and direction)
    _still_committed(move, world)
    move.out.refused(frame)  # (the authentic one still works)
    assert not move.out.committed


def test_a_refused_of_another_session_or_migration_is_refused(world: World, name: str) -> None:
    first, _, _ = _committed(world, name)
    other, _, _ = _committed(world, name + "-2")
    stale = _redeliver(first.out, world).refuse()  # a session that the next one replaces
    _redeliver(first.out, world)  # (a new re-delivery: new keys, same migration id)
    with pytest.raises(CommitError):
        first.out.refused(stale)
    foreign = _redeliver(other.out, world).refuse()
    with pytest.raises(CommitError):
        first.out.refused(foreign)
    _still_committed(first, world)


def test_a_loaded_or_aborting_frame_is_no_refused(world: World, name: str) -> None:
    move, _, _ = _committed(world, name)
    fresh = _redeliver(move.out, world)
    abort = fresh.abort("the test gives up")
    with pytest.raises(ProtocolError):
        move.out.refused(abort)
    _still_committed(move, world)


def test_no_refusal_after_the_claim_and_no_claim_after_the_refusal(world: World, name: str) -> None:
    # The loaded copy claims after the fresh handshake: the refusal fails, no frame.
    move, token, _ = _committed(world, name)
    fresh = _redeliver(move.out, world)
    move.into.commit_in(token)
    with pytest.raises(ClaimedBeforeError):
        fresh.refuse()
    assert not world.host_b.counters.refused(move.out._committed_mid)
    _still_committed(move, world)
    # A claimed id is refused already in the handshake of a later re-delivery.
    with pytest.raises(ReplayError):
        _redeliver(move.out, world)


def test_a_refused_is_taken_only_by_a_committed_source(world: World, name: str) -> None:
    # First session, not committed: a destination may refuse, the source takes no proof.
    source = _instance(world)
    _ctx(source).open_persistent(name)
    move = Move(source, _instance(world, world.host_b))
    move.handshake()
    frame = move.into.refuse()
    with pytest.raises(ProtocolError):
        move.out.refused(frame)
    with pytest.raises(ProtocolError):
        move.out.loaded(frame)  # (nor as a LOADED)
    move.out.abort("refused")
    assert not source.quiesced


def test_a_released_source_takes_no_refused(world: World, name: str) -> None:
    move, _, _ = _committed(world, name)
    fresh = _redeliver(move.out, world)
    frame = fresh.refuse()
    move.out.release()
    with pytest.raises(ProtocolError, match="released"):
        move.out.refused(frame)
    held = world.host_a.counters.decision(move.out._committed_mid)
    assert held is not None and held.kind == "commit"


def test_a_destination_that_loaded_does_not_refuse(world: World, name: str) -> None:
    move, _, _ = _committed(world, name)
    with pytest.raises(ProtocolError):
        move.into.refuse()
    with pytest.raises(CommittedError):
        move.out.call("__mig_refuse", [])


def test_a_lost_refused_is_asked_again_and_a_new_one_proves_the_same(
    world: World, name: str
) -> None:
    move, _, _ = _committed(world, name)
    mid = move.out._committed_mid
    _redeliver(move.out, world).refuse()  # refused on b; its frame never arrives
    assert world.host_b.counters.refused(mid)
    _still_committed(move, world)
    again = _redeliver(move.out, world).refuse()  # (the id stays refused: a new proof)
    move.out.refused(again)
    held = world.host_a.counters.decision(mid)
    assert held is not None and held.kind == "revoked" and not move.out.committed


def test_a_revocation_whose_store_write_failed_is_tried_again(world: World, name: str) -> None:
    move, _, _ = _committed(world, name)
    mid = move.out._committed_mid
    frame = _redeliver(move.out, world).refuse()
    services = move.source.services
    real = services.revoke_commit
    calls: list[int] = []

    def lost_answer(migration_id: bytes, reopen: Any = ()) -> Any:
        # The write happens, its answer is lost (the platform service died after it).
        calls.append(1)
        real(migration_id, reopen)
        raise OSError("the platform service went away")

    services.revoke_commit = lost_answer  # type: ignore[method-assign]
    try:
        with pytest.raises(OSError):
            move.out.refused(frame)
    finally:
        services.revoke_commit = real  # type: ignore[method-assign]
    assert move.out.committed and move.source.quiesced  # (nothing changed in the enclave)
    move.out.refused(frame)  # the same updates again: the store answers the revocation
    assert calls == [1] and not move.out.committed
    ctx = _ctx(move.source)
    assert ctx.mcounter_read("c") == 101 and ctx.mcounter_increment("c") == 102
    held = world.host_a.counters.decision(mid)
    assert held is not None and held.kind == "revoked"
