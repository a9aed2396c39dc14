"""Attacks on a migration by the untrusted side: the network and the hosts' drivers.

A :class:`~state_helpers.TamperingProxy` sits on the real TCP connection between
``OutgoingEnclave`` and ``IncomingEnclave`` and changes what it likes.  Every
attack must end in a typed error, the destination enclave must never run with
the state, and the source enclave must carry on with its state unchanged.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.register_assert_rewrite("state_helpers")

from state_helpers import (  # noqa: E402
    CUT,
    D2S,
    S2D,
    Chunk,
    DestinationDriver,
    SourceRun,
    TamperingProxy,
    World,
    add_foreign_host,
    assert_kvstore_intact,
    close_hard,
    fill_kvstore,
    hs_frame,
    hs_message,
    kill_quietly,
    migration_pair,
    peer_frame,
    pid_running,
    replay_into,
    shared_launcher,
    start_transfer,
    wait_gone,
)

from migsgx.core.commit import CommitError  # noqa: E402
from migsgx.core.handshake import (  # noqa: E402
    KeyConfirmationError,
    LocalProtocolError,
    ReportDataError,
)
from migsgx.datapath.incoming import IncomingEnclave  # noqa: E402
from migsgx.datapath.outgoing import OutgoingEnclave  # noqa: E402
from migsgx.errors import (  # noqa: E402
    AttestationError,
    AwaitingDecisionError,
    ConnectionClosedError,
    EnclaveBusyError,
    FrameError,
    MigrationError,
    MigSGXError,
    PolicyError,
    ProtocolError,
    ReplayError,
    StreamError,
    UnknownCAError,
)
from migsgx.lab.hosts import start_service  # noqa: E402

pytest_plugins = ["state_helpers"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MODES = ("pipelined", "sequential")
# Chunk frames of a kvstore transfer: 0 manifest header, 1 manifest, 2 state header,
# 3 state, 4 memory header, 5... memory (192 chunks of 256 KiB), the last one final.
TARGET = 9
#: Seconds a destination driver waits for a decision that cannot come (the driver's
#: ``commit_timeout``; its default 20 s bounds the cells where one does come).
COMMIT_WAIT = 6.0


class Source:
    """A kvstore enclave with a known state, launched on host a."""

    def __init__(self, launch: Any, image: str = "kvstore") -> None:
        self.client = launch(image)
        self.values = fill_kvstore(self.client)
        self.digest = self.client.ecall.digest()
        self.pid = self.client.info.pid

    def transfer(self, address: tuple[str, int], **kwargs: Any) -> SourceRun:
        self.last_run = start_transfer(self.client, address, **kwargs)
        return self.last_run

    def recover(self) -> None:
        """After a test that failed half-way: the source runs again, whatever happened."""

        run = getattr(self, "last_run", None)
        if run is not None and self.client.detached:
            with contextlib.suppress(MigSGXError):
                run.resume("cleanup after a failed test")

    def assert_intact(self, run: SourceRun) -> None:
        """After the failed migration the source runs on with exactly its state."""

        run.resume()
        assert pid_running(self.pid)
        assert_kvstore_intact(self.client, self.digest, self.values)


@pytest.fixture
def own_source(launch: Any) -> Source:
    """A source of its own, for the tests after which it no longer runs here."""

    return Source(launch)


@pytest.fixture(scope="module")
def shared_source(world: World) -> Iterator[Source]:
    with shared_launcher(world) as launcher:
        shared = Source(launcher)
        world.shared.add(shared.pid)
        yield shared


@pytest.fixture
def source(shared_source: Source) -> Iterator[Source]:
    """One source for every attack it survives: each one starts from the same state."""

    yield shared_source
    shared_source.recover()


def assert_never_active(dest: DestinationDriver) -> None:
    dest.join()
    assert not dest.active and dest.enclave_sock is None
    if dest.pid is not None:
        assert wait_gone(dest.pid), "the refused destination enclave still runs"


def assert_refused_and_still_waiting(dest: DestinationDriver, error: type[Exception]) -> None:
    """The destination enclave refused a forged decision and still waits for the real one."""

    assert dest.loaded.wait(10)
    inc = dest.incoming
    assert inc is not None
    deadline = time.monotonic() + 10
    while not inc.rejected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inc.rejected and isinstance(inc.rejected[0], error), inc.rejected
    assert not dest.done.is_set() and not dest.active
    link = inc.link
    assert link is not None
    assert link.call("__mig_status")["role"] == "destination"
    with pytest.raises(EnclaveBusyError):
        link.call("digest")


def assert_discarded_on_authentic_abort(dest: DestinationDriver) -> None:
    """The source's own (authenticated) ABORT ends the wait: the copy is discarded."""

    dest.join()
    assert type(dest.error) is MigrationError and "source aborted" in str(dest.error)
    assert_never_active(dest)


