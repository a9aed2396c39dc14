"""Garbage from a peer, to every parser that reads it first: only ``MigSGXError`` comes out.

``test_fuzz_messages.py`` covers the agents' control frames the destination
reads and the records inside them; this file covers what else a peer (or a man
in the middle) feeds a parser: the handshake's three messages, the peer
protocol's frames and chunk frames, the commit protocol's sealed control frames
(LOADED, COMMIT, ABORT), every other agent control message (the answers the
tool reads too), and the CRIU images a destination reads before it restores
(credentials and mounts).  Each property starts from what the code itself
produces and damages it; the parser must accept it, wait for more bytes, or
raise a :class:`MigSGXError` with its stable code, never another exception and
never a hang.  Where an end may hold the only copy (a destination that sent
LOADED), damaged frames must also leave it as it was.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from fuzz_damage import damaged_encoding, nested
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_commit import migrate_until_loaded
from test_handshake import NEED_DATA, make_pair
from test_spec_admission import ENGINE_SPECS, HERE, RUNC_MOUNTS, mount_image

from migsgx.agent.protocol import CONTROL
from migsgx.containers.image_admission import admit_images, localize_images
from migsgx.containers.oci import localize
from migsgx.core.commit import CommitState
from migsgx.core.handshake import HandshakeComplete
from migsgx.core.peer import SCHEMA, ChunkDecoder, PeerProtocol, Role, check_offer, encode_chunk
from migsgx.criu.images import CORE_MAGIC, IMG_COMMON_MAGIC, _cls
from migsgx.errors import MigSGXError
from migsgx.wire import HEADER, decode_body

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**66), 2**66)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=24)
)
VALUES = nested(SCALARS, keys=st.text(max_size=8) | st.integers(-3, 3))


def _flipped(draw: st.DrawFn, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        bit = draw(st.integers(0, len(data) * 8 - 1))
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


@st.composite
def damaged_bytes(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` truncated, bit-flipped, with bytes spliced in, or replaced by garbage."""

    how = draw(st.sampled_from(["truncate", "flip", "splice", "garbage"]))
    if how == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if how == "flip":
        return _flipped(draw, valid)
    if how == "splice":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.binary(min_size=1, max_size=16)) + valid[at:]
    return draw(st.binary(max_size=len(valid) + 16))


def _typed(parse: Callable[[], object]) -> object:
    """What ``parse`` returns, or the ``MigSGXError`` it raised (with a code and a message)."""

    try:
        return parse()
    except MigSGXError as exc:
        assert exc.code and str(exc)
        return exc


# --- the handshake (handshake.md): each of its three messages damaged -------------------------
def _genuine_messages() -> tuple[bytes, bytes, bytes]:
    pair = make_pair()
    pair.source.start()
    hello = pair.source.data_to_send()
    pair.destination.receive_data(hello)
    assert pair.destination.next_event() is NEED_DATA
    reply = pair.destination.data_to_send()
    pair.source.receive_data(reply)
    assert isinstance(pair.source.next_event(), HandshakeComplete)
    return hello, reply, pair.source.data_to_send()


SOURCE_HELLO, DESTINATION_HELLO, SOURCE_FINISHED = _genuine_messages()


@FUZZ
@given(hello=damaged_bytes(SOURCE_HELLO))
def test_a_damaged_source_hello_is_refused_or_awaited(hello: bytes) -> None:
    dst = make_pair().destination
    dst.receive_data(hello)
    event = _typed(dst.next_event)
    assert event is NEED_DATA or isinstance(event, MigSGXError)


@FUZZ
@given(reply=damaged_bytes(DESTINATION_HELLO))
def test_a_damaged_destination_hello_never_completes_the_source(reply: bytes) -> None:
    pair = make_pair()
    pair.source.start()
    pair.destination.receive_data(pair.source.data_to_send())
    assert pair.destination.next_event() is NEED_DATA
    pair.source.receive_data(reply)
    event = _typed(pair.source.next_event)
    assert event is NEED_DATA or isinstance(event, MigSGXError)


