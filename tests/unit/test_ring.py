"""The shared-memory ring within one process: order, wraparound, misuse, hostile peers."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migsgx.datapath.ring import ShmRing
from migsgx.datapath.ring_handover import recv_ring_fds, send_ring_fds
from migsgx.datapath.ring_spec import RingRole, RingSpec, RingTimeoutError
from migsgx.errors import ConnectionClosedError, ProtocolError
from migsgx.limits import MAX_SLOTS

pytestmark = pytest.mark.timeout(5)

MSG = struct.Struct(">BBHII")
FILLED, FREE, FINAL = 1, 2, 1


@pytest.fixture
def pair() -> Iterator[tuple[ShmRing, ShmRing]]:
    producer, consumer = ShmRing.pair(3, 64)
    yield producer, consumer
    producer.close()
    consumer.close()


def hostile(role: RingRole, slots: int = 3, slot_size: int = 64) -> tuple[ShmRing, socket.socket]:
    """A ring end whose peer is a raw doorbell socket the test writes by hand."""

    ring = ShmRing.create(slots, slot_size, role)
    _, doorbell_fd = ring.peer_fds()
    raw = socket.socket(fileno=os.dup(doorbell_fd))
    ring.peer_handed_over()
    return ring, raw


def put(producer: ShmRing, payload: bytes, final: bool = False) -> int:
    index, view = producer.acquire(timeout=1)
    view[: len(payload)] = payload
    producer.publish(index, len(payload), final)
    return index


def take(consumer: ShmRing) -> tuple[bytes, bool]:
    index, view, final = consumer.next(timeout=1)
    data = bytes(view)
    consumer.release(index)
    return data, final


# --- normal operation ----------------------------------------------------------------
def test_wraparound_keeps_order_and_reuses_slots(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    seen = []
    for k in range(20):
        seen.append(put(producer, k.to_bytes(4, "big") * 8, final=k == 19))
        data, final = take(consumer)
        assert data == k.to_bytes(4, "big") * 8
        assert final == (k == 19)
    assert set(seen) == {0, 1, 2}
    assert seen[:6] == [0, 1, 2, 0, 1, 2] or len(set(seen[:3])) == 3


def test_all_slots_in_flight_then_acquire_times_out(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    for k in range(3):
        put(producer, bytes([k]) * 10)
    with pytest.raises(RingTimeoutError):
        producer.acquire(timeout=0.05)
    # Delivered in publication order, each with its own length.
    assert [take(consumer)[0] for _ in range(3)] == [bytes([k]) * 10 for k in range(3)]
    put(producer, b"again", final=True)
    assert take(consumer) == (b"again", True)


def test_consumer_times_out_when_nothing_comes(pair: tuple[ShmRing, ShmRing]) -> None:
    _, consumer = pair
    with pytest.raises(RingTimeoutError):
        consumer.next(timeout=0.05)


def test_zero_length_and_full_slots(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    put(producer, b"")
    put(producer, b"x" * 64, final=True)
    assert take(consumer) == (b"", False)
    assert take(consumer) == (b"x" * 64, True)


def test_wait_drained_returns_when_every_slot_is_back(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    put(producer, b"a")
    put(producer, b"b", final=True)
    take(consumer)
    with pytest.raises(RingTimeoutError):
        producer.wait_drained(timeout=0.05)
    take(consumer)
    producer.wait_drained(timeout=1)


@settings(max_examples=25, deadline=None)
@given(
    slots=st.integers(1, 5),
    sizes=st.lists(st.integers(0, 100), min_size=1, max_size=40),
)
def test_random_sizes_arrive_intact(slots: int, sizes: list[int]) -> None:
    producer, consumer = ShmRing.pair(slots, 100)
    with producer, consumer:
        received = []
        pending = 0
        for k, n in enumerate(sizes):
            if pending == slots:
                received.append(take(consumer)[0])
                pending -= 1
            put(producer, bytes([k % 251]) * n, final=k == len(sizes) - 1)
            pending += 1
        while pending:
            received.append(take(consumer)[0])
            pending -= 1
    assert received == [bytes([k % 251]) * n for k, n in enumerate(sizes)]


# --- local misuse --------------------------------------------------------------------
def test_local_misuse_is_refused(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    with pytest.raises(ValueError):
        producer.publish(0, 1)  # never acquired
    index, _ = producer.acquire()
    with pytest.raises(ValueError):
        producer.publish(index, 65)  # longer than a slot
    with pytest.raises(ValueError):
        producer.publish(7, 1)
    producer.publish(index, 1)
    with pytest.raises(ValueError):
        producer.publish(index, 1)  # twice
    with pytest.raises(RuntimeError):
        producer.next()
    with pytest.raises(RuntimeError):
        consumer.acquire()
    got, _, _ = consumer.next(timeout=1)
    consumer.release(got)
    with pytest.raises(ValueError):
        consumer.release(got)  # twice
    with pytest.raises(ValueError):
        consumer.release(-1)


def test_views_die_with_their_slot(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    index, view = producer.acquire()
    producer.publish(index, 4)
    with pytest.raises(ValueError):
        view[0] = 1  # released at publish
    got, cview, _ = consumer.next(timeout=1)
    assert cview.readonly
    consumer.release(got)
    with pytest.raises(ValueError):
        bytes(cview)


def test_nothing_after_the_final_slot(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    put(producer, b"end", final=True)
    with pytest.raises(RuntimeError):
        producer.acquire()
    assert take(consumer) == (b"end", True)
    with pytest.raises(RuntimeError):
        consumer.next()


def test_close_with_an_exported_view_does_not_raise() -> None:
    np = pytest.importorskip("numpy")
    producer, consumer = ShmRing.pair(2, 4096)
    _, view = producer.acquire()
    array = np.frombuffer(view, dtype=np.uint8)
    producer.close()
    consumer.close()
    assert array.shape == (4096,)
    producer.close()  # idempotent


def test_geometry_bounds() -> None:
    with pytest.raises(ValueError):
        RingSpec(0, 64)
    with pytest.raises(ValueError):
        RingSpec(MAX_SLOTS + 1, 64)
    with pytest.raises(ValueError):
        RingSpec(2, 0)


# --- peers that go away ----------------------------------------------------------------
def test_producer_death_is_an_error_not_a_hang(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    producer.close()
    with pytest.raises(ConnectionClosedError):
        consumer.next()  # no timeout: end of file must wake it
    with pytest.raises(ConnectionClosedError):
        consumer.next()  # and it stays dead


def test_consumer_death_is_an_error_for_the_producer(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    for _ in range(3):
        put(producer, b"x")
    consumer.close()
    with pytest.raises(ConnectionClosedError):
        producer.acquire()
    producer2, consumer2 = ShmRing.pair(2, 8)
    consumer2.close()
    index, _ = producer2.acquire()
    with pytest.raises(ConnectionClosedError):
        producer2.publish(index, 1)
    producer2.close()


def test_messages_sent_before_a_close_still_arrive(pair: tuple[ShmRing, ShmRing]) -> None:
    producer, consumer = pair
    put(producer, b"one")
    assert take(consumer) == (b"one", False)  # its FREE stays unread by the producer
    put(producer, b"two")
    put(producer, b"three", final=True)
    producer.close()  # closing with unread messages: the kernel reports a reset first
    assert take(consumer) == (b"two", False)
    assert take(consumer) == (b"three", True)  # releasing to a gone producer is fine


# --- hostile peers ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "message",
    [
        MSG.pack(FILLED, 0, 0, 3, 1),  # slot out of range
        MSG.pack(FILLED, 0, 0, 0xFFFFFFFF, 1),
        MSG.pack(FILLED, 0, 0, 0, 65),  # longer than the slot
        MSG.pack(FILLED, 0, 0, 0, 0xFFFFFFFF),
        MSG.pack(FILLED, 0x80, 0, 0, 1),  # unknown flag
        MSG.pack(FILLED, 0, 1, 0, 1),  # padding
        MSG.pack(FREE, 0, 0, 0, 0),  # a consumer's message
        MSG.pack(9, 0, 0, 0, 0),  # unknown kind
        MSG.pack(FILLED, 0, 0, 0, 1)[:5],  # short
        MSG.pack(FILLED, 0, 0, 0, 1) + b"\0" * 9,  # long
    ],
)
def test_hostile_producer_gets_a_clean_error(message: bytes) -> None:
    consumer, raw = hostile(RingRole.CONSUMER)
    with consumer, raw:
        raw.send(message)
        with pytest.raises(ProtocolError):
            consumer.next(timeout=1)
        raw.send(MSG.pack(FILLED, 0, 0, 0, 1))
        with pytest.raises(ProtocolError):
            consumer.next(timeout=1)  # a broken end stays broken


def test_hostile_producer_cannot_refill_a_held_slot() -> None:
    consumer, raw = hostile(RingRole.CONSUMER)
    with consumer, raw:
        raw.send(MSG.pack(FILLED, 0, 0, 1, 10))
        index, view, _ = consumer.next(timeout=1)
        assert (index, len(view)) == (1, 10)
        raw.send(MSG.pack(FILLED, 0, 0, 1, 10))
        with pytest.raises(ProtocolError):
            consumer.next(timeout=1)


@pytest.mark.parametrize(
    "message",
    [
        MSG.pack(FREE, 0, 0, 2, 0),  # a slot the producer holds, never published
        MSG.pack(FREE, 0, 0, 3, 0),  # out of range
        MSG.pack(FREE, 0, 0, 0, 5),  # nonzero length
        MSG.pack(FREE, FINAL, 0, 0, 0),  # flags
        MSG.pack(FILLED, 0, 0, 0, 1),  # a producer's message
        b"",  # reads as end of file
    ],
)
def test_hostile_consumer_gets_a_clean_error(message: bytes) -> None:
    producer, raw = hostile(RingRole.PRODUCER)
    with producer, raw:
        put(producer, b"x")
        put(producer, b"y")
        producer.acquire()  # slot 2: acquired, not published
        raw.send(message)
        with pytest.raises((ProtocolError, ConnectionClosedError)):
            producer.acquire(timeout=1)


def test_double_free_is_a_protocol_error() -> None:
    producer, raw = hostile(RingRole.PRODUCER, slots=2)
    with producer, raw:
        put(producer, b"x")  # slot 0
        put(producer, b"y")  # slot 1
        raw.send(MSG.pack(FREE, 0, 0, 0, 0))
        raw.send(MSG.pack(FREE, 0, 0, 0, 0))
        assert producer.acquire(timeout=1)[0] == 0
        with pytest.raises(ProtocolError):
            producer.acquire(timeout=1)


# --- attaching to what a peer hands over ------------------------------------------------
def test_memfd_is_sealed_against_shrinking() -> None:
    ring = ShmRing.create(2, 4096, RingRole.PRODUCER)
    with ring:
        memfd, _ = ring.peer_fds()
        with pytest.raises(PermissionError):
            os.ftruncate(memfd, 4096)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_attach_refuses_unsealed_or_wrong_size_memory() -> None:
    spec = RingSpec(2, 4096)
    for size, seal in ((spec.size, False), (spec.size + 4096, True)):
        memfd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, size)
        if seal:
            fcntl.fcntl(
                memfd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            )
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        doorbell_fd = a.detach()
        with pytest.raises(ProtocolError):
            ShmRing.attach(memfd, doorbell_fd, spec, RingRole.CONSUMER)
        assert _closed(memfd) and _closed(doorbell_fd)
        b.close()


def test_attach_refuses_a_doorbell_that_is_not_seqpacket() -> None:
    ring = ShmRing.create(2, 4096, RingRole.PRODUCER)
    with ring:
        memfd, _ = ring.peer_fds()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with pytest.raises(ProtocolError):
            ShmRing.attach(os.dup(memfd), a.detach(), ring.spec, RingRole.CONSUMER)
        b.close()
        r, w = os.pipe()
        with pytest.raises(ProtocolError):
            ShmRing.attach(os.dup(memfd), r, ring.spec, RingRole.CONSUMER)
        assert _closed(r)
        os.close(w)


def test_hand_over_through_a_unix_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        ring = ShmRing.create(2, 128, RingRole.CONSUMER)
        send_ring_fds(a, ring)
        with pytest.raises(RuntimeError):
            ring.peer_fds()  # handed over: our copies are gone
        producer = recv_ring_fds(b, RingRole.PRODUCER, timeout=1)
        with ring, producer:
            put(producer, b"over", final=True)
            assert take(ring) == (b"over", True)


def test_hand_over_for_the_wrong_role_is_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        ring = ShmRing.create(2, 128, RingRole.CONSUMER)
        with ring:
            send_ring_fds(a, ring)
            with pytest.raises(ProtocolError):
                recv_ring_fds(b, RingRole.CONSUMER, timeout=1)


@pytest.mark.parametrize(
    "header",
    [
        b"XXXX" + bytes(12),
        struct.pack(">4sBBHII", b"MSRG", 2, 1, 0, 2, 128),  # version
        struct.pack(">4sBBHII", b"MSRG", 1, 1, 0, 0, 128),  # no slots
        struct.pack(">4sBBHII", b"MSRG", 1, 1, 0, 2, 1 << 30),  # huge slots
        struct.pack(">4sBBHII", b"MSRG", 1, 1, 0, 4, 128),  # size does not match
    ],
)
def test_hand_over_with_a_bad_header_is_refused(header: bytes) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        ring = ShmRing.create(2, 128, RingRole.CONSUMER)
        with ring:
            socket.send_fds(a, [header], list(ring.peer_fds()))
            with pytest.raises(ProtocolError):
                recv_ring_fds(b, RingRole.PRODUCER, timeout=1)


def test_hand_over_without_descriptors_or_peer() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with b:
        a.send(struct.pack(">4sBBHII", b"MSRG", 1, 1, 0, 2, 128))
        with pytest.raises(ProtocolError):
            recv_ring_fds(b, RingRole.PRODUCER, timeout=1)
        with pytest.raises(RingTimeoutError):
            recv_ring_fds(b, RingRole.PRODUCER, timeout=0.05)
        a.close()
        with pytest.raises(ConnectionClosedError):
            recv_ring_fds(b, RingRole.PRODUCER, timeout=1)


def test_a_frame_in_place_of_the_hand_over_is_left_unread() -> None:
    """The sender died after its ``__mig_ring`` frame, and another driver (the
    guardian, holding a duplicate of the connection) sends its own frame: the
    receiver refuses without taking a byte of it, so that frame is read whole."""

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        frame = b"\x00\x00\x00\x2a" + b"{an ecall frame of the guardian}"
        a.sendall(frame)
        with pytest.raises(ProtocolError, match="left unread"):
            recv_ring_fds(b, RingRole.PRODUCER, timeout=1)
        assert b.recv(len(frame), socket.MSG_WAITALL) == frame
