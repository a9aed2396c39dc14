"""Live migration of enclaves: pre-copy rounds while ECALLs run, then a short freeze.

Real enclave processes under real platform services, the kernel's dirty
tracking, TCP on loopback.  The application keeps writing through ECALLs while
the rounds run; after the commit every acknowledged write is in the destination
enclave.  Faults: the destination killed in a middle round, a tracker that hides
a written page (the source sends the differing segments again; a wrong repair is
refused), a kernel without tracking (fallback).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.register_assert_rewrite("state_helpers")

from state_helpers import (  # noqa: E402
    DestinationDriver,
    Launcher,
    World,
    close_hard,
    fill_kvstore,
    wait_gone,
)

from migsgx.core.rounds import GROUP, StopRules  # noqa: E402
from migsgx.datapath.live import FALLBACK, LiveOutgoingEnclave  # noqa: E402
from migsgx.enclave.dirty import FAULT_ENV  # noqa: E402
from migsgx.errors import MigrationError, MigSGXError, StreamError  # noqa: E402
from migsgx.host.client import EnclaveClient  # noqa: E402
from migsgx.lab.hosts import ServiceProcess, start_service  # noqa: E402
from migsgx.sgx.ca import ProvisioningCA  # noqa: E402
from migsgx.sgx.image import load_author_key, mr_signer_of  # noqa: E402
from migsgx.sgx.platform import EmulatedPlatform  # noqa: E402

pytest_plugins = ["state_helpers"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class Writer:
    """ECALLs in a loop, each put acknowledged before the next: what the client saw."""

    def __init__(self, client: EnclaveClient, value_size: int = 2000) -> None:
        self.client = client
        self.value_size = value_size
        self.acked: dict[str, bytes] = {}
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.during: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            key, value = f"w-{i:06d}", os.urandom(self.value_size)
            try:
                self.client.ecall.put(key, value)
            except BaseException as exc:
                self.errors.append(exc)
                return
            self.acked[key] = value
            i += 1

    def mark(self) -> None:
        self.during.append(len(self.acked))

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


@contextlib.contextmanager
def _extra_host(world: World, name: str, env: str) -> Iterator[ServiceProcess]:
    """A host of the same deployment whose platform (the OS) tracks pages as ``env`` says;
    its platform service stops when the block ends."""

    state = world.root / f"host-{name}"
    if not state.exists():
        signer = mr_signer_of(load_author_key(world.deployment.author_key))
        ca = ProvisioningCA.load(world.deployment.ca_dir)
        EmulatedPlatform.init(state, ca, host_id=name, allowed_signers=[signer])
    service = start_service(state, prefix=["env", f"{FAULT_ENV}={env}"])
    world.services[name] = service
    try:
        yield service
    finally:
        del world.services[name]
        service.stop()


@pytest.fixture
def destination(world: World) -> Iterator[DestinationDriver]:
    dest = DestinationDriver(world.socket("b"), commit_timeout=30.0)
    yield dest
    dest.close()


def _live(
    client: EnclaveClient,
    dest: DestinationDriver,
    rules: StopRules | None = None,
    *,
    driver: type[LiveOutgoingEnclave] = LiveOutgoingEnclave,
    side: socket.socket | None = None,
) -> tuple[LiveOutgoingEnclave, socket.socket]:
    """``client``'s enclave about to move live (over ``side``, default a new side channel),
    and its connection to ``dest``."""

    if side is None:
        side = client.open_side_channel()
    out = driver(side, client.info, client.image_files, peer_timeout=30.0,
                 rules=rules or StopRules(max_rounds=6))  # fmt: skip
    peer = socket.create_connection(dest.address, timeout=10)
    return out, peer


def _attach(client: EnclaveClient, dest: DestinationDriver, launch: Launcher) -> None:
    """The destination committed and runs: the application takes its enclave."""

    dest.join()
    assert dest.active, repr(dest.error)
    assert dest.enclave_sock is not None
    client.reattach(dest.enclave_sock)
    launch.track(dest.pid)


def test_kvstore_moves_live_with_every_acknowledged_write(
    world: World, launch: Launcher, destination: DestinationDriver
) -> None:
    client = launch("kvstore")
    values = fill_kvstore(client)
    writer = Writer(client)
    out, peer = _live(client, destination, StopRules(max_rounds=5, downtime_target=0.0))
    try:
        writer.mark()
        rounds: list[dict[str, object]] = []
        stats = out.precopy(peer, progress=lambda r: (rounds.append(r), writer.mark()))
        assert stats["stop_rule"] in ("max-rounds", "no-convergence", "converged")
        assert len(rounds) >= 2 and rounds[0]["round"] == 0
        # The application's ECALLs were served while the rounds ran.
        assert writer.during[-1] > writer.during[0], writer.during
        assert rounds[0]["pages"] >= (48 << 20) // 4096  # round 0: all used memory
        final = out.finish(client.detach())
        out.commit()
    finally:
        close_hard(peer)
    _attach(client, destination, launch)
    assert final["final"]["verify_seconds"] >= 0
    assert final["destination"]["rounds"]
    writer.mark()
    writer.finish()
    assert not writer.errors, writer.errors
    assert writer.acked
    for key, value in values.items():
        assert client.ecall.get(key) == value
    for key, value in writer.acked.items():
        assert client.ecall.get(key) == value, key
    assert client.info.pid != destination.pid
    assert wait_gone(out.info.pid), "the source enclave still runs after the commit"


def test_destination_killed_in_a_middle_round_leaves_the_source_running(
    world: World, launch: Launcher, destination: DestinationDriver
) -> None:
    client = launch("kvstore")
    values = fill_kvstore(client, count=16)
    writer = Writer(client)
    out, peer = _live(client, destination, StopRules(max_rounds=8, downtime_target=0.0))

    def kill_destination(figures: dict[str, object]) -> None:
        if figures["round"] == 1 and destination.pid is None and destination.incoming:
            info = destination.incoming.info
            assert info is not None
            os.kill(info.pid, signal.SIGKILL)

    try:
        with pytest.raises(MigSGXError):
            out.precopy(peer, progress=kill_destination)
    finally:
        close_hard(peer)
    writer.mark()
    # The source was never frozen: it keeps serving, with its state, and can migrate again.
    with contextlib.suppress(Exception):
        destination.join()
    before = len(writer.acked)
    client.ecall.put("after", b"fault")
    writer.finish()
    assert not writer.errors, writer.errors
    assert len(writer.acked) >= before
    for key, value in values.items():
        assert client.ecall.get(key) == value
    for key, value in list(writer.acked.items())[-50:]:
        assert client.ecall.get(key) == value
    assert client.ecall.get("after") == b"fault"
    assert client.call("__mig_status")["role"] is None


def test_hidden_dirty_page_is_repaired_never_a_silent_difference(
    world: World, launch: Launcher, destination: DestinationDriver
) -> None:
    # The OS of host "h" never reports page 2 as written: a kvstore write lands there.
    with _extra_host(world, "h", "hide=2"):
        client = launch("kvstore", host="h")
        client.ecall.put("first", b"x" * 100)
        out, peer = _live(client, destination, StopRules(max_rounds=2, downtime_target=0.0))
        try:
            out.precopy(peer)
            # After round 0, a write into page 2 (heap offset 8192+), hidden by the tracker.
            client.ecall.put("pad", b"p" * 8192)
            client.ecall.put("hidden", b"h" * 64)
            final = out.finish(client.detach())
            out.commit()
        finally:
            close_hard(peer)
        _attach(client, destination, launch)
        # The destination found page 2's group different; the source sent its segments again.
        assert final["repair"]["segments"] == GROUP, final["repair"]
        assert final["destination"]["repair"]["segments"] == GROUP
        assert client.ecall.get("hidden") == b"h" * 64
        assert client.ecall.get("first") == b"x" * 100
        assert client.ecall.get("pad") == b"p" * 8192


class _WrongRepair(LiveOutgoingEnclave):
    """An untrusted driver that relays another segment than the destination named."""

    def _repair(self, peer: socket.socket, segments: list[Any]) -> dict[str, Any]:
        return super()._repair(peer, [segments[-1] + 1])


def test_hidden_dirty_page_with_a_wrong_repair_is_refused(
    world: World, launch: Launcher, destination: DestinationDriver
) -> None:
    with _extra_host(world, "h", "hide=2"):
        client = launch("kvstore", host="h")
        client.ecall.put("first", b"x" * 100)
        out, peer = _live(client, destination, StopRules(max_rounds=2, downtime_target=0.0),
                          driver=_WrongRepair)  # fmt: skip
        try:
            out.precopy(peer)
            client.ecall.put("pad", b"p" * 8192)
            client.ecall.put("hidden", b"h" * 64)
            with pytest.raises(MigrationError):
                out.finish(client.detach())
        finally:
            close_hard(peer)
        destination.join()
        assert isinstance(destination.error, StreamError), repr(destination.error)
        assert not destination.active
        # The source aborted and runs on with the write the tracker hid.
        client.reattach(out.abort("refused"))
        assert client.ecall.get("hidden") == b"h" * 64
        assert client.ecall.get("first") == b"x" * 100


def test_without_tracking_live_says_so_and_falls_back(
    world: World, launch: Launcher, destination: DestinationDriver
) -> None:
    with _extra_host(world, "u", "unavailable"):
        client = launch("kvstore", host="u")
        values = fill_kvstore(client, count=8)
        out, peer = _live(client, destination)
        try:
            stats = out.precopy(peer)
            assert stats["fallback"] == FALLBACK == "stop-and-copy"
            assert "disabled" in stats["reason"]
            assert out.rounds == []
            final = out.finish(client.detach())
            out.commit()
        finally:
            close_hard(peer)
        _attach(client, destination, launch)
        assert final["memory_bytes"] >= 48 << 20  # everything went in the final transfer
        for key, value in values.items():
            assert client.ecall.get(key) == value


def test_side_channel_closing_mid_rounds_aborts_in_the_enclave(
    world: World, launch: Launcher, destination: DestinationDriver
) -> None:
    # The tool dies after round 0: its side channel closes with nobody to send
    # __mig_abort.  The enclave aborts by itself and keeps serving.
    client = launch("kvstore")
    values = fill_kvstore(client, count=8)
    side = client.open_side_channel()
    out, peer = _live(client, destination, StopRules(max_rounds=6, downtime_target=0.0), side=side)

    def die(figures: dict[str, object]) -> None:
        if figures["round"] == 0:
            side.shutdown(socket.SHUT_RDWR)  # what the kernel does when the tool dies

    try:
        with pytest.raises(MigSGXError):
            out.precopy(peer, progress=die)
    finally:
        close_hard(peer)
    status: dict[str, object] = {}
    for _ in range(100):
        status = client.call("__mig_status")
        if status["role"] is None:
            break
        threading.Event().wait(0.05)
    status.pop("memory_used")  # the enclave's own, intact
    assert status == {"role": None, "committed": False, "handshake_done": False}
    for key, value in values.items():
        assert client.ecall.get(key) == value
    client.ecall.put("after", b"x")
    assert client.ecall.get("after") == b"x"
