"""The peer protocol (``migsgx.core.peer``): its table, and both ends back to back in memory.

The source and destination ends exchange real frames through in-memory buffers,
and, in the second half, the real trusted halves (``Migrator`` in two enclave
instances of two emulated hosts) produce and judge what the frames carry, with
real shared-memory rings between them and the chunk frames.  The attacks on the
frames (garbage, out of turn, duplicated, truncated) and on the state stream
(flipped, reordered, dropped, duplicated, cut, mis-flagged chunks) run here in
milliseconds; ``tests/integration/test_state_attacks.py`` keeps the cases that
prove the wiring over a real TCP connection between processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from platform_fixtures import World, make_image

from migsgx.core.commit import CommitError, CommitState
from migsgx.core.peer import (
    CHUNK_HEADER,
    SCHEMA,
    TRANSITIONS,
    ChunkDecoder,
    PeerProtocol,
    PeerState,
    Role,
    check_offer,
    encode_chunk,
)
from migsgx.core.stream import TAG_SIZE
from migsgx.datapath.ring import ShmRing
from migsgx.enclave.instance import EnclaveInstance
from migsgx.enclave.migrator import Migrator
from migsgx.errors import (
    ConnectionClosedError,
    EnclaveBusyError,
    FrameError,
    MigrationError,
    MigSGXError,
    ProtocolError,
    StreamError,
)
from migsgx.limits import MAX_MEMORY_HINT, MAX_OFFER_SLOTS, MIN_CHUNK_SIZE
from migsgx.sgx.image import EnclaveImage
from migsgx.sgx.platform import EmulatedPlatform
from migsgx.wire import encode

S, D = Role.SOURCE, Role.DESTINATION
OFFER = {
    "t": "offer",
    "files": {"manifest.toml": b""},
    "chunk_size": 4096,
    "slots": 2,
    "mode": "pipelined",
}
MESSAGES: dict[str, dict[str, Any]] = {
    "offer": OFFER,
    "accept": {"t": "accept", "pid": 1},
    "hs": {"t": "hs", "data": b"x"},
    "loaded": {"t": "loaded", "frame": b"f", "stats": {}},
    "commit": {"t": "commit", "token": b"t"},
    "active": {"t": "active"},
    "abort": {"t": "abort", "code": "aborted", "message": "", "frame": b""},
    "refused": {"t": "refused", "frame": b"r"},
}
HAPPY = [
    (S, "offer"),
    (D, "accept"),
    (S, "hs"),
    (D, "hs"),
    (S, "hs"),
    (D, "loaded"),
    (S, "commit"),
    (D, "active"),
]


class Pipe:
    """Two ends and the bytes in flight between them, in memory."""

    def __init__(self) -> None:
        self.ends = {S: PeerProtocol(S), D: PeerProtocol(D)}
        self.decoders = {S: self.ends[S].decoder(), D: self.ends[D].decoder()}

    def send(self, sender: Role, msg: dict[str, Any]) -> bytes:
        return self.ends[sender].sent(msg)

    def deliver(self, receiver: Role, data: bytes) -> list[dict[str, Any]]:
        decoder = self.decoders[receiver]
        decoder.receive(data)
        return [self.ends[receiver].received(m) for m in decoder.frames()]

    def exchange(self, sender: Role, msg: dict[str, Any]) -> list[dict[str, Any]]:
        return self.deliver(D if sender is S else S, self.send(sender, msg))


# --- the table -----------------------------------------------------------------------------
def test_both_ends_run_the_whole_protocol_back_to_back() -> None:
    pipe = Pipe()
    for sender, kind in HAPPY:
        got = pipe.exchange(sender, MESSAGES[kind])
        assert [m["t"] for m in got] == [kind]
    assert pipe.ends[S].state is pipe.ends[D].state is PeerState.ACTIVE
    # Each end's history is the other's, with send and receive swapped.
    swap = {"send": "recv", "recv": "send"}
    mirrored = [f"{swap[e.split(':')[0]]}:{e.split(':')[1]}" for e in pipe.ends[S].history]
    assert mirrored == pipe.ends[D].history


LIVE = {
    "round": {"t": "round", "number": 0},
    "round_done": {"t": "round_done", "stats": {}},
    "final": {"t": "final"},
    "repair": {"t": "repair", "segments": [3, 9]},
}


def test_mode_refuse_ends_with_refused_after_the_handshake() -> None:
    pipe = Pipe()
    steps = [(S, "offer"), (D, "accept"), (S, "hs"), (D, "hs"), (S, "hs"), (D, "refused")]
    for sender, kind in steps:
        msg = {**MESSAGES[kind], "mode": "refuse"} if kind == "offer" else MESSAGES[kind]
        assert [m["t"] for m in pipe.exchange(sender, msg)] == [kind]
    assert pipe.ends[S].state is pipe.ends[D].state is PeerState.REFUSED
    assert pipe.ends[S].finished and pipe.ends[D].finished
    # Nothing follows a refusal; and only the destination refuses, only before loaded.
    with pytest.raises(ProtocolError):
        pipe.send(S, MESSAGES["commit"])
    late = Pipe()
    for sender, kind in HAPPY[:6]:
        late.exchange(sender, MESSAGES[kind])
    with pytest.raises(ProtocolError):
        late.exchange(D, MESSAGES["refused"])
    early = Pipe()
    for sender, kind in HAPPY[:5]:
        early.exchange(sender, MESSAGES[kind])
    with pytest.raises(ProtocolError):
        early.send(S, MESSAGES["refused"])


def test_live_mode_rounds_then_final_back_to_back() -> None:
    pipe = Pipe()
    messages = {**MESSAGES, **LIVE}
    live = HAPPY[:5] + [(S, "round"), (D, "round_done")] * 3 + [(S, "final")] + HAPPY[5:]
    for sender, kind in live:
        assert [m["t"] for m in pipe.exchange(sender, messages[kind])] == [kind]
    assert pipe.ends[S].state is pipe.ends[D].state is PeerState.ACTIVE


def test_live_mode_one_repair_after_the_final_transfer() -> None:
    pipe = Pipe()
    messages = {**MESSAGES, **LIVE}
    live = [*HAPPY[:5], (S, "round"), (D, "round_done"), (S, "final"), (D, "repair")]
    for sender, kind in live + HAPPY[5:]:
        assert [m["t"] for m in pipe.exchange(sender, messages[kind])] == [kind]
    assert pipe.ends[S].state is pipe.ends[D].state is PeerState.ACTIVE
    again = Pipe()
    for sender, kind in live:
        again.exchange(sender, messages[kind])
    with pytest.raises(ProtocolError):  # at most one repair round
        again.exchange(D, LIVE["repair"])


@pytest.mark.parametrize(
    ("sender", "kind"),
    [(S, "round_done"), (D, "round"), (D, "final"), (S, "repair"), (D, "repair")],
)
def test_live_frames_from_the_wrong_end_are_refused(sender: Role, kind: str) -> None:
    pipe = Pipe()
    for s, k in HAPPY[:5]:
        pipe.exchange(s, MESSAGES[k])
    with pytest.raises(ProtocolError):
        pipe.exchange(sender, LIVE[kind])


def test_no_round_after_the_final_transfer_began() -> None:
    pipe = Pipe()
    for s, k in HAPPY[:5]:
        pipe.exchange(s, MESSAGES[k])
    pipe.exchange(S, LIVE["final"])
    with pytest.raises(ProtocolError):
        pipe.exchange(S, LIVE["round"])


@pytest.mark.parametrize("role", [S, D], ids=["source", "destination"])
def test_every_event_outside_the_table_is_refused(role: Role) -> None:
    checked = 0
    for state in PeerState:
        allowed = TRANSITIONS[role].get(state, {})
        for kind, msg in MESSAGES.items():
            for direction in ("send", "recv"):
                end = PeerProtocol(role, state=state)
                act = end.sent if direction == "send" else end.received
                if f"{direction}:{kind}" in allowed:
                    act(dict(msg))
                    assert end.state is allowed[f"{direction}:{kind}"]
                else:
                    with pytest.raises(ProtocolError):
                        act(dict(msg))
                    assert end.state is PeerState.FAILED
                checked += 1
    assert checked == len(PeerState) * len(MESSAGES) * 2


def test_final_states_take_nothing_more() -> None:
    for role in (S, D):
        for state in (PeerState.ACTIVE, PeerState.ABORTED):
            assert TRANSITIONS[role][state] == {}


@pytest.mark.parametrize("at", range(len(HAPPY)))
def test_a_duplicated_frame_is_refused_unless_the_enclave_judges_it(at: int) -> None:
    pipe = Pipe()
    for sender, kind in HAPPY[:at]:
        pipe.exchange(sender, MESSAGES[kind])
    sender, kind = HAPPY[at]
    frame = pipe.send(sender, MESSAGES[kind])
    receiver = D if sender is S else S
    # A commit at a destination in doubt goes to its enclave, which finds a copy
    # of a token it already used no better than a forged one (see below).
    judged = (receiver, kind) == (D, "commit")
    pipe.deliver(receiver, frame)
    if judged:
        pipe.deliver(receiver, frame)
        assert pipe.ends[D].in_doubt
    else:
        with pytest.raises(ProtocolError):
            pipe.deliver(receiver, frame)


def test_a_source_takes_loaded_twice_after_its_commit() -> None:
    pipe = Pipe()
    for sender, kind in HAPPY[:-1]:
        pipe.exchange(sender, MESSAGES[kind])
    pipe.deliver(S, encode(MESSAGES["loaded"]))
    pipe.exchange(S, MESSAGES["commit"])  # the token may be delivered again
    pipe.exchange(D, MESSAGES["active"])
    assert pipe.ends[S].state is PeerState.ACTIVE


@pytest.mark.parametrize(
    ("receiver", "before", "kind"),
    [
        (D, 0, "hs"),  # a handshake before any offer
        (S, 1, "loaded"),  # loaded before the handshake
        (D, 1, "commit"),  # a decision before anything was loaded
        (S, 3, "active"),  # active before a commit
        (S, 6, "accept"),  # an old frame again after the load
    ],
)
def test_frames_out_of_order_are_refused(receiver: Role, before: int, kind: str) -> None:
    pipe = Pipe()
    for sender, k in HAPPY[:before]:
        pipe.exchange(sender, MESSAGES[k])
    with pytest.raises(ProtocolError):
        pipe.deliver(receiver, encode(MESSAGES[kind]))


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x02\xff\xff",  # not CBOR
        encode({"t": "exec", "code": "x"}),  # not a type of the schema
        encode({**MESSAGES["accept"], "extra": 1}),  # a field too many
        encode({"t": "accept", "pid": True}),  # a boolean for an integer
        (33 << 20).to_bytes(4, "big") + b"\xa0",  # over the cap: refused before the body
    ],
    ids=["not-cbor", "unknown-type", "extra-field", "bool-as-int", "oversize"],
)
def test_garbage_is_a_frame_error(data: bytes) -> None:
    pipe = Pipe()
    pipe.exchange(S, OFFER)
    with pytest.raises(FrameError):
        pipe.deliver(S, data)


def test_a_truncated_frame_is_not_taken() -> None:
    pipe = Pipe()
    frame = pipe.send(S, OFFER)
    assert pipe.deliver(D, frame[:-1]) == []
    assert pipe.ends[D].state is PeerState.IDLE
    assert pipe.deliver(D, frame[-1:]) != []


@pytest.mark.parametrize(
    "change",
    [
        {"mode": "eager"},
        {"chunk_size": MIN_CHUNK_SIZE - 1},
        {"chunk_size": 1 << 30},
        {"slots": 0},
        {"slots": MAX_OFFER_SLOTS + 1},
        {"memory_hint": -1},
        {"memory_hint": MAX_MEMORY_HINT + 1},
    ],
)
def test_an_offer_out_of_bounds_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        check_offer({**OFFER, **change})
    end = PeerProtocol(D)
    with pytest.raises(ProtocolError):
        end.received({**OFFER, **change})
    assert end.state is PeerState.FAILED


def test_an_offer_may_carry_a_memory_hint_and_needs_none() -> None:
    for extra in ({}, {"memory_hint": 0}, {"memory_hint": 1 << 30}, {"memory_hint": None}):
        check_offer({**OFFER, **extra})
        PeerProtocol(D).received({**OFFER, **extra})


def test_a_memory_hint_that_is_no_integer_is_refused() -> None:
    for bad in (True, 1.5, b"1"):
        with pytest.raises(FrameError):
            SCHEMA.validate({**OFFER, "memory_hint": bad})
        with pytest.raises(ProtocolError):
            check_offer({**OFFER, "memory_hint": bad})


# --- chunk frames --------------------------------------------------------------------------
def test_chunk_frames_round_trip_in_pieces() -> None:
    frames = [
        encode_chunk(b"a" * 10, final=False),
        encode_chunk(b"", final=False),
        encode_chunk(b"b" * 7, final=True),
    ]
    data = b"".join(frames) + encode(MESSAGES["loaded"])
    decoder = ChunkDecoder(cap=16)
    got: list[tuple[bytes, bool]] = []
    for i in range(len(data)):  # one byte at a time
        decoder.receive(data[i : i + 1])
        got.extend(decoder.chunks())
    assert got == [(b"a" * 10, False), (b"", False), (b"b" * 7, True)]
    assert decoder.rest == encode(MESSAGES["loaded"])  # what follows is not a chunk


def test_chunk_length_and_flags_are_checked_before_the_payload() -> None:
    decoder = ChunkDecoder(cap=16)
    decoder.receive(CHUNK_HEADER.pack(17, 0))
    with pytest.raises(FrameError):
        list(decoder.chunks())
    decoder = ChunkDecoder(cap=16)
    decoder.receive(CHUNK_HEADER.pack(1, 0x02) + b"x")
    with pytest.raises(FrameError):
        list(decoder.chunks())


def test_a_stream_that_ends_early_is_an_error() -> None:
    decoder = ChunkDecoder(cap=16)
    decoder.receive(encode_chunk(b"x", final=False))
    list(decoder.chunks())
    with pytest.raises(ConnectionClosedError):
        decoder.end_of_stream()
    decoder.receive(encode_chunk(b"y", final=True)[:3])
    with pytest.raises(FrameError):
        decoder.end_of_stream()


# --- both ends with the real trusted halves --------------------------------------------------
ENCLAVE = """
import hashlib