@FUZZ
@given(finished=damaged_bytes(SOURCE_FINISHED))
def test_a_damaged_source_finished_never_completes_the_destination(finished: bytes) -> None:
    pair = make_pair()
    pair.source.start()
    pair.destination.receive_data(pair.source.data_to_send())
    assert pair.destination.next_event() is NEED_DATA
    pair.source.receive_data(pair.destination.data_to_send())
    assert isinstance(pair.source.next_event(), HandshakeComplete)
    genuine = pair.source.data_to_send()
    pair.destination.receive_data(finished)
    event = _typed(pair.destination.next_event)
    if finished == genuine:  # (a flip can flip back)
        return
    assert event is NEED_DATA or isinstance(event, MigSGXError)


# --- the peer protocol's frames (channels.md, section 8) ---------------------------------------
OFFER = {"t": "offer", "files": {"manifest.toml": b""}, "chunk_size": 4096, "slots": 2,
         "mode": "pipelined"}  # fmt: skip
PEER_FRAMES = [
    OFFER,
    {"t": "accept", "pid": 1},
    {"t": "hs", "data": b"x"},
    {"t": "loaded", "frame": b"f", "stats": {}},
    {"t": "commit", "token": b"t"},
    {"t": "abort", "code": "aborted", "message": "", "frame": b""},
    {"t": "round", "number": 0},
    {"t": "repair", "segments": [3, 9]},
]


def _framed(value: object) -> bytes:
    """``value`` as one length-prefixed CBOR frame, whatever it is (the peer's choice)."""

    body = bytes(cbor2.dumps(value))
    return HEADER.pack(len(body)) + body


