"""The ring and the TCP transport between real, separate processes.

Each child is this file run as a script with a role; rings travel to it with
``send_ring_fds`` over a unix socket it inherits.  Payloads are random-sized
chunks derived from a seed, so every process can check what it receives.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from migsgx.datapath import transport
from migsgx.datapath.ring import ShmRing
from migsgx.datapath.ring_handover import recv_ring_fds, send_ring_fds
from migsgx.datapath.ring_spec import RingRole
from migsgx.errors import ConnectionClosedError, FrameError, ProtocolError
from migsgx.lab import memstat

SLOT = 8192
COUNT = 300
#: Bounds on waits that only guard against a hang: child processes start slowly on a
#: loaded machine, and nothing here measures speed.
WAIT = 30


def payloads(seed: int, count: int = COUNT) -> Iterator[tuple[bytes, bool]]:
    rng = random.Random(seed)
    for k in range(count):
        n = rng.choice([0, 1, SLOT, rng.randrange(SLOT + 1)])
        yield rng.randbytes(n), k == count - 1


# --- child roles ------------------------------------------------------------------------
def child_producer(handover_fd: int, seed: int, mode: str, count: int = COUNT) -> None:
    """Take a ring end and fill it.

    ``mode`` "stall" stops half way; "announce" says "ready" on the hand-over
    socket once everything is imported, and at the end waits there until the
    parent hangs up, so that the parent can read our peak while we still map
    the ring.
    """

    handover = socket.socket(fileno=handover_fd)
    if mode == "announce":
        handover.send(b"ready")
    ring = recv_ring_fds(handover, RingRole.PRODUCER, timeout=WAIT)
    if mode != "announce":
        handover.close()
    for k, (data, final) in enumerate(payloads(seed, count)):
        if mode == "stall" and k == COUNT // 2:
            time.sleep(60)  # the parent kills us here
        index, view = ring.acquire(timeout=WAIT)
        view[: len(data)] = data
        ring.publish(index, len(data), final)
    ring.wait_drained(timeout=WAIT)
    if mode == "announce":
        handover.settimeout(5)
        handover.recv(16)
        handover.close()
    ring.close()


def child_sender(handover_fd: int, port: int) -> None:
    """Untrusted side of the source: make a ring, give it to the producer, send it on TCP."""

    ring = ShmRing.create(3, SLOT, RingRole.CONSUMER)
    with socket.socket(fileno=handover_fd) as handover:
        send_ring_fds(handover, ring)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        transport.tune_socket(sock)
        transport.ring_to_socket(ring, sock, timeout=WAIT)
        sock.shutdown(socket.SHUT_WR)
    ring.close()


def child_receiver(handover_fd: int, listen_fd: int) -> None:
    """Untrusted side of the destination: make a ring, give it away, fill it from TCP."""

    ring = ShmRing.create(2, SLOT, RingRole.PRODUCER)
    with socket.socket(fileno=handover_fd) as handover:
        send_ring_fds(handover, ring)
    with socket.socket(fileno=listen_fd) as listener:
        sock, _ = listener.accept()
    with sock:
        transport.socket_to_ring(sock, ring, timeout=WAIT)
    ring.wait_drained(timeout=WAIT)
    ring.close()


def child_hostile(handover_fd: int) -> None:
    """A producer that lies on the doorbell: a slot far out of range."""

    with socket.socket(fileno=handover_fd) as handover:
        _, fds, _, _ = socket.recv_fds(handover, 64, 2)
    with socket.socket(fileno=fds[1]) as doorbell:
        doorbell.send((1).to_bytes(1, "big") + bytes(3) + (10**6).to_bytes(4, "big") + bytes(4))
        doorbell.recv(64)  # wait for the parent to hang up


def child_cutter(port: int) -> None:
    """A sender that dies inside a chunk: header and half of the body, then nothing."""

    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(struct.pack(">IB", 1000, 0) + b"x" * 500)
    time.sleep(60)  # the parent kills us here


def child_idle_consumer(handover_fd: int) -> None:
    """A consumer that attaches and then never reads (the parent kills it)."""

    with socket.socket(fileno=handover_fd) as handover:
        ring = recv_ring_fds(handover, RingRole.CONSUMER, timeout=WAIT)
        handover.send(b"attached")
    with ring:
        time.sleep(60)


def main(argv: list[str]) -> None:
    role, *args = argv
    if role == "producer":
        child_producer(int(args[0]), int(args[1]), args[2], *map(int, args[3:]))
    elif role == "sender":
        child_sender(int(args[0]), int(args[1]))
    elif role == "receiver":
        child_receiver(int(args[0]), int(args[1]))
    elif role == "cutter":
        child_cutter(int(args[0]))
    elif role == "idle-consumer":
        child_idle_consumer(int(args[0]))
    elif role == "hostile":
        child_hostile(int(args[0]))
    else:
        raise SystemExit(f"unknown role {role}")


# --- tests ------------------------------------------------------------------------------
pytestmark = [pytest.mark.integration, pytest.mark.timeout(5)]


class Children:
    """Spawned children; every one is killed and reaped at the end of the test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: object, fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        argv = [sys.executable, os.path.abspath(__file__), *map(str, args)]
        proc = subprocess.Popen(argv, pass_fds=fds)
        self.procs.append(proc)
        return proc

    def wait_all(self) -> None:
        for proc in self.procs:
            assert proc.wait(timeout=WAIT) == 0

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    yield kids
    kids.cleanup()