import numpy as np

from migsgx.enclave import Enclave, ecall


class Probe(Enclave):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.cells = ctx.memory.array("cells", 48 * 1024, np.uint8)

    @ecall
    def fill(self, seed):
        data = b"".join(hashlib.sha256(seed + i.to_bytes(2, "big")).digest() for i in range(1536))
        self.cells[:] = np.frombuffer(data, dtype=np.uint8)
        return hashlib.sha256(self.cells.tobytes()).hexdigest()

    @ecall
    def digest(self):
        return hashlib.sha256(self.cells.tobytes()).hexdigest()
"""
CHUNK = MIN_CHUNK_SIZE
SLOT = CHUNK + TAG_SIZE
LIVENESS = 10.0  # seconds a ring waits for its peer before it fails: never reached here


@pytest.fixture(scope="module")
def image(world: World) -> Any:
    return make_image(world.author, ENCLAVE)


def _instance(image: Any, host: EmulatedPlatform) -> EnclaveInstance:
    identity, _ = host.einit(image)
    return EnclaveInstance(image, host.services_for(identity))


class Migration:
    """One enclave's migration: the two ends' tables, their enclaves, rings and frames."""

    def __init__(self, world: World, image: Any) -> None:
        self.source = _instance(image, world.host_a)
        self.digest = self.source.call("fill", b"peer")
        self.image = image
        self.host = world.host_b
        self.out = Migrator(self.source)
        self.destination: EnclaveInstance | None = None
        self.into: Migrator | None = None
        self.pipe = Pipe()

    def _frames(self, sender: Role, msg: dict[str, Any]) -> list[dict[str, Any]]:
        return self.pipe.exchange(sender, msg)

    def launch_and_handshake(self, hint: int | None = None) -> None:
        """``hint``: the offer's memory hint, which the destination faults in ahead."""

        offer_msg: dict[str, Any] = {
            "t": "offer",
            "files": dict(self.image.files),
            "chunk_size": CHUNK,
            "slots": 3,
            "mode": "pipelined",
        }
        if hint is not None:
            offer_msg["memory_hint"] = hint
        (offer,) = self._frames(S, offer_msg)
        # The destination launches what it was offered (EINIT checks it there).
        self.destination = _instance(EnclaveImage.from_files(offer["files"]), self.host)
        self.into = Migrator(self.destination)
        self.into.in_start()
        if offer.get("memory_hint"):
            self.into.prefault(offer["memory_hint"])
        self._frames(D, {"t": "accept", "pid": 0})
        (hello,) = self._frames(S, {"t": "hs", "data": self.out.out_start()})
        reply = self.into.hs(hello["data"])
        (dhello,) = self._frames(D, {"t": "hs", "data": reply["send"]})
        finished = self.out.hs(dhello["data"])
        assert finished["done"]
        (fin,) = self._frames(S, {"t": "hs", "data": finished["send"]})
        assert self.into.hs(fin["data"])["done"]
        assert self.pipe.ends[S].state is self.pipe.ends[D].state is PeerState.STREAMING

    def dump(self) -> list[bytes]:
        """The source end: every ring slot the source enclave fills, as a chunk frame."""

        producer, consumer = ShmRing.pair(3, SLOT)
        self.out.ring = producer
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.out.dump(CHUNK)
            except BaseException as exc:
                errors.append(exc)
                producer.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        frames = []
        try:
            while True:
                index, view, final = consumer.next(LIVENESS)
                frames.append(encode_chunk(bytes(view), final=final))
                consumer.release(index)
                if final:
                    break
        finally:
            thread.join(LIVENESS)
            consumer.close()
        if errors:
            raise errors[0]
        return frames

    def load(self, data: bytes) -> dict[str, Any]:
        """The destination end: chunk frames into the ring, the enclave opens them."""

        assert self.into is not None
        producer, consumer = ShmRing.pair(3, SLOT)
        self.into.ring = consumer
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["ok"] = self.into.load() if self.into else None
            except BaseException as exc:
                result["error"] = exc
                consumer.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        decoder = ChunkDecoder(cap=SLOT)
        try:
            decoder.receive(data)
            for payload, final in decoder.chunks():
                try:
                    index, slot = producer.acquire(LIVENESS)
                    slot[: len(payload)] = payload
                    producer.publish(index, len(payload), final=final)
                except ConnectionClosedError:
                    break  # the enclave failed and closed its ring: its error is the cause
            else:
                decoder.end_of_stream()
                if decoder.rest:
                    # The source sends nothing after its final chunk until LOADED.
                    raise StreamError("the peer sent more after the final chunk of the state")
        except MigSGXError:
            producer.close()  # the enclave sees the ring go dead, as in the engine
            thread.join(LIVENESS)
            raise
        thread.join(LIVENESS)
        producer.close()
        if "error" in result:
            raise result["error"]
        return dict(result["ok"])

    def transfer(
        self, tamper: Callable[[list[bytes]], bytes] | None = None, hint: int | None = None
    ) -> dict[str, Any]:
        self.launch_and_handshake(hint)
        frames = self.dump()
        loaded = self.load(tamper(frames) if tamper else b"".join(frames))
        (msg,) = self._frames(D, {"t": "loaded", "frame": loaded["loaded"], "stats": {}})
        self.out.loaded(msg["frame"])
        return loaded

    def commit(self) -> None:
        assert self.into is not None
        (msg,) = self._frames(S, {"t": "commit", "token": self.out.commit()})
        self.into.commit_in(msg["token"])
        self._frames(D, {"t": "active"})

    def abort(self) -> None:
        frame = self.out.abort("the test gives up")
        self.pipe.ends[S].sent(MESSAGES["abort"] | {"frame": frame})
        if self.into is None:
            return
        dc = self.into.dest_commit
        if dc is not None and dc.state is CommitState.AWAIT_COMMIT:
            # It made LOADED: only the source's authenticated ABORT ends it.
            with pytest.raises(MigrationError, match="source aborted"):
                self.into.commit_in(frame)
        else:
            self.into.abort("the test gives up")

    def assert_source_intact(self) -> None:
        assert self.source.call("digest") == self.digest

    def assert_destination_discarded(self) -> None:
        assert self.destination is not None
        with pytest.raises(EnclaveBusyError):
            self.destination.call("digest")


