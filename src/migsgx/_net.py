"""Liveness of a TCP connection: what every connection of a migration gets.

Low in the layers so that CRIU's page connection (``migsgx.criu``) gets the
same bound as the agents' and the enclaves' connections (``migsgx.datapath``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Final

__all__ = ["LIVENESS_SECONDS", "LivenessWatch", "keep_alive", "peer_silence"]

#: Seconds after which a peer that acknowledges nothing (a dead host, a stalled
#: network) fails the connection: keepalive probes when idle, TCP_USER_TIMEOUT
#: for unacknowledged data.  The kernel acknowledges for a busy process too, so
#: a slow peer is not a dead one (a receiver that reads nothing for this long,
#: its window closed, fails it too: Linux counts the time without a window against
#: the user timeout).  It is most of what a stalled network costs before the
#: source runs again: 4 s left under a second for the roll-back itself, which a
#: loaded machine took (stall faults back after 3.5-5.4 s at load 8-9, the rest of
#: the roll-back 0.05-0.3 s of it: docs/migration.md, "Where the seconds back go").
LIVENESS_SECONDS: Final = 3


def keep_alive(sock: socket.socket, seconds: int = LIVENESS_SECONDS) -> None:
    """Make a stalled or dead peer fail ``sock`` within about ``seconds``."""

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, seconds - 1))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, seconds * 1000)


#: How often a :class:`LivenessWatch` reads its connection's state.
WATCH_INTERVAL: Final = 0.1
#: ``struct tcp_info``: ``tcpi_state`` (u8) first; ``tcpi_last_data_recv`` and
#: ``tcpi_last_ack_recv`` (u32, milliseconds) at byte 52 (``linux/tcp.h``).
_INFO_LEN: Final = 60
_LAST_RECV: Final = struct.Struct("=II")
#: ``TCP_CLOSE``: the kernel gave the connection up (its own bound, or a reset).
_CLOSED: Final = 7


def peer_silence(sock: socket.socket) -> float | None:
    """Seconds since the peer last sent anything: data, or an acknowledgement (the
    answers to keep-alive probes included); None once the kernel gave the
    connection up (its own bound ran out, or the peer reset it)."""

    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _INFO_LEN)
    if info[0] == _CLOSED:
        return None
    data_ms, ack_ms = _LAST_RECV.unpack_from(info, 52)
    return float(min(data_ms, ack_ms)) / 1000.0


class LivenessWatch:
    """Fails a connection whose peer fell silent, whatever its owner is doing.

    The kernel's bound (:func:`keep_alive`) judges a connection only by its use:
    the user timeout counts from the first byte sent after a stall, so a stall
    that began while the owner was inside a long step (CRIU's dump) was noticed
    only the liveness bound after that step ended.  This thread reads the
    connection's state every :data:`WATCH_INTERVAL`: once the peer has
    acknowledged nothing for ``seconds`` (a healthy peer answers the keep-alive
    probe of an idle connection every second, and acknowledges data as it
    comes), or the kernel gave the connection up, it shuts the connection down,
    so that the owner's current or next send or receive fails at once, and
    calls ``on_dead`` with the reason (so that a step the owner is inside can
    be stopped).  A peer that closed the connection is left to the owner (what
    it sent before its end stays readable).
    """

    def __init__(
        self,
        sock: socket.socket,
        on_dead: Callable[[str], None],
        seconds: float = LIVENESS_SECONDS,
    ) -> None:
        self._sock = sock
        self._on_dead = on_dead
        self._seconds = seconds
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        #: Why the connection was failed (None while it lives).
        self.reason: str | None = None

    def start(self) -> LivenessWatch:
        threading.Thread(target=self._run, name="migsgx-liveness", daemon=True).start()
        return self

    def stop(self) -> None:
        """The owner closes the connection: nothing more is done to its descriptor."""

        with self._lock:
            self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(WATCH_INTERVAL):
            with self._lock:
                if self._stopped.is_set():
                    return
                try:
                    silence = peer_silence(self._sock)
                except OSError:
                    return  # (closed by its owner)
                if silence is not None and silence < self._seconds:
                    continue
                self.reason = (
                    "timed out: the kernel gave the connection up"
                    if silence is None
                    else f"timed out: the peer acknowledged nothing for {silence:.1f} s "
                    "(a stalled network or a dead host)"
                )
                _shut_down(self._sock)
                self._stopped.set()
            self._on_dead(self.reason)
            return


def _shut_down(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways through a duplicate of its descriptor (never its
    own object: another thread may be inside a TLS read on it)."""

    with contextlib.suppress(OSError):
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        with dup:
            dup.shutdown(socket.SHUT_RDWR)
