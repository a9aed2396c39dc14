"""The fault actions that act on a connection: relays that damage a stream, drops, stalls.

What :func:`~.faults.fault` returns at a point that carries bytes is carried out
here: :func:`flipping_relay` (one byte of an enclave stream flipped, or the stream
held), :func:`tampering_relay` (the page stream's frames corrupted, dropped,
reordered, truncated or replayed), :func:`cutting_relay` (a connection cut after N
bytes), :func:`connection_fault` and :func:`firewall_drop` (a connection dropped
or stalled at the firewall).  For tests of the failure paths only: nothing here
runs unless a test armed a point with ``MIGSGX_FAULT``.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from .faults import WAIT_LIMIT

__all__ = [
    "connection_fault", "cutting_relay", "firewall_drop", "flipping_relay", "tampering_relay",
]  # fmt: skip


def flipping_relay(
    peer: socket.socket,
    offset: int,
    hold: Callable[[], bool] | None = None,
    *,
    drop: bool = False,
    flip: bool = True,
) -> socket.socket:
    """A loopback relay to ``peer`` that flips one bit of byte ``offset`` sent through it.

    The untrusted side (or the network) corrupting one byte of an enclave stream:
    what the enclaves must catch.  Returns the relay's near end; bytes from the
    peer pass unchanged.  ``hold``: the damaged byte goes on only once it is true
    (polled, at most :data:`WAIT_LIMIT` seconds): the failure then reaches the
    source at a step the test names (``flip-byte-in-dump``: while the engine's
    CRIU writes the process's pages).  ``drop``: at that byte the relay shuts the
    connection down both ways instead (``drop-in-dump``: the stream dropped).
    ``flip`` False: byte ``offset`` goes on unchanged, only held (``hold-to-restored``:
    the enclave cannot reach LOADED before the destination restored the tree).
    """

    listener = socket.create_server(("127.0.0.1", 0))
    try:
        near = socket.create_connection(listener.getsockname()[:2])
        far, _ = listener.accept()
    finally:
        listener.close()

    def pump(src: socket.socket, dst: socket.socket, flip_at: int | None) -> None:
        seen = 0
        held: bytearray | None = None  # from the damaged byte on, until ``hold``
        deadline, ended = 0.0, False
        try:
            while True:
                if held is not None:
                    # Read on while holding: a sender left without a window for longer
                    # than its TCP user timeout (3 s) would fail for that instead.
                    if hold is not None and not hold() and time.monotonic() < deadline:
                        if ended:
                            time.sleep(0.005)
                        elif select.select([src], [], [], 0.005)[0]:
                            more = src.recv(1 << 16)
                            ended = not more
                            held += more
                        continue
                    if drop:
                        break  # (nothing from the byte on: both ends shut down below)
                    dst.sendall(held)
                    held = None
                    if ended:
                        break
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    data[flip_at - seen] ^= 0x01 if flip else 0x00
                    if hold is not None or drop:
                        held, deadline = data, time.monotonic() + WAIT_LIMIT
                seen += len(data)
                if held is None:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    for args in ((far, peer, offset), (peer, far, None)):
        threading.Thread(target=pump, args=args, name="migsgx-fault-relay", daemon=True).start()
    return near


#: What ``agent.page-stream`` can do to the page stream as it comes in.  ``corrupt``
#: flips one byte (any format, CRIU's TLS too); the others work on whole frames of
#: the sealed relay's format (``docs/spec/pagestream.md``: u32 length, body).
PAGE_STREAM_ACTIONS: Final = frozenset({"corrupt", "drop", "reorder", "truncate", "replay"})


def _frames(sock: socket.socket) -> Iterator[bytes]:
    """Whole length-prefixed frames from ``sock`` until EOF (a partial tail as it is)."""

    buf = bytearray()
    while data := sock.recv(1 << 20):
        buf += data
        while len(buf) >= 4:
            end = 4 + int.from_bytes(buf[:4], "big")
            if len(buf) < end:
                break
            yield bytes(buf[:end])
            del buf[:end]
    if buf:
        yield bytes(buf)


#: The frame ``drop``, ``reorder`` (with the next) and ``replay`` act on: the page
#: server answers CRIU's first request before the bulk of the pages comes, so the
#: first frames are a request and its wait; from the third on, frames follow each
#: other without one while the pages last (a frame that holds a request CRIU waits
#: on, dropped, stalls the stream instead: see the spec).  A process of more than
#: 8 MiB of pages (any Python process: two frames of at most 4 MiB) has a frame 3.
TAMPERED_FRAME: Final = 2
_EMPTY_FRAME: Final = 4 + 16  # length and tag only: the relay's last frame, no other


def _tamper_frames(src: socket.socket, dst: socket.socket, action: str) -> None:
    """``drop`` frame 2, ``reorder`` frames 2 and 3, ``truncate`` (withhold) the last
    frame, or ``replay`` frame 2 after the last."""

    kept: bytes | None = None
    for count, frame in enumerate(_frames(src)):
        if action == "truncate" and len(frame) == _EMPTY_FRAME:
            continue  # every page arrives; only the stream's end is missing
        if count == TAMPERED_FRAME and action in ("drop", "reorder", "replay"):
            kept = frame
            if action != "replay":
                continue
        dst.sendall(frame)
        if action == "reorder" and count == TAMPERED_FRAME + 1 and kept is not None:
            dst.sendall(kept)
            kept = None
    if kept is not None and action in ("reorder", "replay"):
        dst.sendall(kept)


def tampering_relay(conn: socket.socket, action: str, offset: int = 64 << 10) -> socket.socket:
    """A socket that carries ``conn``'s bytes, the inbound ones changed by ``action``.

    The relay stands where a network attacker would, between the peer and the
    local reader, and does exactly one named thing (:data:`PAGE_STREAM_ACTIONS`;
    ``corrupt`` flips the byte at ``offset``), so the test knows how the stream
    was damaged.
    """

    if action not in PAGE_STREAM_ACTIONS:
        raise ValueError(f"unknown page-stream action {action!r}")
    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def pump(src: socket.socket, dst: socket.socket, change: str | None) -> None:
        seen = 0
        try:
            if change not in (None, "corrupt"):
                _tamper_frames(src, dst, change)
            else:
                while data := src.recv(1 << 16):
                    if change is not None and seen <= offset < seen + len(data):
                        buf = bytearray(data)
                        buf[offset - seen] ^= 0x01
                        data = bytes(buf)
                    seen += len(data)
                    dst.sendall(data)
        except OSError:
            # The reader went away (it refused the stream): as a network would,
            # stop carrying either way, so that no writer waits on a full buffer.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    for args in ((conn, outer, action), (outer, conn, None)):
        threading.Thread(target=pump, args=args, name="migsgx-fault-relay", daemon=True).start()
    return inner


def firewall_drop(port: int) -> None:
    """A network stall of the TCP connections on local ``port`` (no process dies).

    This host's firewall drops their packets both ways from now on; the test
    that asked for it removes the rules.
    """

    for chain, side in (("INPUT", "--dport"), ("OUTPUT", "--sport")):
        subprocess.run(
            ["iptables", "-I", chain, "-p", "tcp", side, str(port), "-j", "DROP"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip


#: A TLS 1.2/1.3 application-data record header and a body that cannot authenticate.
_DAMAGED_RECORD: Final = b"\x17\x03\x03\x00\x20" + b"\xa5" * 32


def connection_fault(sock: socket.socket, kind: str) -> None:
    """A network fault of one open connection: ``drop``, ``stall`` or ``corrupt``.

    ``corrupt`` puts one record on a TLS connection that fails authentication at
    the peer, as a byte flipped in flight makes any record fail (what the peer
    sees is the same ``bad_record_mac``); the bytes go past this end's TLS, so
    its own state is untouched.
    """

    if kind == "drop":
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    elif kind == "stall":
        firewall_drop(int(sock.getsockname()[1]))
    elif kind == "corrupt":
        with contextlib.suppress(OSError):
            os.write(sock.fileno(), _DAMAGED_RECORD)
    else:
        raise ValueError(f"unknown connection fault {kind!r}")


def cutting_relay(conn: socket.socket, after: int, kind: str) -> socket.socket:
    """A socket that carries ``conn``'s bytes until ``after`` have come in, then a fault.

    ``drop``: both ends are shut down (the connection breaks mid-stream);
    ``stall``: this host's firewall drops ``conn``'s packets from then on and the
    relay forwards nothing more (the stream stops, nothing closes).
    """

    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def inbound() -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := conn.recv(1 << 16):
                if seen + len(data) >= after:
                    outer.sendall(data[: max(0, after - seen)])
                    sys.stderr.write(f"migsgx fault: relay:{kind}-now at {time.monotonic():.6f}\n")
                    sys.stderr.flush()
                    if kind == "stall":
                        firewall_drop(int(conn.getsockname()[1]))
                        return  # nothing more is read: the peer's sends stop at the window
                    for sock in (conn, outer):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                    return
                seen += len(data)
                outer.sendall(data)
        with contextlib.suppress(OSError):
            outer.shutdown(socket.SHUT_WR)

    def outbound() -> None:
        with contextlib.suppress(OSError):
            while data := outer.recv(1 << 16):
                conn.sendall(data)

    for target in (inbound, outbound):
        threading.Thread(target=target, name="migsgx-fault-relay", daemon=True).start()
    return inner
