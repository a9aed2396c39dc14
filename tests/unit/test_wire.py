"""Frames: the cap, the schema, and nothing but plain data, whatever the peer sends."""

from __future__ import annotations

import datetime as dt
import socket
import struct
from decimal import Decimal
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migsgx.channel import ECALL, LAUNCH, PLATFORM
from migsgx.errors import ConnectionClosedError, FrameError
from migsgx.wire import (
    HEADER,
    FrameDecoder,
    Schema,
    decode_body,
    encode,
    recv_frame,
    send_frame,
)

TOY = Schema(
    "toy",
    {
        "ping": {"n": int},
        "blob": {"data": bytes, "note": (str, type(None))},
        "flag": {"on": bool},
        "any": {"value": object},
    },
)


def _body(msg: Any) -> bytes:
    return cbor2.dumps(msg)


def test_encode_decode_roundtrip() -> None:
    frame = encode({"t": "blob", "data": b"\x00\xff", "note": "hi"})
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    dec = FrameDecoder(TOY)
    dec.receive(frame)
    assert list(dec.frames()) == [{"t": "blob", "data": b"\x00\xff", "note": "hi"}]


def test_optional_field_may_be_absent_or_null() -> None:
    assert decode_body(_body({"t": "blob", "data": b""}), TOY)["data"] == b""
    assert decode_body(_body({"t": "blob", "data": b"", "note": None}), TOY)["note"] is None


@pytest.mark.parametrize(
    "msg",
    [
        [1, 2],  # not a map
        "ping",
        {"n": 1},  # no type
        {"t": 7, "n": 1},  # type not a string
        {"t": "pong", "n": 1},  # unknown type
        {"t": "ping"},  # missing field
        {"t": "ping", "n": 1, "extra": 2},  # smuggled field
        {"t": "ping", "n": "1"},  # wrong type
        {"t": "ping", "n": 1.0},
        {"t": "ping", "n": True},  # bool is not an int here
        {"t": "blob", "data": "text", "note": None},
        {"t": "flag", "on": 1},  # an int is not a bool
        {"t": "blob", "data": b"", "note": 5},
    ],
)
def test_schema_refuses(msg: Any) -> None:
    with pytest.raises(FrameError):
        decode_body(_body(msg), TOY)


@pytest.mark.parametrize("value", [True, False, None, 0, -1, 2.5, "s", b"b", [1, [2]], {"k": 1}])
def test_any_field_takes_every_plain_value(value: Any) -> None:
    # An ECALL that returns a bool must not break the channel.
    assert decode_body(_body({"t": "any", "value": value}), TOY)["value"] == value
    assert decode_body(_body({"t": "ret", "id": 1, "value": value}), ECALL)["value"] == value
    assert decode_body(_body({"t": "ok", "value": value}), PLATFORM)["value"] == value


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC),  # tag 0/1
        Decimal("1.5"),  # tag 4
        {1, 2},  # tag 258
        cbor2.CBORTag(4242, b"x"),  # an unknown tag
        cbor2.undefined,
        cbor2.CBORSimpleValue(99),
    ],
)
def test_tagged_values_never_come_out(value: Any) -> None:
    body = cbor2.dumps({"t": "ecall", "id": 1, "fn": "f", "args": [value]})
    with pytest.raises(FrameError):
        decode_body(body, ECALL)
    with pytest.raises(FrameError):
        decode_body(body, None)


def _ecall_prefix() -> bytes:
    return (
        b"\xa4"
        + cbor2.dumps("t")
        + cbor2.dumps("ecall")
        + cbor2.dumps("id")
        + cbor2.dumps(1)
        + cbor2.dumps("fn")
        + cbor2.dumps("f")
        + cbor2.dumps("args")
    )


def test_regex_tag_is_refused() -> None:
    # Tag 35: cbor2 would hand out a compiled regular expression.
    body = _ecall_prefix() + b"\x81\xd8\x23" + cbor2.dumps("(a+)+$")
    with pytest.raises(FrameError):
        decode_body(body, ECALL)


def test_cyclic_value_is_refused() -> None:
    # Tags 28/29 (shared values): an array that contains itself.
    body = _ecall_prefix() + b"\xd8\x1c\x81\xd8\x1d\x00"
    with pytest.raises(FrameError):
        decode_body(body, ECALL)


def test_non_plain_map_key_is_refused() -> None:
    body = _ecall_prefix() + b"\x81\xa1\x82\x01\x02\x01"  # [{[1, 2]: 1}]
    with pytest.raises(FrameError):
        decode_body(body, ECALL)


