"""A source whose COMMIT's answer was lost, asked what only a committed source does.

The token again (``__mig_token``) and the state again (``__mig_redeliver_start``)
first read the decision from the platform store, as the release does: COMMIT
recorded, the enclave carries on as a committed one, and hands out the recorded
token, never a second one (``docs/spec/commit.md``, 1 rule 3 and rule 4); the
store unreachable, the same ``decision-unknown``; not committed, a refusal that
says so.  Both trusted halves are the real ones, back to back in memory on the
emulated platforms of two hosts; only the platform service's answer is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from platform_fixtures import World, shared_world
from test_persistent import Move, _instance

from migsgx.enclave.instance import EnclaveInstance
from migsgx.errors import (
    CommittedError,
    DecisionUnknownError,
    EnclaveLostError,
    MigrationError,
    PlatformAnswerLostError,
)
from migsgx.sgx.store_types import Decision, RecordUpdate

Decide = Callable[..., Decision]
PAYLOAD = b"every acknowledged write " * 300


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


def _source(world: World) -> EnclaveInstance:
    """A source enclave with some state in its memory."""

    source = _instance(world)
    where = source.memory.allocate("writes", len(PAYLOAD))
    source.memory.view(where.offset, len(PAYLOAD))[:] = PAYLOAD
    return source


def _memory(enclave: EnclaveInstance) -> bytes:
    """Every byte of ``enclave``'s memory in use."""

    return bytes(enclave.memory.view(0, enclave.memory.used))


def _lost(real: Decide, written: bool) -> Decide:
    """The service's ``decide`` that writes (or not) and then goes away before answering."""

    def decide(decision: Decision, retire: Sequence[tuple[str, RecordUpdate]] = ()) -> Decision:
        if written:
            real(decision, retire)
        raise PlatformAnswerLostError("the platform service went away during a request")

    return decide


def _gone(decision: Decision, retire: Sequence[tuple[str, RecordUpdate]] = ()) -> Decision:
    raise EnclaveLostError("the platform service is gone")


def _lost_commit(world: World, monkeypatch: pytest.MonkeyPatch, written: bool) -> Move:
    """A source, LOADED confirmed, whose COMMIT's answer was lost (``written``: recorded)."""

    move = Move(_source(world), _instance(world, world.host_b))
    move.transfer()
    services = move.out.instance.services
    monkeypatch.setattr(services, "decide", _lost(services.decide, written))
    with pytest.raises(DecisionUnknownError):
        move.out.call("__mig_commit", [])
    monkeypatch.undo()
    return move


class _Again(Move):
    """A re-delivery: the committed source's handshake again (same migration id), fresh enclave."""

    def handshake(self) -> None:
        message = self.out.call("__mig_redeliver_start", [])
        self.into.in_start()
        while True:
            reply = self.into.hs(message)
            if self.out.keys is not None and self.into.keys is not None:
                return
            message = self.out.hs(reply["send"])["send"]


def _recorded(world: World, move: Move) -> bytes:
    assert move.out.source_commit is not None
    held = world.host_a.counters.decision(move.out.source_commit.migration_id)
    assert held is not None and held.kind == "commit"
    return held.frame


@pytest.mark.parametrize("reader", ["__mig_token", "__mig_commit", "__mig_abort"])
def test_the_token_after_a_lost_answer_is_the_recorded_one(
    world: World, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """Whichever call makes the enclave read its COMMIT back (the token asked, the tool's
    commit again, an abort the store answers with the COMMIT), the token it hands out is
    byte for byte the one its store recorded: one token per migration (rule 3).  Before,
    the re-commit sealed a second one (and ``__mig_token`` said no commit was decided)."""

    move = _lost_commit(world, monkeypatch, written=True)
    recorded = _recorded(world, move)
    if reader == "__mig_abort":
        with pytest.raises(CommittedError, match="recorded before"):
            move.out.call(reader, ["the tool died"])
    else:
        assert move.out.call(reader, []) == recorded
    assert move.out.committed
    assert move.out.call("__mig_token", []) == recorded == _recorded(world, move)
    assert move.into.commit_in(recorded) == {"active": True}
    move.out.call("__mig_release", [])
    assert move.out.exit_after_reply


def test_a_source_whose_answer_was_lost_delivers_its_state_again_once_its_store_answers(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination's loaded copy is lost too.  While no platform service answers,
    the re-delivery and the token say ``decision-unknown`` and change nothing; once one
    does, the enclave reads its COMMIT, delivers its frozen state again (same migration
    id) to a fresh enclave on the same host, which runs on a token of its session; the
    store keeps the first token.  Before, both calls were refused for good (only a
    committed source re-delivers), and the state stayed frozen, for nobody."""

    move = _lost_commit(world, monkeypatch, written=True)
    recorded = _recorded(world, move)
    services = move.out.instance.services
    monkeypatch.setattr(services, "decide", _gone)
    for call in ("__mig_redeliver_start", "__mig_token"):
        with pytest.raises(DecisionUnknownError, match="stays frozen") as unknown:
            move.out.call(call, [])
        assert unknown.value.code == "decision-unknown"
        assert not move.out.committed and move.source.quiesced  # frozen, still unknown
    monkeypatch.undo()

    again = _Again(move.source, _instance(world, world.host_b))  # (the first copy is lost)
    again.transfer()
    token = again.out.call("__mig_commit", [])
    assert token != recorded  # a token of the re-delivery's session ...
    assert _recorded(world, move) == recorded  # ... while the decision stands as written
    assert again.into.commit_in(token) == {"active": True}
    # The state, every write of it.
    assert _memory(again.destination) == _memory(move.source) and PAYLOAD in _memory(move.source)
    assert move.out.call("__mig_token", []) == token  # (the token of the last session)
    move.out.call("__mig_release", [])
    assert move.out.exit_after_reply


@pytest.mark.parametrize("call", ["__mig_redeliver_start", "__mig_token"])
def test_a_source_whose_store_decided_otherwise_refuses_and_can_still_abort(
    world: World, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Its COMMIT was never written and another enclave of its migration group aborted
    (the guardian's abort, recorded once the service was back): the store holds no COMMIT
    of it and never will.  Asked for its token or its state again, it says so, commits
    nothing, stays frozen, and its own abort then goes ahead: the source runs on."""

    group = bytes(range(16))
    move = Move(_source(world), _instance(world, world.host_b))
    sibling = Move(_instance(world), _instance(world, world.host_b))
    for pair in (move, sibling):
        pair.transfer()
        pair.out.call("__mig_group", [group])
    services = move.out.instance.services
    monkeypatch.setattr(services, "decide", _lost(services.decide, written=False))
    with pytest.raises(DecisionUnknownError):
        move.out.call("__mig_commit", [])
    monkeypatch.undo()
    sibling.out.call("__mig_abort", ["the tool died"])

    with pytest.raises(MigrationError, match="cannot commit"):
        move.out.call(call, [])
    assert not move.out.committed and move.source.quiesced
    assert move.out.source_commit is not None
    mid = move.out.source_commit.migration_id
    assert world.host_a.counters.decision(mid) is None
    move.out.call("__mig_abort", ["the tool died"])
    assert move.out.source_commit is None and not move.source.quiesced  # runs again
    held = world.host_a.counters.decision(mid)
    assert held is not None and held.kind == "abort"
