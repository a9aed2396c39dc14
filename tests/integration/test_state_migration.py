"""Enclave state migration end to end: two hosts, real enclave processes, TCP on loopback.

The application detaches its enclave, ``OutgoingEnclave`` hands the state to an
``IncomingEnclave`` on host b, the source commits, and the application
reattaches to the destination enclave: same state, ECALLs carry on, the source
enclave process is gone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import cbor2
import pytest

pytest.register_assert_rewrite("state_helpers")

from state_helpers import (  # noqa: E402
    D2S,
    KIB,
    MIB,
    S2D,
    Launcher,
    SourceRun,
    TamperingProxy,
    World,
    assert_kvstore_intact,
    close_hard,
    fill_kvstore,
    hs_message,
    kill_quietly,
    migration_pair,
    pid_running,
    replay_into,
    shared_launcher,
    start_driver_process,
    start_transfer,
    wait_gone,
)

from migsgx.datapath.enclave_link import EnclaveLink  # noqa: E402
from migsgx.datapath.incoming import IncomingEnclave  # noqa: E402
from migsgx.errors import (  # noqa: E402
    CommittedError,
    EnclaveBusyError,
    EnclaveLostError,
    MigSGXError,
    ReplayError,
)
from migsgx.lab.hosts import start_service  # noqa: E402

pytest_plugins = ["state_helpers"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MODES = ("pipelined", "sequential")


def refuses_ecalls_before_commit(inc: IncomingEnclave) -> None:
    """The holder of the destination enclave cannot use it until the source commits."""

    assert inc.link is not None
    with pytest.raises(EnclaveBusyError):
        inc.link.call("digest")
    status = inc.link.call("__mig_status")
    assert isinstance(status.pop("memory_used"), int)
    assert status == {"role": "destination", "committed": False, "handshake_done": True}


def check_source_gone(link: EnclaveLink, pid: int) -> None:
    assert wait_gone(pid), f"the source enclave process {pid} still runs after COMMIT"
    with pytest.raises((EnclaveLostError, CommittedError)):
        link.call("digest")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [64 * KIB, 256 * KIB, 1 * MIB])
def test_kvstore_migrates(world: World, launch, mode: str, chunk_size: int) -> None:
    client = launch("kvstore")
    values = fill_kvstore(client)
    digest = client.ecall.digest()
    assert client.ecall.stats()["keys"] == len(values)
    source_pid = client.info.pid

    with migration_pair(world, before_commit=refuses_ecalls_before_commit) as (dest, _, addr):
        run = start_transfer(client, addr, mode=mode, chunk_size=chunk_size)
        assert run.error is None, run.error
        assert dest.loaded.wait(10)
        launch.track(dest.pid)
        assert run.stats is not None
        assert run.stats["mode"] == mode and run.stats["chunk_bytes"] == chunk_size
        assert run.stats["memory_bytes"] >= 48 * MIB
        # Sequential: the source's staging buffer was faulted in from the handshake on
        # (stopped once the state is sent, so how far it came depends on the machine).
        staged = run.stats["staging_prefaulted_bytes"]
        assert staged > 0 if mode == "sequential" else staged == 0
        # The destination answered the handshake once its memory was faulted in.
        assert run.stats["destination"]["prefault_done_before_freeze"] is True
        run.commit()
        dest.join()
        assert dest.error is None, dest.error
        assert dest.enclave_sock is not None
        check_source_gone(run.out.link, source_pid)
        client.reattach(dest.enclave_sock)
        dest.enclave_sock = None

    assert client.info.pid == source_pid  # the handle keeps its launch-time info
    assert dest.pid is not None and dest.pid != source_pid
    assert_kvstore_intact(client, digest, values)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [64 * KIB, 1 * MIB])
def test_model_migrates(world: World, launch, mode: str, chunk_size: int) -> None:
    client = launch("model")
    digest = client.ecall.generate(1024, 1024, 7)  # 4 MiB of secret weights
    x = [0.5] * 1024
    before = client.ecall.predict(x)
    source_pid = client.info.pid

    with migration_pair(world, before_commit=refuses_ecalls_before_commit) as (dest, _, addr):
        run = start_transfer(client, addr, mode=mode, chunk_size=chunk_size)
        assert run.error is None, run.error
        launch.track(dest.pid)
        assert run.stats is not None and run.stats["memory_bytes"] == 4 * MIB
        run.commit()
        dest.join()
        assert dest.error is None, dest.error
        check_source_gone(run.out.link, source_pid)
        assert dest.enclave_sock is not None
        client.reattach(dest.enclave_sock)
        dest.enclave_sock = None

    assert client.ecall.digest() == digest
    assert client.ecall.predict(x) == before
    assert client.ecall.info() == {"shape": [1024, 1024], "served": 2}


# --- crashes in the middle of a transfer ---------------------------------------------------
BIG_ROWS, BIG_COLS = 65536, 1024  # 256 MiB of weights: about 1000 chunks of 256 KiB
HOLD_AT = 200  # the proxy holds the stream back here, a fifth of the way


class BigModel:
    """A model enclave with 256 MiB of weights, shared by the tests it survives."""

    def __init__(self, launcher: Launcher) -> None:
        self.client = launcher("model")
        self.digest = self.client.ecall.generate(BIG_ROWS, BIG_COLS, 11)
        self.pid = self.client.info.pid

    def transfer(self, address: tuple[str, int]) -> SourceRun:
        self.last_run = start_transfer(self.client, address)
        return self.last_run

    def recover(self) -> None:
        """After a test that failed half-way: the model runs again, whatever happened."""

        run = getattr(self, "last_run", None)
        if run is not None and self.client.detached:
            with contextlib.suppress(MigSGXError):
                run.resume("cleanup after a failed test")

    def assert_intact(self) -> None:
        assert pid_running(self.pid)
        assert self.client.ecall.digest() == self.digest
        assert self.client.ecall.info()["shape"] == [BIG_ROWS, BIG_COLS]
        assert len(self.client.ecall.predict([1.0] * BIG_COLS)) == 16


@pytest.fixture(scope="module")
def shared_big_model(world: World) -> Iterator[BigModel]:
    with shared_launcher(world) as launcher:
        model = BigModel(launcher)
        world.shared.add(model.pid)
        yield model


@pytest.fixture
def big_model(shared_big_model: BigModel) -> Iterator[BigModel]:
    yield shared_big_model
    shared_big_model.recover()


def test_source_enclave_killed_mid_stream(world: World, launch: Launcher) -> None:
    before = world.enclave_pids()
    doomed = BigModel(launch)
    with migration_pair(world, proxy={"hold_at": HOLD_AT}) as (dest, mitm, addr):
        assert mitm is not None
        box: dict[str, object] = {}
        mover = threading.Thread(
            target=lambda: box.setdefault("run", start_transfer(doomed.client, addr)),
            daemon=True,
        )
        mover.start()
        assert mitm.held.wait(20), "the stream did not reach the hold point"
        (accept,) = mitm.frames_of(D2S, "accept")
        launch.track(accept["pid"])
        kill_quietly(doomed.pid)
        assert wait_gone(doomed.pid)
        mitm.release()
        mover.join(30)
        assert not mover.is_alive()
        run = box["run"]
        assert isinstance(run, SourceRun)
        assert isinstance(run.error, EnclaveLostError), repr(run.error)
        close_hard(run.peer)
        dest.join()
        assert isinstance(dest.error, MigSGXError), repr(dest.error)
        assert not dest.active and dest.enclave_sock is None
        assert wait_gone(accept["pid"]), "the destination enclave outlived the failed transfer"
    # The source's state died with its enclave, as in any enclave crash.
    run.client.reattach(run.out.abort("the source enclave is gone"))
    with pytest.raises(EnclaveLostError):
        run.client.ecall.digest()
    assert world.enclave_pids() <= before, "an enclave process is left running"


def test_destination_enclave_killed_mid_load(world: World, big_model: BigModel) -> None:
    with migration_pair(world, proxy={"hold_at": HOLD_AT}) as (dest, mitm, addr):
        assert mitm is not None
        box: dict[str, object] = {}
        mover = threading.Thread(
            target=lambda: box.setdefault("run", big_model.transfer(addr)),
            daemon=True,
        )
        mover.start()
        assert mitm.held.wait(20), "the stream did not reach the hold point"
        (accept,) = mitm.frames_of(D2S, "accept")
        kill_quietly(accept["pid"])
        assert wait_gone(accept["pid"])
        mitm.release()
        mover.join(30)
        assert not mover.is_alive()
        run = box["run"]
        assert isinstance(run, SourceRun)
        assert isinstance(run.error, MigSGXError), repr(run.error)
        dest.join()
        assert isinstance(dest.error, EnclaveLostError), repr(dest.error)
        assert not dest.active
        run.resume()
    big_model.assert_intact()


def test_destination_driver_killed_mid_transfer(world: World, big_model: BigModel) -> None:
    driver, driver_addr = start_driver_process(world.socket("b"))
    try:
        with TamperingProxy(driver_addr, hold_at=HOLD_AT) as mitm:
            box: dict[str, object] = {}
            mover = threading.Thread(
                target=lambda: box.setdefault("run", big_model.transfer(mitm.address)),
                daemon=True,
            )
            mover.start()
            assert mitm.held.wait(20), "the stream did not reach the hold point"
            (accept,) = mitm.frames_of(D2S, "accept")
            driver.kill()
            driver.wait(10)
            mitm.release()
            mover.join(30)
            assert not mover.is_alive()
            run = box["run"]
            assert isinstance(run, SourceRun)
            assert isinstance(run.error, MigSGXError), repr(run.error)
            assert wait_gone(accept["pid"]), "the destination enclave outlived its driver"
            run.resume()
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(10)
        for pipe in (driver.stdout, driver.stderr):
            if pipe is not None:
                pipe.close()
    big_model.assert_intact()


# --- exactly once ---------------------------------------------------------------------------
def test_migration_id_is_accepted_once(world: World, launch: Launcher) -> None:
    """A recorded migration replayed into its destination host is refused, across restarts."""

    client = launch("kvstore")
    values = fill_kvstore(client)
    digest = client.ecall.digest()
    with migration_pair(world, "c", proxy={}) as (dest, mitm, addr):
        assert mitm is not None
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        launch.track(dest.pid)
        run.commit()
        dest.join()
        assert dest.active and dest.enclave_sock is not None
        client.reattach(dest.enclave_sock)
        dest.enclave_sock = None
    assert_kvstore_intact(client, digest, values)
    recorded = bytes(mitm.captured[S2D])
    hello = hs_message(mitm.frames_of(S2D, "hs")[0])
    assert hello is not None and hello["t"] == "source-hello"
    state = world.deployment.hosts[2]
    claims = cbor2.loads((state / "counters.cbor").read_bytes())["claims"]
    assert [c for c in claims if c.endswith(b"/" + hello["mid"])], "the id was not claimed"

    replayed = replay_into(world.socket("c"), recorded)
    assert isinstance(replayed.error, ReplayError), repr(replayed.error)
    assert not replayed.active

    # The claim store is durable: a restarted platform service still refuses it.
    world.services["c"].stop()
    world.services["c"] = start_service(state)
    replayed = replay_into(world.socket("c"), recorded)
    assert isinstance(replayed.error, ReplayError), repr(replayed.error)
    assert not replayed.active
