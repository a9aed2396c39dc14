"""The way back from a COMMIT the destination never acted on (``docs/spec/commit.md``, 2.2).

Real enclave processes and platform services on emulated hosts a and b, TCP on
loopback.  The source on host a commits (its decision is written) and its
destination's loaded copy dies before it claimed the id.  Instead of the state,
a re-delivery offers mode ``refuse``: a fresh enclave on host b refuses the id
in b's claim store and answers REFUSED; the source enclave verifies it, its
store's decision becomes ``revoked`` with its persistent record re-opened, and
it runs on with every write, its counters and sealed data intact.  Host b never
runs the id afterwards.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

pytest.register_assert_rewrite("state_helpers")

from state_helpers import (  # noqa: E402
    Launcher,
    World,
    assert_kvstore_intact,
    fill_kvstore,
    migration_pair,
    start_transfer,
    wait_gone,
)

from migsgx.datapath.incoming import IncomingEnclave  # noqa: E402
from migsgx.errors import InDoubtError  # noqa: E402
from migsgx.sgx.counters import CounterStore  # noqa: E402

pytest_plugins = ["state_helpers"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def kill_destination_enclave(inc: IncomingEnclave) -> None:
    assert inc.info is not None
    os.kill(inc.info.pid, signal.SIGKILL)
    assert wait_gone(inc.info.pid)


def _store(world: World, host: str) -> CounterStore:
    return CounterStore(world.services[host].state / "counters.cbor")


def test_a_committed_source_runs_again_on_the_destinations_refusal(
    world: World, launch: Launcher
) -> None:
    client = launch("kvstore")
    name = f"refuse-{os.getpid()}"
    assert client.ecall.open_persistent(name)
    client.ecall.mcounter_create("c", 41)
    values = fill_kvstore(client, count=16)
    blob = client.ecall.seal_value_migratable("key-001")
    digest = client.ecall.digest()

    with migration_pair(world, "b", before_commit=kill_destination_enclave) as (dead, _, addr):
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        launch.track(dead.pid)
        run.out.decide()  # the decision is written: the source's state is given up
        with pytest.raises(InDoubtError):
            run.out.deliver()
        dead.join()
    mid = run.out.migration_id
    held = _store(world, "a").decision(mid)
    assert held is not None and held.kind == "commit"

    with migration_pair(world, "b") as (fresh, _, addr):
        peer = socket.create_connection(addr, timeout=10)
        run.out.revoke(peer)
        peer.close()
        fresh.join()
        launch.track(fresh.pid)
        assert fresh.error is None, fresh.error
        assert fresh.incoming is not None and fresh.incoming.refused and not fresh.active
    assert _store(world, "b").refused(mid)
    assert not _store(world, "b").claimed_by_any(mid)
    held = _store(world, "a").decision(mid)
    assert held is not None and held.kind == "revoked"

    # The source enclave runs again, with every write and its persistent state.
    client.reattach(run.out.link.sock)
    assert_kvstore_intact(client, digest, values)
    client.ecall.delete("key-001")
    client.ecall.unseal_value_migratable("key-001", blob)  # (sealed before the commit)
    assert client.ecall.get("key-001") == values["key-001"]
    assert client.ecall.mcounter_read("c") == 41
    assert client.ecall.mcounter_increment("c") == 42

    # The id never activates on b, and the refusing enclave is gone.
    assert _store(world, "b").claim(b"S" + bytes(34), mid) is False
    assert fresh.pid is not None and wait_gone(fresh.pid), "the refusing enclave still runs"