def test_a_migration_back_to_back_in_memory(world: World, image: Any) -> None:
    move = Migration(world, image)
    move.transfer()
    move.commit()
    assert move.destination is not None
    assert move.destination.call("digest") == move.digest
    assert move.pipe.ends[S].state is move.pipe.ends[D].state is PeerState.ACTIVE
    with pytest.raises(EnclaveBusyError):
        move.source.call("digest")  # the source gave its state up


def _resident(memory: Any) -> int:
    """Pages of ``memory`` resident in this process (``mincore``)."""

    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = memory.size // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    assert libc.mincore(ctypes.c_void_p(memory.address), memory.size, vec) == 0
    return sum(b & 1 for b in vec.raw)


@pytest.mark.parametrize("factor", [1, 8, 1 << 20])
def test_the_destination_faults_in_the_hinted_memory_and_keeps_only_what_arrived(
    world: World, image: Any, factor: int
) -> None:
    move = Migration(world, image)
    used = move.out.status()["memory_used"]
    assert used == 48 * 1024
    loaded = move.transfer(hint=used * factor)
    assert move.destination is not None
    memory = move.destination.memory
    size = memory.size
    assert loaded["prefaulted_bytes"] == min(used * factor, size)
    # What the hint faulted in beyond the memory that arrived is given back.
    assert _resident(memory) * 4096 <= used
    move.commit()
    assert move.destination.call("digest") == move.digest


