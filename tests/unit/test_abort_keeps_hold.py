"""An abort that leaves the state frozen, committed or undecided keeps the duplicate.

The enclave's side of the connection is the real :class:`~migsgx.enclave.app_channel.AppChannel`
with the real trusted half (:class:`~migsgx.enclave.migrator.Migrator`) of a source whose
COMMIT's answer was lost (``docs/spec/commit.md``, 1 rule 4); the driver's end of the
connection is passed with ``SCM_RIGHTS`` as ``__mig_hold`` does.  Only the platform
service's answer is lost, or the service gone (its ``decide`` raises as the channel does).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence

import pytest
from platform_fixtures import World, shared_world
from test_enclave_lost_answer import _gone, _lost, _move

from migsgx.channel import ECALL, ECALL_FRAME_MAX
from migsgx.enclave.app_channel import AppChannel
from migsgx.enclave.migrator import Migrator
from migsgx.errors import DecisionUnknownError
from migsgx.sgx.store_types import Decision, RecordUpdate
from migsgx.wire import recv_frame


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    enclave, driver = socket.socketpair()
    driver.settimeout(10)
    yield enclave, driver
    enclave.close()
    driver.close()


def _channel(migrator: Migrator, enclave: socket.socket, driver: socket.socket) -> AppChannel:
    """An enclave's connection holding a duplicate of the driver's end (``__mig_hold``)."""

    channel = AppChannel(enclave)
    channel.migrator = migrator
    channel.instance = migrator.instance
    socket.send_fds(driver, [b"H"], [driver.fileno()])
    channel.hold.take(enclave, [b"n" * 16])
    assert channel.hold.held
    return channel


def _abort(channel: AppChannel, driver: socket.socket, *args: object) -> str:
    """``__mig_abort`` as the serve loop runs it; the code of its answer ("" for a value)."""

    channel._run_runtime_call(7, "__mig_abort", list(args))
    reply = recv_frame(driver, ECALL, max_size=ECALL_FRAME_MAX)
    assert reply["id"] == 7
    return "" if reply["t"] == "ret" else str(reply["code"])


@pytest.mark.parametrize("written", [True, False])
def test_an_undecided_abort_keeps_the_duplicate(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    pair: tuple[socket.socket, socket.socket],
    written: bool,
) -> None:
    """The COMMIT's answer lost and the service gone: every abort answers
    ``group-unchecked`` and the duplicate stays (the guardian may die next: the state is
    recover's).  The service back: its own COMMIT held, ``committed`` keeps it too (the
    frozen copy a re-delivery reads); none, the abort ends the migration and the source
    keeps it until ``__mig_unhold``, as any abort of a source does."""

    move, _ = _move(world)
    channel = _channel(move.out, *pair)
    services = move.out.instance.services
    real = services.decide
    monkeypatch.setattr(services, "decide", _lost(real, written))
    with pytest.raises(DecisionUnknownError):
        move.out.call("__mig_commit", [])
    monkeypatch.setattr(services, "decide", _gone)
    for args in (("the tool died",), ("rolled back", True)):
        assert _abort(channel, pair[1], *args) == "group-unchecked"
        assert channel.hold.held and channel.keeps_state()
    monkeypatch.setattr(services, "decide", real)
    if written:
        assert _abort(channel, pair[1], "the guardian asks again") == "committed"
        assert move.out.committed
        assert channel.hold.held and channel.keeps_state()
        move.out.call("__mig_release", [])
        assert not channel.keeps_state()  # (wiped: nothing left to keep)
    else:
        assert _abort(channel, pair[1], "the guardian asks again") == ""
        assert move.out.source_commit is None  # aborted: runs again
        assert channel.hold.held and not channel.keeps_state()  # (until __mig_unhold)


def test_a_destination_awaiting_its_decision_keeps_the_duplicate(
    world: World, pair: tuple[socket.socket, socket.socket]
) -> None:
    """LOADED went out: only the source's decision ends the destination's copy, so its
    refused abort (``awaiting-decision``) lets nothing go."""

    move, _ = _move(world)
    channel = _channel(move.into, *pair)
    assert _abort(channel, pair[1], "the tool died") == "awaiting-decision"
    assert channel.hold.held and channel.keeps_state()


def test_an_abort_with_nothing_under_way_after_a_failure_lets_go(
    world: World, monkeypatch: pytest.MonkeyPatch, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A refused abort of an enclave with no migration under way and nothing committed
    (here: a malformed argument) holds nothing worth keeping: the duplicate goes."""

    move, _ = _move(world)
    move.out.abort("rolled back")
    assert move.out.role is None
    channel = _channel(move.out, *pair)
    assert _abort(channel, pair[1], "rolled back", "not a boolean") == "protocol"
    assert not channel.hold.held


