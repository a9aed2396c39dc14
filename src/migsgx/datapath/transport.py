"""Moving ring slots over a TCP connection with as few copies as the socket API allows.

Chunk framing (version 1) of a bulk transfer, one frame per slot::

    u32 big-endian length N | u8 flags | N bytes of payload

``flags`` bit 0 (``FLAG_FINAL``) marks the last chunk of the stream; every other
bit is zero.  ``N`` may be zero.  The receiver checks ``N`` against its cap (at
most the destination ring's slot size) *before* it reads a byte of the body,
so a peer cannot make it read more than one slot.  The stream ends with the
final chunk; the connection may carry other traffic after it.  A connection
that ends before the final chunk raises
:class:`~migsgx.errors.ConnectionClosedError` (at a chunk boundary) or
:class:`~migsgx.errors.FrameError` (inside a header or body).

The framing carries opaque bytes: in a migration they are sealed chunks whose
authentication (order, truncation, tampering) the enclaves check end to end.

Data path
    *Sender*: take a filled slot from a ring (consumer end), ``sendmsg`` the
    5-byte header and the slot's view in one call (the kernel copies once, from
    the shared pages into the socket), release the slot.
    *Receiver*: read the header, check the length, acquire a slot of the
    destination ring (producer end), ``recv_into`` the body straight into it,
    publish it.

``sendfile``/``splice`` from the ring would avoid that copy but are not used: the
kernel keeps referring to the pages after the call returns, and the ring reuses
a slot as soon as it is released, which would change bytes still in flight.

This module is the untrusted movers' side.  The enclave's end of a ring (its dump
and load loops, which never touch a socket) is :mod:`.slots`; sequential mode's
whole-state buffer, moved over the same framing, is :mod:`.staging`.

Defaults, from the bulk-path probe that preceded ``migsgx bench state`` (1 GiB,
four processes on two cores, AES-256-GCM in the enclave processes)
    The memory a migration adds is, summed over the four processes, about
    ``4 * slots * slot_size``: two rings, each mapped by two processes.  Keeping
    that at 0.1 % of the enclave leaves room under a 0.15 % ceiling, and gives
    128 KiB chunks with 2 slots for a 1 GiB enclave: the default
    (:data:`migsgx.limits.DEFAULT_CHUNK_SIZE`, ``--chunk-size`` to change it).
    A third or fourth slot did not help; bigger chunks do help but cost memory
    linearly.  Sealing inline in the enclave process beat sealing in a worker
    thread (which also costs a thread stack and a malloc arena).
    ``SCHED_BATCH`` (:func:`batch_scheduling`) cut the CPU spent per GiB by
    9-28 % with 64 and 128 KiB chunks, by sparing a context switch per chunk;
    with rings of 768 KiB and more it made no reliable difference.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..core.peer import CHUNK_HEADER, FLAG_FINAL
from ..errors import ConnectionClosedError, FrameError
from .ring import ShmRing
from .ring_spec import RingTimeoutError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "PeerWatch",
    "batch_scheduling",
    "context_switches",
    "read_chunk_header",
    "recv_exactly_into",
    "ring_to_socket",
    "send_chunk",
    "shutdown_quietly",
    "socket_to_ring",
    "tune_socket",
]

# The chunk frame's layout is the peer protocol's (migsgx.core.peer); this module moves it.


def tune_socket(
    sock: socket.socket, *, nodelay: bool = True, buffer_size: int | None = None
) -> None:
    """Set ``TCP_NODELAY`` and, if given, fixed send and receive buffer sizes.

    ``buffer_size=None`` leaves the kernel's autotuning on.  On loopback, fixed
    buffers of 256 KiB to 4 MiB measured within the run-to-run noise of it; a fixed
    size also caps the TCP window, which a long, fast network path needs large.
    Fixed sizes are capped by ``net.core.wmem_max``/``rmem_max``.  Socket buffers
    are kernel memory, outside any process's resident set.
    """

    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_size is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)


@contextlib.contextmanager
def batch_scheduling() -> Iterator[None]:
    """Run the calling thread under ``SCHED_BATCH`` for a bulk transfer.

    A batch thread does not preempt the running one when it wakes, so a producer
    that frees a slot lets its peer go on instead of switching at once.  Needs no
    privilege; the earlier policy comes back afterwards.  A thread that is not
    under ``SCHED_OTHER`` (say, real-time) is left alone.
    """

    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        yield
        return
    param = os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, param)


def context_switches() -> int:
    """This process's context switches so far, every thread's, voluntary or not.

    A bulk loop that sleeps and wakes once per chunk shows here: the figures
    say how often each end of the datapath waited for its peer.
    """

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


# --- one chunk ------------------------------------------------------------------------
def send_chunk(sock: socket.socket, payload: Buffer, *, final: bool = False) -> None:
    """Send one framed chunk: header and payload in one ``sendmsg`` when it all fits."""

    body = memoryview(payload).cast("B")
    total = CHUNK_HEADER.size + len(body)
    header = CHUNK_HEADER.pack(len(body), FLAG_FINAL if final else 0)
    try:
        sent = sock.sendmsg([header, body])
        if sent < total:
            if sent < CHUNK_HEADER.size:
                sock.sendall(header[sent:])
                sent = CHUNK_HEADER.size
            sock.sendall(body[sent - CHUNK_HEADER.size :])
    except TimeoutError as exc:
        raise RingTimeoutError("the peer stopped reading the connection") from exc
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ConnectionClosedError("the peer closed the connection") from exc
    finally:
        body.release()


def recv_exactly_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; a connection that ends first is a :class:`FrameError`."""

    want = len(view)
    got = 0
    try:
        while got < want:
            r = sock.recv_into(view[got:], want - got, socket.MSG_WAITALL)
            if r == 0:
                raise FrameError(
                    f"connection closed inside a chunk ({got} of {want} bytes)", got=got, want=want
                )
            got += r
    except TimeoutError as exc:
        raise RingTimeoutError("the peer stopped sending inside a chunk") from exc
    except ConnectionResetError as exc:
        raise FrameError("connection reset inside a chunk", got=got, want=want) from exc