def test_only_a_destination_before_its_ring_faults_memory_in_ahead(
    world: World, image: Any
) -> None:
    move = Migration(world, image)
    move.launch_and_handshake(hint=1 << 20)
    assert move.into is not None
    with pytest.raises(ProtocolError):
        move.into.prefault(1 << 20)  # asked twice
    for bad in (-1, True, "1"):
        with pytest.raises(ProtocolError):
            move.into.prefault(bad)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        move.out.prefault(1 << 20)  # a source
    move.abort()  # stops the prefault before the memory is wiped
    move.assert_source_intact()
    move.assert_destination_discarded()


# Chunk frames of this transfer: 0 manifest header, 1 manifest, 2 state header, 3 state,
# 4 memory header, 5..16 memory (48 KiB in 4 KiB chunks), 17 persistent header,
# 18 persistent (final).
TARGET = 9


def _flip(frames: list[bytes]) -> bytes:
    out = bytearray(frames[TARGET])
    out[CHUNK_HEADER.size + 100] ^= 0x10
    return b"".join([*frames[:TARGET], bytes(out), *frames[TARGET + 1 :]])


def _reflag(frame: bytes, final: bool) -> bytes:
    return encode_chunk(frame[CHUNK_HEADER.size :], final=final)


STREAM_ATTACKS: dict[str, tuple[Callable[[list[bytes]], bytes], type[MigSGXError]]] = {
    "bit-flip": (_flip, StreamError),
    "reorder": (
        lambda f: b"".join([*f[:TARGET], f[TARGET + 1], f[TARGET], *f[TARGET + 2 :]]),
        StreamError,
    ),
    "drop": (lambda f: b"".join(f[:TARGET] + f[TARGET + 1 :]), StreamError),
    "duplicate": (lambda f: b"".join([*f[: TARGET + 1], f[TARGET], *f[TARGET + 1 :]]), StreamError),
    "drop-stream-header": (lambda f: b"".join(f[:4] + f[5:]), StreamError),
    "swap-stream-headers": (lambda f: b"".join([*f[:2], f[4], f[2], f[3], *f[5:]]), StreamError),
    "cut-before-final": (lambda f: b"".join(f[:-1]), ConnectionClosedError),
    "cut-inside-a-chunk": (lambda f: b"".join(f)[:-7], FrameError),
    "final-flag-early": (
        lambda f: b"".join([*f[:TARGET], _reflag(f[TARGET], True), *f[TARGET + 1 :]]),
        StreamError,
    ),
    "final-flag-early-and-end": (
        lambda f: b"".join([*f[:TARGET], _reflag(f[TARGET], True)]),
        StreamError,
    ),
    "append-after-final": (
        lambda f: b"".join([*f[:-1], _reflag(f[-1], False), _reflag(f[TARGET], True)]),
        StreamError,
    ),
    "append-behind-final": (lambda f: b"".join([*f, _reflag(f[TARGET], False)]), StreamError),
}


