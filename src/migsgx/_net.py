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
#: a slow peer is not a dead one.
LIVENESS_SECONDS: Final = 4


def keep_alive(sock: socket.socket, seconds: int = LIVENESS_SECONDS) -> None:
    """Make a stalled or dead peer fail ``sock`` within about ``seconds``."""

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, seconds - 1))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, seconds * 1000)