def read_chunk_header(sock: socket.socket, header: bytearray, max_len: int) -> tuple[int, bool]:
    """Read and check one chunk header into ``header`` (a reusable 5-byte buffer).

    Returns ``(length, final)``.  ``length`` is at most ``max_len``; nothing of the
    body has been read.
    """

    view = memoryview(header)
    try:
        first = sock.recv_into(view, CHUNK_HEADER.size, socket.MSG_WAITALL)
    except TimeoutError as exc:
        raise RingTimeoutError("the peer sent no chunk within the timeout") from exc
    except ConnectionResetError as exc:
        raise ConnectionClosedError("connection reset before the final chunk") from exc
    if first == 0:
        raise ConnectionClosedError("connection closed before the final chunk")
    if first < CHUNK_HEADER.size:
        recv_exactly_into(sock, view[first:])
    length, flags = CHUNK_HEADER.unpack(header)
    if flags & ~FLAG_FINAL:
        raise FrameError("unknown chunk flags", flags=flags)
    if length > max_len:
        raise FrameError(f"chunk of {length} bytes exceeds the cap of {max_len}", length=length)
    return length, bool(flags & FLAG_FINAL)


# --- a peer that speaks while it should listen ----------------------------------------
class PeerWatch:
    """Fails a stream being sent the moment its receiver speaks or hangs up early.

    A receiver sends nothing until it has the final chunk, except its refusal (a
    chunk that did not authenticate, an enclave that died): then it stops
    reading, and a sender blocked in ``send`` would learn of it only when the
    kernel gives up on the connection, seconds later.  This thread waits for
    the connection to become readable (or hung up) before the final chunk left;
    then it shuts down the sending direction, so the blocked ``send`` fails at
    once, while the refusal itself stays readable (:attr:`spoke`).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._stop_r, self._stop_w = os.pipe()
        self._final = False
        #: The receiver spoke (or hung up) before the final chunk went.
        self.spoke = False
        self._thread = threading.Thread(target=self._run, name="migsgx-peer-watch", daemon=True)
        self._thread.start()

    def final_going(self) -> None:
        """The final chunk goes now: from here on the receiver may answer."""

        self._final = True

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLRDHUP)
        poller.register(self._stop_r, select.POLLIN)
        try:
            ready = {fd for fd, _ in poller.poll()}
        except (OSError, ValueError):
            return
        if self._stop_r in ready or self._final:
            return
        self.spoke = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)


# --- ring <-> socket --------------------------------------------------------------------
def ring_to_socket(
    ring: ShmRing,
    sock: socket.socket,
    *,
    timeout: float | None = None,
    before_final: Callable[[], None] | None = None,
) -> int:
    """Send every slot of ``ring`` (consumer end) until its final slot; return payload bytes.

    ``before_final`` is called right before the final chunk goes (a :class:`PeerWatch`
    then knows that the peer may answer).
    """

    total = 0
    while True:
        index, view, final = ring.next(timeout)
        if final and before_final is not None:
            before_final()
        send_chunk(sock, view, final=final)
        total += len(view)
        ring.release(index)
        if final:
            return total


def socket_to_ring(
    sock: socket.socket,
    ring: ShmRing,
    *,
    max_chunk: int | None = None,
    timeout: float | None = None,
) -> int:
    """Receive chunks into ``ring`` (producer end) until the final one; return payload bytes.

    ``max_chunk`` caps the accepted length below the ring's slot size.
    """

    cap = ring.slot_size if max_chunk is None else min(max_chunk, ring.slot_size)
    header = bytearray(CHUNK_HEADER.size)
    total = 0
    while True:
        length, final = read_chunk_header(sock, header, cap)
        index, slot = ring.acquire(timeout)
        recv_exactly_into(sock, slot[:length])
        ring.publish(index, length, final)
        total += length
        if final:
            return total


def shutdown_quietly(sock: socket.socket) -> None:
    """Half-close the sending direction, ignoring a peer that is already gone."""

    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
