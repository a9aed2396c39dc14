"""A sender learns at once that its receiver refused the stream (``PeerWatch``).

Both ends run in this process over a TCP connection on loopback; the receiver
stops reading and answers, as a destination does when a chunk fails.
"""

from __future__ import annotations

import socket

import pytest

from migsgx.criu.cancel import _same_peer
from migsgx.datapath.transport import PeerWatch, send_chunk
from migsgx.errors import ConnectionClosedError


def _pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        sender = socket.create_connection(listener.getsockname()[:2])
        receiver, _ = listener.accept()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sender.settimeout(60)  # far beyond the test: only the watch can end the send
    return sender, receiver


def test_a_refusal_fails_a_blocked_send_and_stays_readable() -> None:
    sender, receiver = _pair()
    with sender, receiver:
        watch = PeerWatch(sender)
        receiver.sendall(b"refused")  # it stopped reading the stream: a full window
        with pytest.raises(ConnectionClosedError):
            for _ in range(1000):  # 64 MiB: far more than the buffers hold
                send_chunk(sender, b"\0" * (64 << 10))
        watch.stop()
        assert watch.spoke
        assert sender.recv(16) == b"refused"  # the reason can still be read


def test_a_hang_up_fails_the_send() -> None:
    sender, receiver = _pair()
    with sender:
        watch = PeerWatch(sender)
        receiver.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionClosedError):
            for _ in range(1000):
                send_chunk(sender, b"\0" * (64 << 10))
        watch.stop()
        assert watch.spoke
        receiver.close()


def test_an_answer_after_the_final_chunk_is_left_alone() -> None:
    sender, receiver = _pair()
    with sender, receiver:
        watch = PeerWatch(sender)
        watch.final_going()
        send_chunk(sender, b"last", final=True)
        receiver.sendall(b"loaded")
        assert sender.recv(16) == b"loaded"  # nobody shut the sender down
        watch.stop()
        assert not watch.spoke
        send_chunk(sender, b"more")  # still writable


def test_a_stopped_watch_ends_without_a_word() -> None:
    sender, receiver = _pair()
    with sender, receiver:
        watch = PeerWatch(sender)
        watch.stop()
        assert not watch.spoke


@pytest.mark.parametrize(
    ("peer", "server", "same"),
    [
        (("10.0.0.2", 7070), ("10.0.0.2", 7070), True),
        (("::ffff:10.0.0.2", 7070, 0, 0), ("10.0.0.2", 7070), True),
        (("10.0.0.2", 7071), ("10.0.0.2", 7070), False),
        (("10.0.0.3", 7070), ("10.0.0.2", 7070), False),
        (("fe80::1%eth0", 7070, 0, 2), ("fe80::1", 7070), True),
        (("not an address", 7070), ("10.0.0.2", 7070), False),
    ],
)
def test_the_page_connection_is_found_by_its_peer_address(
    peer: tuple[str, int], server: tuple[str, int], same: bool
) -> None:
    assert _same_peer(peer, server) is same