def _damaged_frame(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return damaged_encoding(valid, _framed, VALUES, extra_keys=st.text(max_size=8), max_bytes=200)


@FUZZ
@given(
    role=st.sampled_from([Role.SOURCE, Role.DESTINATION]),
    data=st.one_of(*(_damaged_frame(f) for f in PEER_FRAMES)),
)
def test_damaged_peer_frames_are_refused_with_frame_or_protocol_errors(
    role: Role, data: bytes
) -> None:
    end = PeerProtocol(role)
    decoder = end.decoder()
    decoder.receive(data)

    def take() -> list[dict[str, Any]]:
        return [end.received(m) for m in decoder.frames()]

    got = _typed(take)
    if isinstance(got, MigSGXError):
        assert got.code in ("frame", "protocol")
    if not isinstance(got, MigSGXError) and got and got[0]["t"] == "offer":
        _typed(lambda: check_offer(got[0]))


@FUZZ
@given(offer=st.dictionaries(st.sampled_from(sorted(OFFER)) | st.text(max_size=6), VALUES))
def test_any_offer_is_checked_or_refused(offer: dict[str, Any]) -> None:
    """What the schema lets through (any types it names, any values) meets ``check_offer``."""

    def check() -> None:
        msg = decode_body(bytes(cbor2.dumps({**OFFER, **offer})), SCHEMA)
        check_offer(msg)

    found = _typed(check)
    assert found is None or isinstance(found, MigSGXError)


CHUNKS = encode_chunk(b"a" * 40, final=False) + encode_chunk(b"b" * 9, final=True) + b"next"


@FUZZ
@given(data=damaged_bytes(CHUNKS), cut=st.integers(1, 64))
def test_damaged_chunk_frames_are_refused_or_awaited_in_any_split(data: bytes, cut: int) -> None:
    decoder = ChunkDecoder(cap=64)

    def feed() -> list[tuple[bytes, bool]]:
        out: list[tuple[bytes, bool]] = []
        for at in range(0, len(data), cut):
            decoder.receive(data[at : at + cut])
            out += decoder.chunks()
        decoder.end_of_stream()
        return out

    got = _typed(feed)
    if isinstance(got, MigSGXError):
        assert got.code in ("frame", "closed")
        return
    assert isinstance(got, list) and got[-1][1] and all(len(p) <= 64 for p, _ in got)


# --- the commit protocol's sealed control frames (commit.md) -----------------------------------
@FUZZ
@given(st.data())
def test_a_damaged_loaded_leaves_the_source_waiting(data: st.DataObject) -> None:
    _, _, src, dst, _ = migrate_until_loaded()
    loaded = dst.loaded()
    frame = data.draw(damaged_bytes(loaded))
    got = _typed(lambda: src.receive(frame))
    if frame == loaded:
        return
    assert isinstance(got, MigSGXError)
    assert src.state is CommitState.AWAIT_LOADED


@FUZZ
@given(st.data())
def test_a_damaged_commit_or_abort_leaves_a_loaded_destination_holding(
    data: st.DataObject,
) -> None:
    """A destination that sent LOADED may hold the only copy: no damaged frame ends it."""

    _, _, src, dst, seen = migrate_until_loaded()
    src.receive(dst.loaded())
    genuine = data.draw(st.sampled_from(["commit", "abort"]))
    frame = src.commit() if genuine == "commit" else src.abort()
    damaged = data.draw(damaged_bytes(frame))
    got = _typed(lambda: dst.receive(damaged))
    if damaged == frame:
        return
    assert isinstance(got, MigSGXError)
    assert dst.state is CommitState.AWAIT_COMMIT
    assert not seen.migration_claimed(dst.migration_id)


# --- every agent control message, either way ---------------------------------------------------
_SAMPLE = {bytes: b"\x00" * 16, str: "x", int: 1, bool: True, list: [], dict: {}}


def _sample_message(kind: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"t": kind}
    for name, want in CONTROL.messages[kind].items():
        first = want[0] if isinstance(want, tuple) else want
        msg[name] = _SAMPLE.get(first, 1.5) if first is not type(None) else None
    return msg


@FUZZ
@given(
    body=st.one_of(
        *(
            damaged_encoding(
                _sample_message(kind),
                lambda v: bytes(cbor2.dumps(v)),
                VALUES,
                extra_keys=st.text(max_size=8),
                max_bytes=200,
            )
            for kind in sorted(CONTROL.messages)
        )
    )
)
def test_every_control_message_decodes_or_raises_frame_errors(body: bytes) -> None:
    msg = _typed(lambda: decode_body(body, CONTROL))
    if isinstance(msg, MigSGXError):
        assert msg.code == "frame"
        return
    assert isinstance(msg, dict) and msg["t"] in CONTROL.messages


def test_each_sample_control_message_is_valid() -> None:
    for kind in CONTROL.messages:
        assert decode_body(bytes(cbor2.dumps(_sample_message(kind))), CONTROL)["t"] == kind


# --- CRIU images a destination reads before it restores (image_admission) ---------------------
def _core_image() -> bytes:
    core = _cls("core_entry")()
    core.tc.comm = "python3"
    creds = core.thread_core.creds
    creds.uid = creds.gid = creds.euid = 0
    creds.cap_inh.extend([0, 0])
    for caps in (creds.cap_prm, creds.cap_eff, creds.cap_bnd):
        caps.extend([1 << 10, 0])  # CAP_NET_BIND_SERVICE
    raw = core.SerializeToString()
    return struct.pack("<III", IMG_COMMON_MAGIC, CORE_MAGIC, len(raw)) + raw


CORE_IMAGE = _core_image()
MOUNT_IMAGE = mount_image(RUNC_MOUNTS)
SPEC = localize(ENGINE_SPECS["runc"], HERE)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


def test_the_intact_images_are_admitted(images: Path) -> None:
    for stale in images.iterdir():
        stale.unlink()
    (images / "core-1.img").write_bytes(CORE_IMAGE)
    (images / "mountpoints-13.img").write_bytes(MOUNT_IMAGE)
    admit_images(images, SPEC)
    assert localize_images(images, SPEC) == []


@FUZZ
@given(
    core=st.one_of(st.just(CORE_IMAGE), damaged_bytes(CORE_IMAGE)),
    mounts=st.one_of(st.just(MOUNT_IMAGE), damaged_bytes(MOUNT_IMAGE)),
)
def test_damaged_core_and_mount_images_are_admitted_or_refused(
    images: Path, core: bytes, mounts: bytes
) -> None:
    for stale in images.iterdir():
        stale.unlink()
    (images / "core-1.img").write_bytes(core)
    (images / "mountpoints-13.img").write_bytes(mounts)
    for check in (admit_images, localize_images):
        got = _typed(lambda check=check: check(images, SPEC))  # type: ignore[misc]
        if isinstance(got, MigSGXError):
            assert got.code == "container-spec"