def handover_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def drain(ring: ShmRing) -> Iterator[tuple[bytes, bool]]:
    while True:
        index, view, final = ring.next(timeout=WAIT)
        yield bytes(view), final
        ring.release(index)
        if final:
            return


@pytest.mark.parametrize("seed", [11, 12])
def test_four_processes_over_tcp(children: Children, seed: int) -> None:
    """producer -> sender -> TCP -> receiver -> this process, all in order and intact."""

    src_a, src_b = handover_pair()
    dst_a, dst_b = handover_pair()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with src_a, src_b, dst_a, dst_b, listener:
        children.spawn("producer", src_a.fileno(), seed, "run", fds=(src_a.fileno(),))
        children.spawn("sender", src_b.fileno(), port, fds=(src_b.fileno(),))
        children.spawn(
            "receiver", dst_a.fileno(), listener.fileno(), fds=(dst_a.fileno(), listener.fileno())
        )
        ring = recv_ring_fds(dst_b, RingRole.CONSUMER, timeout=WAIT)
    with ring:
        received = list(drain(ring))
    assert received == list(payloads(seed))
    children.wait_all()


def test_producer_killed_mid_stream_is_an_error_not_a_hang(children: Children) -> None:
    ring = ShmRing.create(3, SLOT, RingRole.CONSUMER)
    a, b = handover_pair()
    with a, b, ring:
        proc = children.spawn("producer", b.fileno(), 5, "stall", fds=(b.fileno(),))
        send_ring_fds(a, ring)
        expected = list(payloads(5))[: COUNT // 2]
        for data, _ in expected:
            index, view, _ = ring.next(timeout=WAIT)
            assert bytes(view) == data
            ring.release(index)
        proc.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ConnectionClosedError):
            ring.next()  # no timeout: the death itself must wake us
        assert time.monotonic() - start < WAIT  # woken by the death, not a hang


def test_consumer_killed_is_an_error_for_the_producer(children: Children) -> None:
    ring = ShmRing.create(2, SLOT, RingRole.PRODUCER)
    a, b = handover_pair()
    with a, b, ring:
        proc = children.spawn("idle-consumer", b.fileno(), fds=(b.fileno(),))
        send_ring_fds(a, ring)
        a.settimeout(WAIT)
        assert a.recv(16) == b"attached"
        for _ in range(2):
            index, _ = ring.acquire(timeout=1)
            ring.publish(index, 1)
        proc.kill()
        with pytest.raises(ConnectionClosedError):
            ring.acquire()  # no timeout: the death itself must wake us


def test_hostile_producer_process_gets_a_clean_error(children: Children) -> None:
    ring = ShmRing.create(2, SLOT, RingRole.CONSUMER)
    a, b = handover_pair()
    with a, b, ring:
        children.spawn("hostile", b.fileno(), fds=(b.fileno(),))
        send_ring_fds(a, ring)
        with pytest.raises(ProtocolError):
            ring.next(timeout=WAIT)


def test_sender_killed_inside_a_chunk_is_a_clean_error(children: Children) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        proc = children.spawn("cutter", listener.getsockname()[1])
        listener.settimeout(4)
        sock, _ = listener.accept()
    producer, consumer = ShmRing.pair(2, SLOT)
    with sock, producer, consumer:
        sock.settimeout(4)
        time.sleep(0.1)
        proc.kill()
        with pytest.raises(FrameError, match="inside a chunk"):
            transport.socket_to_ring(sock, producer, timeout=WAIT)


def test_peak_of_a_ring_transfer_is_about_the_ring(children: Children) -> None:
    """The producer process's peak grows by the slots it wrote, not by the stream."""

    ring = ShmRing.create(2, SLOT, RingRole.CONSUMER)
    a, b = handover_pair()
    with a, ring:
        proc = children.spawn("producer", b.fileno(), 21, "announce", 3000, fds=(b.fileno(),))
        b.close()
        a.settimeout(WAIT)
        assert a.recv(16) == b"ready"
        window = memstat.PeakWindow.start([proc.pid])
        send_ring_fds(a, ring)
        total = sum(len(data) for data, _ in drain(ring))
        ring.close()  # the child's wait for its slots ends ...
        overhead = window.overhead()[proc.pid]  # ... and it waits for us: read now
        assert window.total() == overhead
    assert proc.wait(timeout=WAIT) == 0
    assert total > 4 << 20  # megabytes went through ...
    assert overhead < 512 << 10  # ... the peak grew by far less


def test_memstat_names_a_missing_process() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for probe in (memstat.rss, memstat.peak_rss, memstat.reset_peak):
        with pytest.raises(memstat.MemStatError, match=str(gone.pid)):
            probe(gone.pid)
    with pytest.raises(memstat.MemStatError):
        memstat.rss(0)
    assert memstat.peak_rss(os.getpid()) >= memstat.rss(os.getpid()) > 0


if __name__ == "__main__":
    main(sys.argv[1:])