def test_the_read_back_after_an_unknown_abort_sends_the_abort(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COMMIT's answer lost, none recorded, and an abort asked (``group-unchecked``):
    once the service is back, ``__mig_token`` or ``__mig_release`` from any holder of the
    connection records no COMMIT.  The read-back asks the store with the ABORT: it is
    recorded, the call refused, the state frozen and intact, and the abort asked next goes
    ahead."""

    move, mid = _move(world)
    services = move.out.instance.services
    real = services.decide
    monkeypatch.setattr(services, "decide", _lost(real, False))
    with pytest.raises(DecisionUnknownError):
        move.out.call("__mig_commit", [])
    monkeypatch.setattr(services, "decide", _gone)
    with pytest.raises(Exception, match="stays frozen"):
        move.out.call("__mig_abort", ["the tool died"])
    asked: list[Decision] = []

    def decide(decision: Decision, *rest: object) -> Decision:
        asked.append(decision)
        return real(decision, *rest)

    monkeypatch.setattr(services, "decide", decide)
    for call in ("__mig_token", "__mig_release", "__mig_redeliver_start"):
        with pytest.raises(Exception, match="aborted"):
            move.out.call(call, [])
        assert not move.out.committed and not move.out.instance.retired
    assert {d.kind for d in asked} == {"abort"}
    held = world.host_a.counters.decision(mid)
    assert held is not None and held.kind == "abort"
    move.out.call("__mig_abort", ["the guardian asks again"])
    assert move.out.source_commit is None  # aborted: the source runs again


def test_an_abort_that_finds_its_commit_but_cannot_commit_yet_stays_decided(
    world: World, monkeypatch: pytest.MonkeyPatch, pair: tuple[socket.socket, socket.socket]
) -> None:
    """The COMMIT written, its answer lost; the guardian's abort finds that COMMIT in the
    store, and the service goes away before the enclave commits on it.  The answer is
    ``group-decided`` (roll forward, still frozen), never an error a driver could take for
    an abort; the duplicate stays; the service back, the next abort says ``committed``."""

    move, _ = _move(world)
    channel = _channel(move.out, *pair)
    services = move.out.instance.services
    real = services.decide
    monkeypatch.setattr(services, "decide", _lost(real, True))
    with pytest.raises(DecisionUnknownError):
        move.out.call("__mig_commit", [])
    calls: list[Decision] = []

    def once(decision: Decision, retire: Sequence[tuple[str, RecordUpdate]] = ()) -> Decision:
        calls.append(decision)
        return real(decision, retire) if len(calls) == 1 else _gone(decision, retire)

    monkeypatch.setattr(services, "decide", once)
    assert _abort(channel, pair[1], "the tool died") == "group-decided"
    assert len(calls) >= 2  # (the store answered with its COMMIT, then went away)
    assert not move.out.committed
    assert channel.hold.held and channel.keeps_state()
    monkeypatch.setattr(services, "decide", real)
    assert _abort(channel, pair[1], "the guardian asks again") == "committed"
    assert move.out.committed and channel.hold.held
