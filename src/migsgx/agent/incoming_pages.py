"""An incoming migration's page connection: CRIU's pages from the source, through
a page server (CRIU's TLS) or the sealed page relay, and the bounded wait for it.

The page listener opens with ``begin``; the source connects to it when its dump
starts, which may come long after ``begin`` (a live migration's pre-copy runs
in between), so the accept itself waits as long as the session may.  By
``images_done`` the dump is over and the connection must have come: there the
wait has its own short bound (:data:`PAGE_CONNECT_WAIT`), and the control
connection's end (the peer hung up) ends it at once, so that a peer that asks
for the images' end and goes away holds neither this session's thread nor its
work directory for the I/O time limit.

Every wait of a request the tool waits on goes through one loop,
:meth:`_PageIntake._until`: its step's bound, and the control connection
looked at meanwhile (the enclaves' loads for ``enclaves_done``, the page
server's end and the page relay's finish for ``images_done``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .._net import keep_alive
from ..criu.pageserver import PageServer
from ..datapath.pagerelay import PageRelay, local_pair, relay_keys
from ..errors import ConnectionClosedError, MigSGXError
from .config import AgentConfig
from .fault_relays import cutting_relay, tampering_relay
from .faults import fault
from .lost_enclaves import hung_up
from .protocol import AgentError

__all__ = ["PAGE_CONNECT_WAIT", "HungUp", "_PageIntake"]

log = logging.getLogger("migsgx.agent")

#: Seconds ``images_done`` waits for a page connection that has not come yet (the
#: source's dump, which made it, is over by then: only a peer that never connects
#: leaves it waiting).
PAGE_CONNECT_WAIT: Final = 10.0
#: How often that wait looks at the control connection.
_LOOK: Final = 0.1


class HungUp(ConnectionClosedError):
    """The control connection's peer hung up while a request's step waited: the
    session ends as when its tool goes away between requests (never on the wire)."""


class _PageIntake:
    """The page connection of one incoming migration (a layer of its session state)."""

    config: AgentConfig
    tls: ssl.SSLSocket | socket.socket
    peer: str
    data_key: bytes
    session_id: bytes
    page_tls: bool
    page_relay: bool
    images_dir: Path | None
    _page_server: PageServer | None
    _page_error: BaseException | None
    _page_thread: threading.Thread | None
    _relay: PageRelay | None
    #: The page listener (``begin``) and whether the source's connection was accepted.
    _page_listener: socket.socket | None
    _page_accepted: threading.Event

    @property
    def tag(self) -> str:
        """The session's short name in the log (the session state's)."""

        raise NotImplementedError

    def _accept_page_server(self, listener: socket.socket) -> None:
        assert self.images_dir is not None
        try:
            while True:
                conn, addr = listener.accept()
                if addr[0] == self.peer:
                    break
                log.warning("migration %s: page connection from %s refused", self.tag, addr[0])
                conn.close()
            self._page_accepted.set()
            keep_alive(conn)  # a stalled network fails the page stream in seconds
            ident = self.config.identity
            tls = (ident.ca, ident.cert, ident.key) if self.page_tls else None
            action = fault("agent.page-stream")
            if action is not None and "-after-bytes=" in action:
                # ``drop-after-bytes=N``, ``stall-after-bytes=N``: mid-dump.
                kind, _, after = action.partition("-after-bytes=")
                conn = cutting_relay(conn, int(after), kind)
            elif action is not None:
                conn = tampering_relay(conn, action)
            if self.page_relay:
                ours, theirs = local_pair()
                with theirs:
                    self._page_server = PageServer(self.config.criu.binary, self.images_dir, theirs)
                keys = relay_keys(self.data_key, self.session_id, source=False)
                self._relay = PageRelay(ours, conn, **keys).start()
                return
            with conn:
                self._page_server = PageServer(
                    self.config.criu.binary, self.images_dir, conn, tls=tls
                )
        except (OSError, MigSGXError) as exc:
            self._page_error = exc

    def _until(
        self, done: Callable[[float], bool], seconds: float, what: str, after: str = ""
    ) -> None:
        """Wait until ``done(step)`` (it waits up to ``step`` seconds itself) says so,
        for at most ``seconds``; or until the control connection's peer hung up.

        A hang-up raises :class:`HungUp`, and the
        request loop ends the session as it ends one whose tool went away
        between requests (:meth:`IncomingMigration._lost`): whatever went past
        LOADED is held there, never discarded on the hang-up alone.  The bound
        raises :class:`~migsgx.agent.protocol.AgentError`: no ``what`` within
        ``seconds`` (``after``: of what).
        """

        deadline = time.monotonic() + seconds
        while not done(max(0.0, min(_LOOK, deadline - time.monotonic()))):
            if hung_up(self.tls):
                raise HungUp(f"the source hung up before its {what}")
            if time.monotonic() >= deadline:
                raise AgentError(f"no {what} within {seconds:g} s{after}")

    def _await_page_connection(self) -> None:
        """``images_done``: the page connection came (its page server started), or fail.

        At most :data:`PAGE_CONNECT_WAIT` seconds for a connection not yet
        accepted, less if the control connection's peer hung up meanwhile; the
        page listener is shut down then, so that its accept ends too (the
        session's end removes its directories).  Once accepted, the page
        server's start is waited for as before (the I/O time limit), and the
        peer's hang-up ends that wait too.
        """

        thread = self._page_thread
        assert thread is not None

        def accepted(step: float) -> bool:
            return self._page_accepted.wait(step) or not thread.is_alive()

        try:
            self._until(accepted, PAGE_CONNECT_WAIT, "page connection", " of the images' end")
        except MigSGXError:
            self._stop_page_accept()
            raise
        self._until(
            lambda step: _ended(thread, step),
            self.config.io_timeout,
            "page server start",
        )

    def _stop_page_accept(self) -> None:
        """End the page listener's accept now (a close alone does not wake it)."""

        listener = self._page_listener
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)


def _ended(thread: threading.Thread, step: float) -> bool:
    """Whether ``thread`` ended, waited for up to ``step`` seconds."""

    thread.join(step)
    return not thread.is_alive()
