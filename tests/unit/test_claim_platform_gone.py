"""A destination's claim that never reached its platform service can be made again.

Window W2 (c) (``docs/spec/commit.md``, section 5): the loaded copy lives, its
platform service is away, so the claim (one platform update with the arriving
persistent state's install) fails with ``enclave-lost`` before anything was
sent.  A failed claim is no decision: the copy waits, and claims on the next
delivery once the service is back.  Before, the failed install left the
enclave believing it had a persistent state of its own, and every later claim
was refused (``persistent``): the live copy could never run.

The trusted halves are the real ones; only the platform request fails.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from platform_fixtures import World, shared_world
from test_persistent import Move, _ctx, _instance

from migsgx.errors import EnclaveLostError


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


def _loaded(world: World) -> tuple[Move, bytes]:
    """A source with a persistent state and a counter at 2, committed; its token."""

    source = _instance(world)
    ctx = _ctx(source)
    ctx.open_persistent(f"t-{uuid.uuid4().hex[:12]}")
    ctx.mcounter_create("c")
    ctx.mcounter_increment("c")
    ctx.mcounter_increment("c")
    move = Move(source, _instance(world, world.host_b))
    move.transfer()
    return move, move.out.commit()


@pytest.mark.parametrize("request_name", ["get_key", "persist_transaction"])
def test_a_claim_not_sent_for_want_of_the_platform_is_made_again(
    world: World, monkeypatch: pytest.MonkeyPatch, request_name: str
) -> None:
    """The service gone at the install's seal key or at its update: either way nothing
    was applied, and the next delivery claims."""

    move, token = _loaded(world)
    services: Any = move.destination.services

    def gone(*args: object, **kwargs: object) -> None:
        raise EnclaveLostError("the platform service is gone")

    with monkeypatch.context() as away:
        away.setattr(services, request_name, gone)
        with pytest.raises(EnclaveLostError):
            move.into.commit_in(token)
    assert move.into.commit_in(token) == {"active": True}  # the service is back
    assert _ctx(move.destination).mcounter_read("c") == 2
