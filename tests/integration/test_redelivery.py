"""Window W2: the destination enclave dies after the decision, before it claimed the id.

Real enclave processes on three emulated hosts (a, b, c), TCP on loopback.  The
source on host a commits (its decision is written), the destination enclave on
host b is killed before it judged the COMMIT token.  The committed source
enclave still holds the state, frozen: it delivers it again, same migration id,
attested and keyed anew, to a fresh enclave on host b, and only there (host c's
claim store does not know the id, so a copy there would be a second one).  The
id activates at most once: a further re-delivery to host b is refused.
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

from migsgx.datapath.enclave_link import EnclaveLink  # noqa: E402
from migsgx.datapath.incoming import IncomingEnclave  # noqa: E402
from migsgx.errors import (  # noqa: E402
    CommittedError,
    EnclaveBusyError,
    EnclaveLostError,
    InDoubtError,
    ProtocolError,
)

pytest_plugins = ["state_helpers"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def kill_destination_enclave(inc: IncomingEnclave) -> None:
    """The destination's loaded copy dies before the decision reaches it."""

    assert inc.info is not None
    os.kill(inc.info.pid, signal.SIGKILL)
    assert wait_gone(inc.info.pid)


def test_committed_source_delivers_again_to_the_same_host_once(
    world: World, launch: Launcher
) -> None:
    client = launch("kvstore")
    values = fill_kvstore(client)
    digest = client.ecall.digest()
    source_pid = client.info.pid

    with migration_pair(world, "b", before_commit=kill_destination_enclave) as (dead, _, addr):
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        launch.track(dead.pid)
        run.out.decide()  # the decision is written: the source never runs again
        with pytest.raises(InDoubtError):
            run.out.deliver()
        dead.join()
        assert isinstance(dead.error, EnclaveLostError), repr(dead.error)
    first_token = run.out.token

    # Another host's fresh enclave is refused by the source enclave itself.
    with migration_pair(world, "c") as (elsewhere, _, addr):
        peer = _connect(addr)
        with pytest.raises(InDoubtError, match="host the state was committed to"):
            run.out.redeliver(peer)
        peer.close()
        elsewhere.join()
        launch.track(elsewhere.pid)
        assert not elsewhere.active and elsewhere.enclave_sock is None

    # A fresh enclave on host b gets the state (same migration id) and runs.
    with migration_pair(world, "b") as (fresh, _, addr):
        peer = _connect(addr)
        token = run.out.redeliver(peer)
        peer.close()
        fresh.join()
        launch.track(fresh.pid)
        assert fresh.error is None, fresh.error
        assert fresh.active and fresh.enclave_sock is not None
        assert token != first_token  # a token of the new session
        with pytest.raises((CommittedError, EnclaveBusyError)):
            run.out.link.call("digest")  # the source still never runs
        client.reattach(fresh.enclave_sock)
        fresh.enclave_sock = None
    assert_kvstore_intact(client, digest, values)

    # The id activated once on host b: a further re-delivery there is refused.
    with migration_pair(world, "b") as (again, _, addr):
        peer = _connect(addr)
        with pytest.raises(InDoubtError):
            run.out.redeliver(peer)
        peer.close()
        again.join()
        launch.track(again.pid)
        assert not again.active
    assert_kvstore_intact(client, digest, values)

    run.out.release()
    assert wait_gone(source_pid), "the released source enclave still runs"


def _connect(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=10)


def test_only_a_committed_source_delivers_again(world: World, launch: Launcher) -> None:
    """An enclave that runs (or aborted its migration) has no state to hand out again."""

    client = launch("kvstore")
    fill_kvstore(client, count=4)
    link = EnclaveLink(client.detach())
    with pytest.raises(ProtocolError):
        link.call("__mig_redeliver_start")
    client.reattach(link.sock)
    digest = client.ecall.digest()

    with migration_pair(world, "b") as (dest, _, addr):
        run = start_transfer(client, addr)  # LOADED, not decided
        assert run.error is None, run.error
        launch.track(dest.pid)
        with pytest.raises(ProtocolError):
            run.out.link.call("__mig_redeliver_start")
        run.resume("the test gives up")
        dest.join()
    assert client.ecall.digest() == digest  # the source runs on, unchanged
