"""The fault relay in front of an enclave stream (``agent/faults.py``: ``flipping_relay``).

Real loopback TCP: a listener stands in for the destination agent.  While the
relay holds the damaged byte it reads on, so the sender is never left without a
window (its 3 s TCP user timeout would fail the stream for that instead).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from migsgx.agent.fault_relays import flipping_relay

SIZE = 32 << 20  # more than the kernel's buffers both ways hold
OFFSET = 1 << 20


@pytest.fixture
def destination() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the relay's peer, the destination's end)."""

    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname()[:2])
    far, _ = listener.accept()
    listener.close()
    yield peer, far
    for sock in (peer, far):
        sock.close()


def _receive_all(sock: socket.socket, into: bytearray) -> threading.Thread:
    def run() -> None:
        while data := sock.recv(1 << 16):
            into.extend(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_relay_reads_on_while_it_holds_the_damaged_byte(
    destination: tuple[socket.socket, socket.socket],
) -> None:
    peer, far = destination
    release = threading.Event()
    near = flipping_relay(peer, OFFSET, release.is_set)
    got = bytearray()
    receiver = _receive_all(far, got)
    sent = bytes(range(256)) * (SIZE // 256)
    near.settimeout(10)
    near.sendall(sent)  # completes while held: the relay takes it all in
    near.shutdown(socket.SHUT_WR)
    assert len(got) <= OFFSET  # nothing from the damaged byte on yet
    release.set()
    receiver.join(30)
    assert len(got) == SIZE
    assert got[:OFFSET] == sent[:OFFSET] and got[OFFSET + 1 :] == sent[OFFSET + 1 :]
    assert got[OFFSET] == sent[OFFSET] ^ 0x01  # one bit of the one byte
    near.close()


def test_a_drop_shuts_the_stream_down_at_the_byte(
    destination: tuple[socket.socket, socket.socket],
) -> None:
    peer, far = destination
    release = threading.Event()
    near = flipping_relay(peer, OFFSET, release.is_set, drop=True)
    got = bytearray()
    receiver = _receive_all(far, got)
    near.settimeout(30)
    near.sendall(b"\0" * (2 * OFFSET))
    release.set()
    receiver.join(30)
    assert not receiver.is_alive()  # the destination saw the end
    assert len(got) <= OFFSET  # and nothing from the byte on
    assert near.recv(1) == b""  # so does the sender
    near.close()
