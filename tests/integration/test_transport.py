"""Ring slots over real TCP on loopback: order, framing limits, cut connections."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from migsgx.datapath import slots, staging, transport
from migsgx.datapath.ring import ShmRing
from migsgx.datapath.ring_spec import RingTimeoutError
from migsgx.errors import ConnectionClosedError, FrameError, StreamError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(5)]

HEADER = struct.Struct(">IB")


@pytest.fixture
def tcp() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback: (sending end, receiving end)."""

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        transport.tune_socket(sock)
    yield client, server
    client.close()
    server.close()


class Background:
    """Run a function in a thread; re-raise its exception when joined."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = fn(*args, **kwargs)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> Any:
        self.thread.join(timeout=4)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


def chunks(seed: int, count: int, cap: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, cap - 1, cap, rng.randrange(cap + 1)]) for _ in range(count)]
    return [rng.randbytes(n) for n in sizes]


def produce(ring: ShmRing, payloads: list[bytes]) -> None:
    for k, data in enumerate(payloads):
        index, view = ring.acquire(timeout=2)
        view[: len(data)] = data
        ring.publish(index, len(data), final=k == len(payloads) - 1)


def consume(ring: ShmRing) -> list[bytes]:
    out = []
    while True:
        index, view, final = ring.next(timeout=2)
        out.append(bytes(view))
        ring.release(index)
        if final:
            return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ring_to_tcp_to_ring_keeps_bytes_and_order(
    tcp: tuple[socket.socket, socket.socket], seed: int
) -> None:
    client, server = tcp
    slot = random.Random(seed).choice([16, 4096, 65536 + 16])
    payloads = chunks(seed, 200, slot)
    src_p, src_c = ShmRing.pair(3, slot)
    dst_p, dst_c = ShmRing.pair(2, slot)
    with src_p, src_c, dst_p, dst_c:
        jobs = [
            Background(produce, src_p, payloads),
            Background(transport.ring_to_socket, src_c, client, timeout=2),
            Background(transport.socket_to_ring, server, dst_p, timeout=2),
        ]
        received = consume(dst_c)
        results = [job.join() for job in jobs]
    assert received == payloads
    assert results[1] == results[2] == sum(map(len, payloads))


def test_connection_cut_inside_a_chunk(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    client.sendall(HEADER.pack(1000, 0) + b"x" * 10)
    client.close()
    producer, consumer = ShmRing.pair(2, 4096)
    with producer, consumer, pytest.raises(FrameError):
        transport.socket_to_ring(server, producer, timeout=1)


def test_connection_cut_inside_a_header(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    client.sendall(HEADER.pack(10, 0)[:3])
    client.close()
    producer, consumer = ShmRing.pair(2, 4096)
    with producer, consumer, pytest.raises(FrameError):
        transport.socket_to_ring(server, producer, timeout=1)


def test_connection_reset_inside_a_chunk(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    client.sendall(HEADER.pack(1000, 0) + b"x" * 10)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # abortive close: the peer sees a reset
    producer, consumer = ShmRing.pair(2, 4096)
    with producer, consumer, pytest.raises((FrameError, ConnectionClosedError)):
        transport.socket_to_ring(server, producer, timeout=1)


def test_stream_without_a_final_chunk(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    client.sendall(HEADER.pack(3, 0) + b"abc")
    client.close()
    producer, consumer = ShmRing.pair(2, 4096)
    with producer, consumer:
        with pytest.raises(ConnectionClosedError):
            transport.socket_to_ring(server, producer, timeout=1)
        _, view, final = consumer.next(timeout=1)
        assert (bytes(view), final) == (b"abc", False)  # what came before is intact


def test_oversize_length_is_rejected_before_the_body(
    tcp: tuple[socket.socket, socket.socket],
) -> None:
    client, server = tcp
    # The body never comes: a receiver that waited for it would hang here.
    client.sendall(HEADER.pack(4097, 0) + b"body")
    producer, consumer = ShmRing.pair(2, 4096)
    with producer, consumer:
        with pytest.raises(FrameError, match="exceeds the cap"):
            transport.socket_to_ring(server, producer, timeout=1)
        server.settimeout(1)
        assert server.recv(16) == b"body"  # not a byte of the body was read
        with pytest.raises(RingTimeoutError):
            consumer.next(timeout=0.05)  # and no slot was published


def test_cap_below_the_slot_size(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    client.sendall(HEADER.pack(101, 0))
    producer, consumer = ShmRing.pair(2, 4096)
    with producer, consumer, pytest.raises(FrameError):
        transport.socket_to_ring(server, producer, max_chunk=100, timeout=1)


def test_unknown_flags_are_rejected(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    client.sendall(HEADER.pack(1, 0x02) + b"x")
    producer, consumer = ShmRing.pair(2, 4096)
    with producer, consumer, pytest.raises(FrameError, match="flags"):
        transport.socket_to_ring(server, producer, timeout=1)


def test_silent_peer_times_out(tcp: tuple[socket.socket, socket.socket]) -> None:
    _, server = tcp
    server.settimeout(0.1)
    producer, consumer = ShmRing.pair(2, 4096)
    with producer, consumer, pytest.raises(RingTimeoutError):
        transport.socket_to_ring(server, producer)


def test_sender_sees_a_closed_connection(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    server.close()
    producer, consumer = ShmRing.pair(2, 1 << 20)
    with producer, consumer:
        job = Background(produce, producer, [b"x" * (1 << 20)] * 64)
        with pytest.raises(ConnectionClosedError):
            transport.ring_to_socket(consumer, client, timeout=2)
        consumer.close()
        with pytest.raises(ConnectionClosedError):
            job.join()


def test_staging_keeps_chunk_boundaries(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    data = random.Random(7).randbytes(100_000)
    src_p, src_c = ShmRing.pair(2, 4112)
    dst_p, dst_c = ShmRing.pair(2, 4112)
    out = bytearray(len(data))
    with src_p, src_c, dst_p, dst_c, staging.Staging(1 << 20) as sent, \
            staging.Staging(1 << 20) as received:  # fmt: skip
        filler = Background(slots.fill_ring, src_p, data, 4112, timeout=2)
        sent.drain(src_c, timeout=2)
        filler.join()
        job = Background(sent.send, client)
        received.receive(server, cap=4112)
        assert job.join() == len(data)
        assert received.lengths == [4112] * 24 + [100_000 - 24 * 4112]
        drainer = Background(slots.drain_ring, dst_c, out, timeout=2)
        received.fill(dst_p, timeout=2)
        assert drainer.join() == len(data)
    assert out == data


def test_staging_too_small(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    with staging.Staging(1 << 20) as sent, staging.Staging(250) as received:
        sent.lengths, sent.used = [100, 100, 100], 300
        job = Background(sent.send, client)
        with pytest.raises(FrameError):
            received.receive(server, cap=100)
        client.close()
        job.join()


def test_reader_refuses_a_slot_after_the_final_one() -> None:
    producer, consumer = ShmRing.pair(2, 64)
    with producer, consumer:
        slots.fill_ring(producer, b"x" * 100, 64, timeout=2)
        reader = slots.SlotReader(consumer, timeout=2)
        assert bytes(reader.take()) == b"x" * 64
        assert bytes(reader.take()) == b"x" * 36
        assert reader.ended and reader.received == 100
        with pytest.raises(StreamError):
            reader.take()


def test_raw_endpoints_copy_a_buffer_through_tcp(
    tcp: tuple[socket.socket, socket.socket],
) -> None:
    client, server = tcp
    data = random.Random(8).randbytes(1_000_003)
    out = bytearray(len(data))
    src_p, src_c = ShmRing.pair(3, 65536)
    dst_p, dst_c = ShmRing.pair(3, 65536)
    with src_p, src_c, dst_p, dst_c:
        jobs = [
            Background(slots.fill_ring, src_p, data, 65536),
            Background(transport.ring_to_socket, src_c, client),
            Background(transport.socket_to_ring, server, dst_p),
        ]
        assert slots.drain_ring(dst_c, out, timeout=2) == len(data)
        for job in jobs:
            job.join()
    assert out == data


def test_batch_scheduling_is_undone() -> None:
    def run() -> tuple[int, int]:
        with transport.batch_scheduling():
            inside = os.sched_getscheduler(0)
        return inside, os.sched_getscheduler(0)

    job = Background(run)  # a thread of its own: the policy is per thread
    assert job.join() == (os.SCHED_BATCH, os.SCHED_OTHER)