def run_attack(
    world: World,
    source: Source,
    launch: Any,
    *,
    mode: str = "pipelined",
    dest_host: str = "b",
    **proxy: Any,
) -> tuple[SourceRun, DestinationDriver, TamperingProxy]:
    with migration_pair(world, dest_host, proxy=proxy) as (dest, mitm, addr):
        assert mitm is not None
        run = source.transfer(addr, mode=mode)
        # Whatever happened, the source does not commit here: if it saw no error, the
        # attack went through, which the caller's assertions on ``run.error`` catch.
        close_hard(run.peer)
        dest.join()
        launch.track(dest.pid)
    return run, dest, mitm


def flip_bit(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at % len(out)] ^= 0x10
    return bytes(out)


# --- the state stream ------------------------------------------------------------------
def _flip(proxy: TamperingProxy, chunk: Chunk) -> Any:
    return chunk.frame(payload=flip_bit(chunk.payload, 1000)) if chunk.index == TARGET else None


def _cut_before_final(proxy: TamperingProxy, chunk: Chunk) -> Any:
    return CUT if chunk.final else None


def _final_early_then_end(proxy: TamperingProxy, chunk: Chunk) -> Any:
    # Mark a chunk final and end the transfer there: a stream cut short, cleanly.
    if chunk.index == TARGET:
        return chunk.frame(final=True)
    return b"" if chunk.index > TARGET else None


def _append_behind_final(proxy: TamperingProxy, chunk: Chunk) -> Any:
    # The transfer ends where it should, and one more chunk frame comes after it.
    if chunk.final:
        return chunk.frame() + proxy.chunks[TARGET].frame(final=False)
    return None