def test_deep_nesting_is_a_frame_error() -> None:
    body = b"\xa1" + cbor2.dumps("t") + b"\x81" * 100_000 + b"\x00"
    with pytest.raises(FrameError):
        decode_body(body, ECALL)


@pytest.mark.parametrize(
    "value", [object(), {1, 2}, dt.date(2024, 1, 1), memoryview(b"ab"), {(1, 2): 3}]
)
def test_encode_refuses_what_the_peer_would_refuse(value: Any) -> None:
    with pytest.raises(FrameError):
        encode({"t": "ret", "id": 1, "value": value})


def test_encode_takes_tuples_and_bytearrays_and_shared_values() -> None:
    shared = [1, 2]
    frame = encode({"t": "ret", "id": 1, "value": [(1, 2), bytearray(b"x"), shared, shared]})
    assert decode_body(frame[4:], ECALL)["value"] == [[1, 2], b"x", [1, 2], [1, 2]]


def test_encode_refuses_cycles() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(FrameError):
        encode({"t": "ret", "id": 1, "value": loop})


def test_encode_cap() -> None:
    with pytest.raises(FrameError):
        encode({"t": "blob", "data": bytes(200)}, max_size=100)


# --- the sans-I/O decoder ---------------------------------------------------------
def test_decoder_reassembles_split_frames() -> None:
    frames = encode({"t": "ping", "n": 1}) + encode({"t": "ping", "n": 2})
    dec = FrameDecoder(TOY)
    out: list[dict[str, Any]] = []
    for i in range(len(frames)):
        dec.receive(frames[i : i + 1])
        out.extend(dec.frames())
    assert out == [{"t": "ping", "n": 1}, {"t": "ping", "n": 2}]
    assert dec.pending == 0


def test_decoder_waits_for_a_truncated_frame() -> None:
    frame = encode({"t": "ping", "n": 1})
    dec = FrameDecoder(TOY)
    dec.receive(frame[:-1])
    assert list(dec.frames()) == []
    assert dec.pending == len(frame) - 1


def test_decoder_refuses_oversize_header_before_the_body() -> None:
    dec = FrameDecoder(TOY, max_size=1024)
    dec.receive(HEADER.pack(1025))  # no body at all: the cap is checked first
    with pytest.raises(FrameError):
        list(dec.frames())


def test_decoder_refuses_garbage() -> None:
    dec = FrameDecoder(TOY)
    dec.receive(HEADER.pack(3) + b"\xff\xff\xff")
    with pytest.raises(FrameError):
        list(dec.frames())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_decode_body_only_raises_frame_error(data: bytes) -> None:
    for schema in (None, TOY, ECALL, PLATFORM, LAUNCH):
        try:
            decode_body(data, schema)
        except FrameError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_decoder_only_raises_frame_error(chunks: list[bytes]) -> None:
    dec = FrameDecoder(ECALL, max_size=4096)
    try:
        for chunk in chunks:
            dec.receive(chunk)
            list(dec.frames())
    except FrameError:
        pass


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_plain)
def test_fuzz_plain_values_roundtrip(value: Any) -> None:
    frame = encode({"t": "ret", "id": 1, "value": value})
    assert decode_body(frame[4:], ECALL)["value"] == value


@settings(max_examples=200, deadline=None)
@given(_plain, st.integers(0, 40), st.integers(0, 255))
def test_fuzz_mutated_frames_only_raise_frame_error(value: Any, pos: int, byte: int) -> None:
    body = bytearray(encode({"t": "ret", "id": 1, "value": value})[4:])
    body[pos % len(body)] = byte
    try:
        decode_body(bytes(body), ECALL)
    except FrameError:
        pass


# --- over a socket ----------------------------------------------------------------
def test_recv_frame_over_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, {"t": "ping", "n": 5})
        assert recv_frame(b, TOY) == {"t": "ping", "n": 5}
        a.close()
        with pytest.raises(ConnectionClosedError):
            recv_frame(b, TOY)


def test_recv_frame_checks_the_cap_before_reading_the_body() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(HEADER.pack(1 << 30))  # claims 1 GiB, sends nothing more
        b.settimeout(2)
        with pytest.raises(FrameError):
            recv_frame(b, TOY, max_size=1 << 20)


def test_recv_frame_truncated_body() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(HEADER.pack(100) + b"\xa0" * 10)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(FrameError):
            recv_frame(b, TOY)


def test_recv_frame_truncated_header() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\x00\x00")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(FrameError):
            recv_frame(b, TOY)
