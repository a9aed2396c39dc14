"""The sealed page stream: frames, keys, and both relay ends wired back to back."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migsgx.agent.fault_relays import tampering_relay
from migsgx.core.pagestream import (
    DOWN,
    HEADER_SIZE,
    MAX_PAYLOAD,
    TAG_SIZE,
    UP,
    PageFrameOpener,
    PageFrameSealer,
    page_stream_key,
)
from migsgx.datapath.pagerelay import PageRelay, local_pair, relay_keys
from migsgx.errors import PageStreamError

KEY = bytes(range(32))
SID = b"S" * 16


def _stream(payloads: list[bytes]) -> list[bytes]:
    sealer = PageFrameSealer(page_stream_key(KEY, SID, UP))
    frames = [sealer.seal(p) for p in payloads]
    return [*frames, sealer.seal(b"", last=True)]


def _open_all(frames: list[bytes], key: bytes | None = None) -> bytes:
    opener = PageFrameOpener(key or page_stream_key(KEY, SID, UP))
    out = b""
    for frame in frames:
        payload, _ = opener.open(frame)
        out += payload
    opener.end()
    return out


def test_frames_round_trip_and_sizes() -> None:
    frames = _stream([b"a" * 100, b"", b"b" * 5000])
    assert [len(f) for f in frames] == [HEADER_SIZE + n + TAG_SIZE for n in (100, 0, 5000, 0)]
    assert _open_all(frames) == b"a" * 100 + b"b" * 5000


def test_keys_differ_by_direction_session_and_data_key() -> None:
    keys = {
        page_stream_key(KEY, SID, UP),
        page_stream_key(KEY, SID, DOWN),
        page_stream_key(KEY, b"T" * 16, UP),
        page_stream_key(bytes(32), SID, UP),
    }
    assert len(keys) == 4
    with pytest.raises(ValueError):
        page_stream_key(KEY, SID, b"sideways")


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda f: [f[1], f[0], *f[2:]], id="reorder"),
        pytest.param(lambda f: f[1:], id="drop-first"),
        pytest.param(lambda f: f[:-1], id="truncate-last"),
        pytest.param(lambda f: [*f, f[0]], id="replay-after-last"),
        pytest.param(lambda f: [f[0], f[0], *f[1:]], id="repeat"),
        pytest.param(lambda f: [f[0][:-1] + bytes([f[0][-1] ^ 1]), *f[1:]], id="flip-tag"),
        pytest.param(lambda f: [f[0][:4] + bytes([f[0][4] ^ 0x80]) + f[0][5:], *f[1:]], id="flip"),
        pytest.param(lambda f: [f[-1]], id="only-last"),
    ],
)
def test_every_change_of_the_frame_sequence_is_refused(tamper: object) -> None:
    frames = _stream([b"x" * 64, b"y" * 64, b"z" * 64])
    assert callable(tamper)
    with pytest.raises(PageStreamError):
        _open_all(tamper(frames))


def test_the_other_direction_key_does_not_open() -> None:
    with pytest.raises(PageStreamError):
        _open_all(_stream([b"x"]), key=page_stream_key(KEY, SID, DOWN))


def test_a_length_over_the_cap_is_refused_before_reading_the_body() -> None:
    with pytest.raises(PageStreamError):
        PageFrameOpener.body_size((MAX_PAYLOAD + TAG_SIZE + 1).to_bytes(4, "big"))
    with pytest.raises(PageStreamError):
        PageFrameOpener.body_size((TAG_SIZE - 1).to_bytes(4, "big"))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=6))
def test_any_payloads_round_trip(payloads: list[bytes]) -> None:
    assert _open_all(_stream(payloads)) == b"".join(payloads)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_garbage_in_place_of_a_frame_is_only_ever_refused(garbage: bytes) -> None:
    opener = PageFrameOpener(page_stream_key(KEY, SID, UP))
    with pytest.raises(PageStreamError):
        opener.open(garbage)
        opener.end()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.data())
def test_any_changed_byte_of_a_stream_is_refused(
    payloads: list[bytes], data: st.DataObject
) -> None:
    """One byte anywhere (a length, a body, a tag, the last frame) changed: refused."""

    wire = bytearray(b"".join(_stream(payloads)))
    at = data.draw(st.integers(0, len(wire) - 1))
    wire[at] ^= data.draw(st.integers(1, 255))
    opener = PageFrameOpener(page_stream_key(KEY, SID, UP))
    with pytest.raises(PageStreamError):
        rest = bytes(wire)
        while rest:
            if len(rest) < HEADER_SIZE:
                raise PageStreamError("cut")  # what the relay says of a frame cut short
            size = opener.body_size(rest[:HEADER_SIZE])
            frame, rest = rest[: HEADER_SIZE + size], rest[HEADER_SIZE + size :]
            if len(frame) < HEADER_SIZE + size:
                raise PageStreamError("cut")
            opener.open(frame)
        opener.end()


# --- the relay, both ends in this process -------------------------------------------------
def _relays(action: str | None = None) -> tuple[socket.socket, socket.socket, PageRelay, PageRelay]:
    """(CRIU's socket at the source, the page server's at the destination, relays)."""

    src_ours, src_criu = local_pair()
    dst_ours, dst_criu = local_pair()
    wire_src, wire_dst = socket.socketpair()
    if action is not None:
        wire_dst = tampering_relay(wire_dst, action, offset=100)
    source = PageRelay(src_ours, wire_src, **relay_keys(KEY, SID, source=True)).start()
    dest = PageRelay(dst_ours, wire_dst, **relay_keys(KEY, SID, source=False)).start()
    return src_criu, dst_criu, source, dest


def _drain(sock: socket.socket, into: bytearray) -> None:
    while data := sock.recv(1 << 16):
        into += data


def _run(action: str | None, data: bytes) -> tuple[bytes, bytes, PageRelay, PageRelay]:
    criu, server, source, dest = _relays(action)
    got, answer = bytearray(), bytearray()
    reader = threading.Thread(target=_drain, args=(server, got))
    reader.start()
    try:
        for i in range(0, len(data), 100_000):
            criu.sendall(data[i : i + 100_000])
        criu.shutdown(socket.SHUT_WR)
    except OSError:
        assert action is not None  # the relay refused the stream and shut CRIU's socket
    reader.join(30)
    if action is None:
        server.sendall(b"\x00\x00\x00\x00")  # the page server's status answer
    server.close()
    with contextlib.suppress(OSError):
        _drain(criu, answer)
    criu.close()
    return bytes(got), bytes(answer), source, dest


def test_the_relay_carries_both_directions_and_ends_cleanly() -> None:
    data = bytes(range(256)) * 40_000  # ~10 MiB: several frames
    got, answer, source, dest = _run(None, data)
    assert got == data and answer == b"\x00" * 4
    source.finish(10)
    dest.finish(10)
    assert source.sent == len(data) == dest.received


@pytest.mark.parametrize("action", ["corrupt", "drop", "reorder", "truncate", "replay"])
def test_a_tampered_page_stream_fails_at_the_destination(action: str) -> None:
    data = bytes(range(256)) * 80_000  # 20 MiB: more than four frames
    got, _answer, source, dest = _run(action, data)
    with pytest.raises(PageStreamError):
        dest.finish(10)
    source.dispose()
    if action in ("truncate", "replay"):
        assert got == data  # every page arrived: only the end of the stream tells
    else:
        assert len(got) < len(data)  # nothing after the damage reaches the page server