# Every attack on the stream also runs in memory, in milliseconds, with the real
# trusted halves and rings (tests/unit/test_peer.py).  These keep the ones whose
# outcome depends on the real connection and the engine's movers: a tampered
# chunk through both movers, a connection cut before the final chunk, a stream
# cut short cleanly, and bytes behind the final chunk (seen on the socket).
STREAM_ATTACKS = {
    "bit-flip": (_flip, StreamError),
    "cut-before-final": (_cut_before_final, ConnectionClosedError),
    "final-flag-early-and-end": (_final_early_then_end, StreamError),
    "append-behind-final": (_append_behind_final, StreamError),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", list(STREAM_ATTACKS))
def test_stream_tampering_is_refused(
    world: World, source: Source, launch: Any, attack: str, mode: str
) -> None:
    """The proxy changes the chunk frames of the state stream on their way."""

    hook, expected = STREAM_ATTACKS[attack]
    run, dest, _ = run_attack(world, source, launch, mode=mode, on_chunk=hook)
    assert isinstance(dest.error, expected), repr(dest.error)
    assert isinstance(run.error, MigSGXError), repr(run.error)
    assert_never_active(dest)
    source.assert_intact(run)


# --- the handshake ---------------------------------------------------------------------
def _replace_share(kind: str) -> Any:
    def hook(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        inner = hs_message(msg)
        if inner is None or inner["t"] != kind:
            return None
        inner["share"] = os.urandom(32)  # the adversary's own ephemeral key
        return peer_frame(hs_frame(inner))

    return hook


def test_source_key_share_replaced(world: World, source: Source, launch: Any) -> None:
    """The adversary puts its own ephemeral key into the source's hello."""

    run, dest, _ = run_attack(world, source, launch, on_frame=_replace_share("source-hello"))
    assert isinstance(dest.error, ReportDataError), repr(dest.error)
    assert isinstance(run.error, MigrationError), repr(run.error)
    assert_never_active(dest)
    source.assert_intact(run)


def test_destination_key_share_replaced(world: World, source: Source, launch: Any) -> None:
    """The adversary puts its own ephemeral key into the destination's hello."""

    run, dest, _ = run_attack(world, source, launch, on_frame=_replace_share("destination-hello"))
    assert isinstance(run.error, ReportDataError), repr(run.error)
    assert dest.error is not None
    assert_never_active(dest)
    source.assert_intact(run)


def test_destination_hello_from_another_session(world: World, source: Source, launch: Any) -> None:
    """A destination hello recorded from an earlier handshake is spliced into this one."""

    first, _, mitm1 = run_attack(world, source, launch, on_chunk=_flip)
    source.assert_intact(first)
    (recorded,) = [m for m in mitm1.frames_of(D2S, "hs")]

    def splice(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        return peer_frame(recorded) if direction == D2S and msg["t"] == "hs" else None

    run, dest, _ = run_attack(world, source, launch, on_frame=splice)
    assert isinstance(run.error, ReportDataError), repr(run.error)
    assert_never_active(dest)
    source.assert_intact(run)


# --- replays and the commit ------------------------------------------------------------
def record_migration(
    world: World, source: Source, launch: Any, *, commit: bool
) -> tuple[TamperingProxy, DestinationDriver, SourceRun]:
    with migration_pair(world, proxy={}) as (dest, mitm, addr):
        assert mitm is not None
        run = source.transfer(addr)
        assert run.error is None, run.error
        launch.track(dest.pid)
        if commit:
            run.commit()
            dest.join()
            assert dest.active and dest.enclave_sock is not None
            source.client.reattach(dest.enclave_sock)
            dest.enclave_sock = None
        else:
            run.resume()
            dest.join()
    return mitm, dest, run


def test_replayed_stream_into_new_destination(world: World, source: Source, launch: Any) -> None:
    """A recorded migration (the source's bytes) replayed into a fresh destination host."""

    mitm, _, _ = record_migration(world, source, launch, commit=False)
    dest = replay_into(world.socket("c"), bytes(mitm.captured[S2D]))
    launch.track(dest.pid)
    assert isinstance(dest.error, KeyConfirmationError), repr(dest.error)
    assert_never_active(dest)
    assert_kvstore_intact(source.client, source.digest, source.values)


def test_commit_token_twice_and_elsewhere(world: World, own_source: Source, launch: Any) -> None:
    """The COMMIT token of one migration: again to its destination, then to another one."""

    mitm, _, _ = record_migration(world, own_source, launch, commit=True)
    (commit,) = mitm.frames_of(S2D, "commit")
    token = commit["token"]
    assert_kvstore_intact(own_source.client, own_source.digest, own_source.values)

    # Twice: the destination is active, the same token again changes nothing.
    with pytest.raises(ReplayError):
        own_source.client.call("__mig_commit_in", token)
    assert_kvstore_intact(own_source.client, own_source.digest, own_source.values)

    # Elsewhere: a second migration waits for its own token and gets this one.
    other = Source(launch)

    def inject(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        if direction == D2S and msg["t"] == "loaded":
            proxy.send(S2D, peer_frame({"t": "commit", "token": token}))
        return None

    with migration_pair(world, proxy={"on_frame": inject}) as (dest, _mitm, addr):
        run = other.transfer(addr)
        assert run.error is None, run.error  # the source saw a genuine LOADED
        assert_refused_and_still_waiting(dest, CommitError)
        other.assert_intact(run)
        assert_discarded_on_authentic_abort(dest)


def test_forged_loaded(world: World, source: Source, launch: Any) -> None:
    """A LOADED frame altered on the way never makes the source give up its state."""

    def forge(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        if direction == D2S and msg["t"] == "loaded":
            msg["frame"] = flip_bit(msg["frame"], len(msg["frame"]) - 3)
            return peer_frame(msg)
        return None

    run, dest, _ = run_attack(world, source, launch, on_frame=forge)
    assert isinstance(run.error, CommitError), repr(run.error)
    assert_never_active(dest)
    source.assert_intact(run)


def test_loaded_from_another_migration(world: World, source: Source, launch: Any) -> None:
    """A genuine LOADED recorded from an earlier migration, spliced into this one."""

    mitm, _, _ = record_migration(world, source, launch, commit=False)
    (old,) = mitm.frames_of(D2S, "loaded")

    def splice(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        return peer_frame(old) if direction == D2S and msg["t"] == "loaded" else None

    run, dest, _ = run_attack(world, source, launch, on_frame=splice)
    assert isinstance(run.error, CommitError), repr(run.error)
    assert_never_active(dest)
    source.assert_intact(run)


def test_forged_commit(world: World, source: Source, launch: Any) -> None:
    """The network makes up a COMMIT token before the source decided anything."""

    def inject(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        if direction == D2S and msg["t"] == "loaded":
            proxy.send(S2D, peer_frame({"t": "commit", "token": flip_bit(msg["frame"], 40)}))
        return None

    with migration_pair(world, proxy={"on_frame": inject}) as (dest, _mitm, addr):
        run = source.transfer(addr)
        assert run.error is None, run.error
        assert_refused_and_still_waiting(dest, CommitError)
        source.assert_intact(run)
        assert_discarded_on_authentic_abort(dest)


def test_forged_abort_does_not_discard_the_waiting_destination(
    world: World, own_source: Source, launch: Any
) -> None:
    """An unauthenticated ABORT must not talk a destination out of waiting for the token.

    The source commits (its state is gone); if the destination dropped its copy on
    the forged ABORT, the state would be lost with it.
    """

    def inject(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        if direction == S2D and msg["t"] == "commit":
            forged = {"t": "abort", "code": "aborted", "message": "forged", "frame": b""}
            return peer_frame(forged) + raw
        return None

    with migration_pair(world, proxy={"on_frame": inject}) as (dest, _mitm, addr):
        run = own_source.transfer(addr)
        assert run.error is None, run.error
        launch.track(dest.pid)
        run.out.commit()
        dest.join()
        assert dest.active, repr(dest.error)
        assert dest.enclave_sock is not None
        own_source.client.reattach(dest.enclave_sock)
        dest.enclave_sock = None
    assert_kvstore_intact(own_source.client, own_source.digest, own_source.values)


def test_loaded_delivered_twice(world: World, own_source: Source, launch: Any) -> None:
    """A LOADED frame repeated by the network changes nothing: one commit, one live copy."""

    def twice(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        return raw * 2 if direction == D2S and msg["t"] == "loaded" else None

    with migration_pair(world, proxy={"on_frame": twice}) as (dest, _mitm, addr):
        run = own_source.transfer(addr)
        assert run.error is None, run.error
        launch.track(dest.pid)
        run.commit()
        dest.join()
        assert dest.active and dest.enclave_sock is not None, dest.error
        assert wait_gone(own_source.pid)
        own_source.client.reattach(dest.enclave_sock)
        dest.enclave_sock = None
    assert_kvstore_intact(own_source.client, own_source.digest, own_source.values)


def test_offer_with_another_chunk_size(world: World, source: Source, launch: Any) -> None:
    """The destination is told a smaller chunk size than the source seals with."""

    def shrink(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        if direction == S2D and msg["t"] == "offer":
            msg["chunk_size"] = msg["chunk_size"] // 4
            return peer_frame(msg)
        return None

    run, dest, _ = run_attack(world, source, launch, on_frame=shrink)
    assert isinstance(dest.error, FrameError), repr(dest.error)
    assert isinstance(run.error, MigSGXError), repr(run.error)
    assert_never_active(dest)
    source.assert_intact(run)


# --- a hostile destination driver -----------------------------------------------------------
def test_aborted_destination_never_runs_with_the_state(world: World, launch: Any) -> None:
    """The destination's driver gives up after LOADED and tries to run the loaded copy.

    The source aborts and runs on; the destination enclave holds the state in its
    memory.  Whatever its driver asks afterwards, that copy must never run.
    """

    secret = os.urandom(24).hex().encode()
    vault = launch("vault")
    vault.ecall.write(secret)
    captured: dict[str, Any] = {}

    def hostile(inc: IncomingEnclave) -> None:
        assert inc.link is not None
        link = inc.link
        captured["link"] = link
        with pytest.raises(EnclaveBusyError):
            link.call("read")
        # Give up the migration, then go out and in again as a "source" to be let in.
        for call in (("__mig_abort", "hostile driver"), ("__mig_out_start",), ("__mig_abort", "x")):
            try:
                link.call(*call)
            except MigSGXError as exc:
                captured.setdefault("refused", []).append(exc)
        try:
            captured["read"] = link.call("read")
        except MigSGXError as exc:
            captured["read_error"] = exc
        raise MigrationError("the hostile driver stops here")

    with migration_pair(world, before_commit=hostile) as (dest, _mitm, addr):
        run = start_transfer(vault, addr)
        assert run.error is None, run.error
        launch.track(dest.pid)
        dest.done.wait(10)
        run.resume()
        assert vault.ecall.read() == secret
        assert "read" not in captured, "the aborted destination ran with the migrated secret"
        assert isinstance(captured.get("read_error"), EnclaveBusyError)
        # After LOADED its driver cannot discard it (only the source's decision can), nor
        # make it migrate out (and back to life).
        refused = captured.get("refused", [])
        assert len(refused) == 3, captured
        assert isinstance(refused[0], AwaitingDecisionError)
        assert isinstance(refused[2], AwaitingDecisionError)
        close_hard(captured["link"].sock)


# --- identities --------------------------------------------------------------------------------
def _offer_files(files: dict[str, bytes]) -> Any:
    def hook(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        if direction == S2D and msg["t"] == "offer":
            msg["files"] = files
            return peer_frame(msg)
        return None

    return hook


@pytest.mark.parametrize(
    ("image", "refused_by", "why"),
    [
        ("kv-other-code", "destination", "MRENCLAVE"),  # one byte of code differs
        ("kv-other-code-signer", "source", "MRENCLAVE"),  # ... and it would take the source
        ("kv-debug", "source", "debug"),  # a debug build that would take the source
    ],
)
def test_destination_with_another_identity(
    world: World, source: Source, launch: Any, image: str, refused_by: str, why: str
) -> None:
    """The network swaps the image in the offer: the destination runs other code."""

    assert world.image(image).measure() != world.image("kvstore").measure()
    files = world.image(image).files
    run, dest, _ = run_attack(world, source, launch, on_frame=_offer_files(files))
    refusal = run.error if refused_by == "source" else dest.error
    assert isinstance(refusal, PolicyError), repr(refusal)
    assert why in str(refusal)
    assert isinstance(run.error, MigrationError), repr(run.error)
    assert_never_active(dest)
    source.assert_intact(run)


def test_destination_with_lower_svn(world: World, launch: Any) -> None:
    """Same signer and product, but an older build (ISVSVN 1 < 2) as destination."""

    src = Source(launch, "kv-signer-svn2")  # same-signer policy, ISVSVN 2
    files = world.image("kv-signer-svn1").files
    run, dest, _ = run_attack(world, src, launch, on_frame=_offer_files(files))
    assert isinstance(dest.error, PolicyError), repr(dest.error)
    assert "ISVSVN" in str(dest.error)
    assert_never_active(dest)
    src.assert_intact(run)


@pytest.mark.parametrize("rogue", [False, True], ids=["foreign-ca", "rogue-trusts-both"])
def test_destination_from_another_ca(
    world: World, source: Source, launch: Any, rogue: bool
) -> None:
    """The destination host's platform chains its quotes to another provisioning CA."""

    name = "y" if rogue else "x"
    state = add_foreign_host(world, name, also_trust_deployment=rogue)
    service = start_service(state)
    world.services[name] = service
    try:
        run, dest, _ = run_attack(world, source, launch, dest_host=name, on_frame=None)
        if rogue:
            assert isinstance(run.error, UnknownCAError), repr(run.error)
        else:
            assert isinstance(dest.error, UnknownCAError), repr(dest.error)
            assert isinstance(run.error, MigrationError), repr(run.error)
        assert isinstance(run.error, (AttestationError, MigrationError))
        assert_never_active(dest)
        source.assert_intact(run)
    finally:
        del world.services[name]
        service.stop()


def test_source_driver_cannot_commit_before_loaded(
    world: World, source: Source, launch: Any
) -> None:
    """A hostile source driver asks its enclave for the COMMIT token before LOADED."""

    def withhold(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        if direction == D2S and msg["t"] == "loaded":
            proxy.held.set()
            return b""
        return None

    # No decision can reach the destination (no LOADED, then no connection): it keeps its
    # copy in doubt until its wait for one ends, which is shortened (the driver's bound).
    with migration_pair(world, proxy={"on_frame": withhold}, commit_timeout=COMMIT_WAIT) as (
        dest, mitm, addr,
    ):  # fmt: skip
        assert mitm is not None
        out = OutgoingEnclave(
            source.client.detach(), source.client.info, source.client.image_files,
            peer_timeout=20,
        )  # fmt: skip
        peer = socket.create_connection(addr)
        source.last_run = SourceRun(source.client, out, peer)  # for recover() on failure
        errors: list[BaseException] = []

        def transfer() -> None:
            try:
                out.transfer(peer)
            except BaseException as exc:
                errors.append(exc)

        mover = threading.Thread(target=transfer, daemon=True)
        mover.start()
        assert mitm.held.wait(20), "no LOADED came"
        launch.track(dest.pid)
        # The transfer waits for LOADED; the driver asks its enclave behind its back.
        with pytest.raises((LocalProtocolError, ProtocolError)):
            out.link.call("__mig_commit")
        assert out.link.call("__mig_status")["committed"] is False
        mitm.close()  # the transfer ends without LOADED
        mover.join(20)
        assert not mover.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], MigSGXError), errors
        run = SourceRun(source.client, out, peer, errors[0])
        source.assert_intact(run)
        dest.join()
        assert not dest.active
        # In doubt it keeps its loaded copy for good (no decision can come, and nothing
        # discards it): ended here, not after the teardown's grace for enclaves that end.
        kill_quietly(dest.pid)