@pytest.mark.parametrize("attack", list(STREAM_ATTACKS))
def test_stream_tampering_is_refused_and_the_source_goes_on(
    world: World, image: Any, attack: str
) -> None:
    tamper, error = STREAM_ATTACKS[attack]
    move = Migration(world, image)
    with pytest.raises(error):
        move.transfer(tamper)
    move.abort()
    move.assert_destination_discarded()
    move.assert_source_intact()
    assert move.pipe.ends[S].state is PeerState.ABORTED


def test_the_stream_has_the_frames_the_attacks_assume(world: World, image: Any) -> None:
    move = Migration(world, image)
    move.launch_and_handshake()
    frames = move.dump()
    move.abort()
    assert len(frames) == 19
    flags = [f[CHUNK_HEADER.size - 1] for f in frames]
    assert flags == [0] * 18 + [1]


def test_a_forged_commit_leaves_the_destination_in_doubt(world: World, image: Any) -> None:
    move = Migration(world, image)
    move.transfer()
    assert move.into is not None
    (forged,) = move.pipe.deliver(D, encode({"t": "commit", "token": b"\x00" * 64}))
    with pytest.raises((CommitError, FrameError)):
        move.into.commit_in(forged["token"])
    assert move.pipe.ends[D].in_doubt
    move.assert_destination_discarded()  # loaded, not running
    move.commit()  # the real token still works
    assert move.destination is not None and move.destination.call("digest") == move.digest


def test_an_authentic_abort_discards_the_waiting_destination(world: World, image: Any) -> None:
    move = Migration(world, image)
    move.transfer()
    assert move.into is not None
    frame = move.out.abort("the operator gave up")
    (msg,) = move.pipe.exchange(S, MESSAGES["abort"] | {"frame": frame})
    with pytest.raises(MigrationError):
        move.into.commit_in(msg["frame"])
    move.into.abort("the source aborted")
    move.assert_destination_discarded()
    move.assert_source_intact()


def test_a_manifest_larger_than_its_room_is_refused_and_the_source_goes_on(
    world: World, image: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination opens the manifest into a page: a longer one is a stream error."""

    from migsgx.core.stream import Manifest
    from migsgx.enclave.migrator import MANIFEST_ROOM

    move = Migration(world, image)
    move.launch_and_handshake()
    encode = Manifest.encode
    monkeypatch.setattr(Manifest, "encode", lambda self: encode(self) + bytes(MANIFEST_ROOM))
    frames = move.dump()  # sealed by the source enclave: authentic, only too long
    monkeypatch.undo()
    with pytest.raises(StreamError, match="larger than it may be"):
        move.load(b"".join(frames))
    move.abort()
    move.assert_source_intact()
