"""A checkpoint gate commit whose answer was lost: the enclave neither aborts nor takes
it for undone until a platform store answered (``docs/spec/commit.md``, section 5).

The trusted half is the real one; only the platform service's answer is lost (the
update that moves the gate is written, or not, then raises as the channel does when
the service goes away after the request went out).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from platform_fixtures import World, shared_world
from test_checkpoint_group import META, _opens, _written
from test_persistent import _instance, migrator_of

from migsgx.enclave.migrator import Migrator
from migsgx.errors import (
    CommittedError,
    DecisionUnknownError,
    EnclaveLostError,
    GroupUncheckedError,
    PlatformAnswerLostError,
)


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


def _lost(real: Callable[..., Any], written: bool) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if written:
            real(*args, **kwargs)
        raise PlatformAnswerLostError("the platform service went away during a request")

    return call


def _gone(*args: Any, **kwargs: Any) -> Any:
    raise EnclaveLostError("the platform service is gone")


#: The platform calls a gate's commit and abort make: alone, in a group.
_WRITES = ("persist_update", "persist_transaction", "decide")
_READS = ("persist_update", "persist_transaction", "decide", "counter_read")


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("written", [True, False])
def test_a_gate_commit_whose_answer_was_lost_is_settled_by_the_store_only(
    world: World, monkeypatch: pytest.MonkeyPatch, written: bool, grouped: bool
) -> None:
    """No service: even the tool's ``none_committed`` abort leaves it frozen, the gate as
    it was.  A service again: the gate committed, it is committed (the checkpoint
    opens); still pending, the gate goes and the source runs on."""

    out: Migrator = migrator_of(_instance(world))
    started, _ = _written(out, os.urandom(16) if grouped else b"")
    services = out.instance.services
    real = {name: getattr(services, name) for name in _READS}
    for name in _WRITES:
        monkeypatch.setattr(services, name, _lost(real[name], written))
    with pytest.raises((DecisionUnknownError, PlatformAnswerLostError)) as failed:
        out.call("__ckpt_commit", [META])
    for name in _READS:
        monkeypatch.setattr(services, name, _gone)
    for args in (["checkpoint abandoned", True], ["the tool died"]):
        with pytest.raises(GroupUncheckedError, match="stays frozen"):
            out.call("__mig_abort", args)
        assert out.checkpoint is not None and not out.committed  # frozen
    assert isinstance(failed.value, DecisionUnknownError), failed.value  # (said: in doubt)
    for name, call in real.items():
        monkeypatch.setattr(services, name, call)
    assert _opens(world, started) is written  # (the probe only reads the gate)
    if written:
        with pytest.raises(CommittedError, match="committed before"):
            out.call("__mig_abort", ["checkpoint abandoned", True])
        assert out.committed
        assert _opens(world, started)
    else:
        out.call("__mig_abort", ["checkpoint abandoned", True])
        assert out.checkpoint is None and not out.committed  # aborted: runs again
        assert not _opens(world, started)
