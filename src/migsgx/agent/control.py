"""The tool's side of the control connection to a destination agent (mutual TLS).

Used by ``migsgx migrate`` (:mod:`.source`), by ``migsgx recover``
(:mod:`.recover_resolve`) and the guardian (:mod:`.redeliver`), which deliver
decisions or state on a connection of their own (:func:`ask_agent`).
:meth:`AgentConnection.greet` settles
the session's protocol version (:mod:`.versions`); every frame sent after it
carries only that version's fields.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from .._net import LivenessWatch, keep_alive
from .._trace import step
from ..errors import MigSGXError, ProtocolError
from ..wire import recv_frame, send_frame
from .protocol import CONTROL, CONTROL_FRAME_MAX, AgentError, RefusedError
from .tls import AgentIdentity, client_context, wrap_client
from .versions import (
    VERSION,
    ProtocolVersionError,
    check_needs,
    check_version,
    for_version,
    retry_offer,
    tool_accepts,
)

__all__ = ["CONNECT_TIMEOUT", "HANDSHAKE_TIMEOUT", "AgentConnection", "ask_agent"]

log = logging.getLogger("migsgx.migrate")

CONNECT_TIMEOUT: Final = 10.0
HANDSHAKE_TIMEOUT: Final = 10.0


class AgentConnection:
    """The mutual-TLS control connection to the destination agent.

    Its liveness does not depend on what the tool is doing: a
    :class:`~migsgx._net.LivenessWatch` fails it within the liveness bound of the
    peer's last sign of life, also while the tool is inside a long step that
    does not use it (CRIU's dump), and tells :meth:`on_dead`'s callbacks.
    """

    #: Why the watch failed the connection (None while it lives).
    dead: str | None = None
    _watch: LivenessWatch | None = None

    def __init__(self, to: tuple[str, int], identity: AgentIdentity, timeout: float) -> None:
        self.to = to
        self.identity = identity
        self.timeout = timeout
        #: The session's protocol version (:meth:`greet`); 1 until it is known.
        self.version = 1
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[str], None]] = []
        self.sock = self._connect()
        self._watch = LivenessWatch(self.sock, self._died).start()

    def on_dead(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once the watch fails the connection (at once if it did)."""

        with self._lock:
            if self.dead is None:
                self._callbacks.append(callback)
                return
            reason = self.dead
        callback(reason)

    def _died(self, reason: str) -> None:
        step("control-failed")
        log.warning("the control connection to %s:%d failed: %s", *self.to, reason)
        with self._lock:
            self.dead = reason
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(reason)

    def _why(self, exc: BaseException) -> str:
        """What to say of a failed send or receive: the watch's reason where it cut it."""

        why = self.dead or (self._watch.reason if self._watch is not None else None)
        return f"{exc} ({why})" if why is not None else str(exc)

    def _connect(self) -> ssl.SSLSocket:
        host, port = self.to
        timeout = self.timeout
        try:
            raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise AgentError(f"cannot reach the agent at {host}:{port}: {exc}") from exc
        keep_alive(raw)  # a stalled network fails the step in seconds, not at the I/O timeout
        # A peer that accepts and never answers must not hold the tool for the
        # I/O timeout: the handshake has a short bound of its own.
        sock = wrap_client(
            client_context(self.identity), raw, host, min(timeout, HANDSHAKE_TIMEOUT)
        )
        sock.settimeout(timeout)
        return sock

    def greet(self, host_id: str, needs: Iterable[str] = ()) -> dict[str, Any]:
        """``hello`` -> ``welcome``: the session's version, checked against ``needs``.

        An agent of version 1 refuses the offer of a newer version (and ends
        that connection): greeted again on a fresh one with an offer of 1, it
        gets version 1's frames.  Raises :class:`~.versions.ProtocolVersionError`
        (nothing moved) when the agent is too old for ``needs`` or too new for
        this tool.
        """

        offered = VERSION
        while True:
            try:
                welcome = self.call({"t": "hello", "version": offered, "host_id": host_id},
                                    "welcome")  # fmt: skip
                break
            except RefusedError as exc:
                code = str(exc.context.get("remote_code", ""))
                again = retry_offer(offered, code)
                if code == ProtocolVersionError.code:
                    raise ProtocolVersionError(
                        f"the agent at {self.to[0]}:{self.to[1]} refused this tool's control "
                        f"protocol (versions up to {offered}): {exc.context.get('why', exc)}"
                    ) from exc
                if again is None:
                    raise
                log.info(
                    "the agent at %s:%d refused protocol version %d (%s): greeting it again "
                    "with version %d, the previous release's",
                    self.to[0], self.to[1], offered, exc.context.get("why", code), again,
                )  # fmt: skip
                self.close()
                self.sock = self._connect()
                self._watch = LivenessWatch(self.sock, self._died).start()
                offered = again
        self.version = tool_accepts(offered, int(welcome["version"]))
        check_needs(self.version, needs, peer=f"the agent at {self.to[0]}:{self.to[1]}")
        return welcome

    def send(self, msg: Mapping[str, Any]) -> None:
        try:
            send_frame(self.sock, for_version(msg, self.version), max_size=CONTROL_FRAME_MAX)
        except OSError as exc:
            step("control-failed")
            raise AgentError(f"the destination agent went away: {self._why(exc)}") from exc

    def call(self, msg: Mapping[str, Any], expect: str) -> dict[str, Any]:
        self.send(msg)
        return self.receive(str(msg["t"]), expect)

    def receive(self, request: str, expect: str) -> dict[str, Any]:
        """The next answer to ``request`` (a second one, for post-copy's ``window``)."""

        try:
            reply = recv_frame(self.sock, CONTROL, max_size=CONTROL_FRAME_MAX)
        except (MigSGXError, OSError) as exc:
            step("control-failed")
            raise AgentError(
                f"no answer to {request} from the destination: {self._why(exc)}"
            ) from exc
        if reply["t"] == "err":
            raise RefusedError(
                f"destination: {request} failed: [{reply['code']}] {reply['message']}",
                remote_code=reply["code"],
                why=reply["message"],
            )
        check_version(reply, self.version)
        if reply["t"] != expect:
            raise ProtocolError(f"expected {expect}, the destination sent {reply['t']}")
        return reply

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        with contextlib.suppress(OSError):
            self.sock.close()


def ask_agent(
    to: tuple[str, int],
    identity: AgentIdentity,
    host_id: str,
    msg: Mapping[str, Any],
    expect: str,
    timeout: float,
) -> dict[str, Any]:
    """One request on a control connection of its own: greeted as ``host_id``, then closed.

    How ``migsgx recover`` delivers a decision (``deliver``) and the holder of
    committed source enclaves asks for a fresh enclave (``redeliver``; a
    ``refuse`` keeps its connection open until the revocation ended, since the
    destination's listener ends with it).  Raises what :class:`AgentConnection`
    raises.
    """

    control = AgentConnection(to, identity, timeout)
    try:
        control.greet(host_id)
        return control.call(msg, expect)
    finally:
        control.close()
