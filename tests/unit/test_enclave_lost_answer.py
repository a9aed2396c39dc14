"""A COMMIT whose answer was lost: the enclave neither aborts nor takes it for undone
until a platform store answered (``docs/spec/commit.md``, 1 rule 4).

The trusted half is the real one; only the platform service's answer is lost
(its ``decide`` writes, or not, then raises as the channel does when the
service goes away after the request went out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from platform_fixtures import World, shared_world
from test_persistent import Move, _instance

from migsgx.errors import (
    CommittedError,
    DecisionUnknownError,
    EnclaveLostError,
    GroupUncheckedError,
    MigrationError,
    PlatformAnswerLostError,
)
from migsgx.sgx.store_types import Decision, RecordUpdate

Decide = Callable[..., Decision]


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


def _move(world: World) -> tuple[Move, bytes]:
    move = Move(_instance(world), _instance(world, world.host_b))
    move.transfer()
    assert move.out.keys is not None
    return move, move.out.keys.migration_id


def _lost(real: Decide, written: bool) -> Decide:
    def decide(decision: Decision, retire: Sequence[tuple[str, RecordUpdate]] = ()) -> Decision:
        if written:
            real(decision, retire)
        raise PlatformAnswerLostError("the platform service went away during a request")

    return decide


def _gone(decision: Decision, retire: Sequence[tuple[str, RecordUpdate]] = ()) -> Decision:
    raise EnclaveLostError("the platform service is gone")


@pytest.mark.parametrize("written", [True, False])
def test_a_commit_whose_answer_was_lost_is_settled_by_the_store_only(
    world: World, monkeypatch: pytest.MonkeyPatch, written: bool
) -> None:
    """No service: even the tool's ``none_committed`` abort leaves it frozen.  A service
    again: its own COMMIT held, it is committed (the destination runs on the token); none
    held, the abort is recorded and the source runs on."""

    move, mid = _move(world)
    services = move.out.instance.services
    real = services.decide
    monkeypatch.setattr(services, "decide", _lost(real, written))
    with pytest.raises(DecisionUnknownError, match="may be recorded"):
        move.out.call("__mig_commit", [])
    monkeypatch.setattr(services, "decide", _gone)
    for args in (["rolled back", True], ["the tool died"]):
        with pytest.raises(GroupUncheckedError, match="stays frozen"):
            move.out.call("__mig_abort", args)
        assert move.out.source_commit is not None and not move.out.committed  # frozen
    monkeypatch.setattr(services, "decide", real)
    if written:
        with pytest.raises(CommittedError, match="recorded before"):
            move.out.call("__mig_abort", ["rolled back", True])
        held = world.host_a.counters.decision(mid)
        assert held is not None and held.kind == "commit"
        assert move.into.commit_in(held.frame) == {"active": True}
        move.out.call("__mig_release", [])
        assert move.out.exit_after_reply
    else:
        frame = move.out.call("__mig_abort", ["rolled back", True])
        assert move.out.source_commit is None  # aborted: runs again
        held = world.host_a.counters.decision(mid)
        assert held is not None and (held.kind, held.frame) == ("abort", frame)
        with pytest.raises(MigrationError, match="source aborted"):
            move.into.commit_in(frame)


def test_a_release_after_a_lost_answer_takes_the_recorded_commit(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever read the COMMIT from the store (the guardian) releases the enclave once the
    destination runs: the enclave asks its store again and is committed, then wipes."""

    move, mid = _move(world)
    services = move.out.instance.services
    real = services.decide
    monkeypatch.setattr(services, "decide", _lost(real, True))
    with pytest.raises(DecisionUnknownError):
        move.out.call("__mig_commit", [])
    monkeypatch.setattr(services, "decide", real)
    held = world.host_a.counters.decision(mid)
    assert held is not None and held.kind == "commit"
    assert move.into.commit_in(held.frame) == {"active": True}
    move.out.call("__mig_release", [])
    assert move.out.committed and move.out.exit_after_reply


def test_a_commit_never_sent_keeps_the_fast_roll_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request did not go out (the service was gone before it): nothing can be
    recorded, and the tool's ``none_committed`` abort lets the source run at once."""

    move, mid = _move(world)
    services = move.out.instance.services
    monkeypatch.setattr(services, "decide", _gone)
    with pytest.raises(EnclaveLostError) as failed:
        move.out.call("__mig_commit", [])
    assert not isinstance(failed.value, DecisionUnknownError)
    move.out.call("__mig_abort", ["rolled back", True])
    assert move.out.source_commit is None  # aborted in memory
    assert world.host_a.counters.decision(mid) is None
