"""Liveness of a TCP connection: what every connection of a migration gets.

Low in the layers so that CRIU's page connection (``migsgx.criu``) gets the
same bound as the agents' and the enclaves' connections (``migsgx.datapath``).
"""

from __future__ import annotations

import socket
from typing import Final

__all__ = ["LIVENESS_SECONDS", "keep_alive"]

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
