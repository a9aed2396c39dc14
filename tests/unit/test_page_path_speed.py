"""The page relay's work per MiB: frame sizes, receives per frame, and the checks kept.

Behaviour, not time: how many frames and receive calls carry a stream over real
loopback TCP, that nothing holds back a small frame (CRIU's request and answer
steps) or waits for more than is there, and that every kind of damage is still
refused.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from migsgx.agent.fault_relays import tampering_relay
from migsgx.core.pagestream import HEADER_SIZE, MAX_PAYLOAD, TAG_SIZE
from migsgx.datapath.pagerelay import PageRelay, local_pair, relay_keys
from migsgx.errors import PageStreamError

KEY = bytes(range(32))
SID = b"P" * 16
MiB = 1 << 20
WAIT = 30.0  # a hang fails the cell instead of holding the suite


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname()[:2])
        far, _ = listener.accept()
    return near, far


def _relays(
    frame_bytes: int = MAX_PAYLOAD, action: str | None = None
) -> tuple[socket.socket, socket.socket, PageRelay, PageRelay]:
    """(CRIU's end at the source, the page server's at the destination, both relays)."""

    src_ours, criu = local_pair()
    dst_ours, server = local_pair()
    wire_src, wire_dst = _tcp_pair()
    if action is not None:
        wire_dst = tampering_relay(wire_dst, action, offset=100)
    source = PageRelay(
        src_ours, wire_src, frame_bytes=frame_bytes, **relay_keys(KEY, SID, source=True)
    ).start()
    dest = PageRelay(dst_ours, wire_dst, **relay_keys(KEY, SID, source=False)).start()
    for sock in (criu, server):
        sock.settimeout(WAIT)
    return criu, server, source, dest


def _read(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


def _stream(data: bytes, frame_bytes: int = MAX_PAYLOAD) -> tuple[bytes, PageRelay, PageRelay]:
    criu, server, source, dest = _relays(frame_bytes)
    got = bytearray()

    def drain() -> None:
        while data := server.recv(1 << 16):
            got.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    criu.sendall(data)  # (all at once: CRIU splices as much as the socket takes)
    criu.shutdown(socket.SHUT_WR)
    reader.join(WAIT)
    server.close()
    criu.close()
    source.finish(WAIT)
    dest.finish(WAIT)
    return bytes(got), source, dest


def _pattern(n: int) -> bytes:
    return bytes(range(251)) * (n // 251) + bytes(n % 251)


def test_a_large_stream_goes_in_few_large_frames_and_few_receives() -> None:
    data = _pattern(24 * MiB + 12345)
    got, source, dest = _stream(data)
    assert got == data
    assert source.sent == dest.received == len(data)
    # Each frame but the last carries something; the source never splits finer
    # than CRIU's writes, and it gathers what waits: far fewer than one per 64 KiB.
    assert dest.frames_in == source.frames_out
    assert source.frames_out <= len(data) // (64 << 10)
    # Every receive takes what is there: at least one per frame's header and body,
    # and never fewer bytes per receive than one per frame would allow.
    assert dest.wire_receives >= 2 * dest.frames_in - 1


@pytest.mark.parametrize("frame_bytes", [64 << 10, MiB])
def test_the_source_never_seals_more_than_its_frame_size(frame_bytes: int) -> None:
    data = _pattern(6 * MiB)
    got, source, _dest = _stream(data, frame_bytes)
    assert got == data
    assert source.frames_out >= len(data) // frame_bytes + 1  # (and the empty last one)


def test_a_frame_size_beyond_the_format_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError):
        PageRelay(a, b, frame_bytes=MAX_PAYLOAD + 1, **relay_keys(KEY, SID, source=True))


def test_small_frames_after_a_large_one_are_not_held_back() -> None:
    """CRIU's steps wait for answers: after a body of many MiB, the next 4-byte
    request and its 4-byte answer must each arrive on their own."""

    criu, server, source, dest = _relays()
    try:
        big = _pattern(9 * MiB)
        criu.sendall(big)
        assert _read(server, len(big)) == big
        for i in range(40):
            ask = i.to_bytes(4, "big")
            criu.sendall(ask)
            assert _read(server, 4) == ask
            server.sendall(ask[::-1])
            assert _read(criu, 4) == ask[::-1]
        criu.shutdown(socket.SHUT_WR)
        assert _read(server, 1) == b""
        server.shutdown(socket.SHUT_WR)
        assert _read(criu, 1) == b""
        source.finish(WAIT)
        dest.finish(WAIT)
    finally:
        source.dispose()
        dest.dispose()
        criu.close()
        server.close()


def _damaged(action: str) -> tuple[bytes, PageRelay, PageRelay]:
    criu, server, source, dest = _relays(action=action)
    got = bytearray()

    def drain() -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(1 << 16):
                got.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    data = _pattern(18 * MiB)
    with contextlib.suppress(OSError):
        criu.sendall(data)
        criu.shutdown(socket.SHUT_WR)
    reader.join(WAIT)
    with pytest.raises(PageStreamError):
        dest.finish(WAIT)
    source.dispose()
    server.close()
    criu.close()
    return bytes(got), source, dest


@pytest.mark.parametrize("action", ["corrupt", "drop", "reorder", "truncate", "replay"])
def test_every_damage_over_tcp_is_refused(action: str) -> None:
    got, _source, _dest = _damaged(action)
    data = _pattern(18 * MiB)
    if action in ("truncate", "replay"):
        assert got == data  # every page came: only the end of the stream tells
    else:
        assert data.startswith(got) and len(got) < len(data)  # nothing after the damage


@pytest.mark.parametrize("cut", [2, HEADER_SIZE + 1000, HEADER_SIZE + MiB + 7])
def test_a_connection_cut_inside_a_frame_fails_and_does_not_hang(cut: int) -> None:
    """The sender's end closes in the middle of a header or a body: the receive
    returns, the stream fails."""

    from migsgx.core.pagestream import UP, PageFrameSealer, page_stream_key

    sealer = PageFrameSealer(page_stream_key(KEY, SID, UP))
    frame = sealer.seal(_pattern(2 * MiB))
    near, far = _tcp_pair()
    ours, server = local_pair()
    dest = PageRelay(ours, far, **relay_keys(KEY, SID, source=False)).start()
    try:
        near.sendall(frame[:cut])
        near.shutdown(socket.SHUT_WR)
        with pytest.raises(PageStreamError):
            dest.wait(WAIT)
        assert dest.received == 0  # nothing of an unverified frame reached the server
    finally:
        dest.dispose()
        near.close()
        server.close()


def test_a_length_over_the_cap_fails_before_any_body_is_read() -> None:
    near, far = _tcp_pair()
    ours, server = local_pair()
    dest = PageRelay(ours, far, **relay_keys(KEY, SID, source=False)).start()
    try:
        near.sendall((MAX_PAYLOAD + TAG_SIZE + 1).to_bytes(4, "big") + b"\x00" * 64)
        with pytest.raises(PageStreamError):
            dest.wait(WAIT)
        assert dest.wire_receives == 1  # the header alone
    finally:
        dest.dispose()
        near.close()
        server.close()


def test_what_came_of_a_frame_is_taken_at_once() -> None:
    """Part of a frame's body has come and the rest is slow: the receive takes what
    is there, leaving the wire's queue empty, so the window stays open.

    (A receive that waited for the rest of the frame, as with a low-water mark,
    left those bytes queued; on a page connection the queue filled, the window
    shut, and the dump and the page server each waited for the other for good.)
    """

    import fcntl
    import struct
    import termios
    import time

    from migsgx.core.pagestream import UP, PageFrameSealer, page_stream_key

    sealer = PageFrameSealer(page_stream_key(KEY, SID, UP))
    data = _pattern(2 * MiB)
    frame = sealer.seal(data) + sealer.seal(b"", last=True)
    near, far = _tcp_pair()
    far.settimeout(WAIT)  # (Python polls before each receive, as on a connection with a limit)
    ours, server = local_pair()
    dest = PageRelay(ours, far, **relay_keys(KEY, SID, source=False)).start()

    def queued() -> int:
        raw = fcntl.ioctl(far.fileno(), termios.FIONREAD, struct.pack("i", 0))
        return int(struct.unpack("i", raw)[0])

    try:
        part = HEADER_SIZE + 300_000
        near.sendall(frame[:part])
        deadline = time.monotonic() + WAIT
        while queued() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queued() == 0, "the receive left what came of the frame in the queue"
        near.sendall(frame[part:])
        near.shutdown(socket.SHUT_WR)
        assert _read(server, len(data)) == data
        assert _read(server, 1) == b""  # (the last frame came: the relay ended its side)
    finally:
        dest.dispose()
        near.close()
        server.close()
