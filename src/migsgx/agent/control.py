"""The tool's side of the control connection to a destination agent (mutual TLS).

Used by ``migsgx migrate`` (:mod:`.source`) and by ``migsgx recover``
(:mod:`.recover`), which delivers decisions on a connection of its own.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Mapping
from typing import Any, Final

from .._net import keep_alive
from ..errors import MigSGXError, ProtocolError
from ..wire import recv_frame, send_frame
from .protocol import CONTROL, CONTROL_FRAME_MAX, AgentError, RefusedError
from .tls import AgentIdentity, client_context, wrap_client

__all__ = ["CONNECT_TIMEOUT", "HANDSHAKE_TIMEOUT", "AgentConnection"]

CONNECT_TIMEOUT: Final = 10.0
HANDSHAKE_TIMEOUT: Final = 10.0


class AgentConnection:
    """The mutual-TLS control connection to the destination agent."""

    def __init__(self, to: tuple[str, int], identity: AgentIdentity, timeout: float) -> None:
        host, port = to
        try:
            raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise AgentError(f"cannot reach the agent at {host}:{port}: {exc}") from exc
        keep_alive(raw)  # a stalled network fails the step in seconds, not at the I/O timeout
        # A peer that accepts and never answers must not hold the tool for the
        # I/O timeout: the handshake has a short bound of its own.
        self.sock: ssl.SSLSocket = wrap_client(
            client_context(identity), raw, host, min(timeout, HANDSHAKE_TIMEOUT)
        )
        self.sock.settimeout(timeout)

    def send(self, msg: Mapping[str, Any]) -> None:
        try:
            send_frame(self.sock, msg, max_size=CONTROL_FRAME_MAX)
        except OSError as exc:
            raise AgentError(f"the destination agent went away: {exc}") from exc

    def call(self, msg: Mapping[str, Any], expect: str) -> dict[str, Any]:
        self.send(msg)
        return self.receive(str(msg["t"]), expect)

    def receive(self, request: str, expect: str) -> dict[str, Any]:
        """The next answer to ``request`` (a second one, for post-copy's ``window``)."""

        try:
            reply = recv_frame(self.sock, CONTROL, max_size=CONTROL_FRAME_MAX)
        except (MigSGXError, OSError) as exc:
            raise AgentError(f"no answer to {request} from the destination: {exc}") from exc
        if reply["t"] == "err":
            raise RefusedError(
                f"destination: {request} failed: [{reply['code']}] {reply['message']}",
                remote_code=reply["code"],
            )
        if reply["t"] != expect:
            raise ProtocolError(f"expected {expect}, the destination sent {reply['t']}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
