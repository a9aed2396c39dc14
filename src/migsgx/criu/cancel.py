"""Stopping a running CRIU dump from another thread, so that the source runs again at once.

A migration streams its enclaves while CRIU dumps the rest of the tree.  When an
enclave stream fails, the migration is lost whatever CRIU does next, and every
second CRIU keeps the tree frozen is a second the source cannot run.  CRIU has
no request to cancel a dump, and killing it is never safe (its parasite code may
be inside the dumped tasks).  Its own error path is: it cures the tasks, unlocks
the network and resumes them.  Two ways lead there, both used by
:class:`DumpCancel`:

* the **page stream**: CRIU ignores SIGPIPE, so when its connection to the
  destination's page server is shut down, its next write or read fails and the
  dump fails.  The connection is found among CRIU's descriptors by its peer
  address (the page server's), duplicated with ``pidfd_getfd`` and shut down;
  any other socket CRIU holds (the dumped tasks' own, while it dumps them) is
  left alone;
* the **relay**: when the pages go through a local socket pair to a relay
  (:mod:`migsgx.datapath.pagerelay`), the engine registers a stop
  (:meth:`DumpCancel.add_stop`) that shuts the relay down, with the same effect;
* the **image directory**: an engine that runs CRIU itself (``runc checkpoint``)
  writes the images to a local directory; a driver can mount a tmpfs of its own
  there and register a stop (:meth:`DumpCancel.add_stop`) that shrinks it to
  what is written: CRIU's next write fails (:mod:`migsgx.containers.imagefs`);
* the **next notification**: CRIU asks at several steps (``pre-dump``, and
  once the tree is frozen ``query-ext-files``, ``network-lock`` when it dumps
  a network namespace, finally ``post-dump``); a cancelled dump answers "no"
  (:meth:`DumpCancel.check`), which covers a cancel that comes before the page
  connection exists, and dumps without a page server.

The same descriptor lets the tool give CRIU's page connection the liveness
every other connection of a migration has (keep-alive and a user timeout of
:data:`~migsgx._net.LIVENESS_SECONDS`): CRIU sets none, so a page
stream stalled by the network (packets dropped, nothing closed) held the
frozen source until TCP gave up after many minutes.  Now the kernel fails
CRIU's next write within seconds, and CRIU resumes the tree.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from migsgx._fds import tcp_connections
from migsgx._net import keep_alive
from migsgx.errors import CriuError

__all__ = ["DumpCancel"]

log = logging.getLogger("migsgx.criu")

#: How often the page-stream watch looks for CRIU's page connection.
PAGE_STREAM_POLL = 0.02


class DumpCancel:
    """A one-shot cancel for one dump, triggered from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._server: tuple[str, int] | None = None
        self.reason: str | None = None
        #: How many page-server connections a cancel shut down (0: none found).
        self.broken = 0
        #: Whether a notification was answered "no" because of the cancel.
        self.vetoed = False
        #: How many of the drivers' stops (:meth:`add_stop`) cut the dump.
        self.cut = 0
        self._stops: list[Callable[[], int]] = []

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    @property
    def stopped_early(self) -> bool:
        """Whether the cancel cut the dump short (rather than coming after it ended)."""

        return self.broken > 0 or self.vetoed or self.cut > 0

    def add_stop(self, stop: Callable[[], int]) -> None:
        """A driver's way to cut its engine's dump (returns 1 if it did); run on the
        cancel, or at once when the dump was cancelled already."""

        with self._lock:
            self._stops.append(stop)
            if self.reason is not None:
                self._stop(stop)

    def remove_stop(self, stop: Callable[[], int]) -> None:
        """The engine's dump ended: that stop must not run any more."""

        with self._lock, contextlib.suppress(ValueError):
            self._stops.remove(stop)

    def bind(self, pid: int, page_server: tuple[str, int] | None) -> None:
        """CRIU runs as ``pid`` (its page stream goes to ``page_server``)."""

        with self._lock:
            self._pid, self._server = pid, page_server
            if self.reason is not None:
                self._break()
                return
        if page_server is not None:
            threading.Thread(
                target=self._watch_page_stream, args=(pid, page_server),
                name="migsgx-criu-page-liveness", daemon=True,
            ).start()  # fmt: skip

    def _watch_page_stream(self, pid: int, server: tuple[str, int]) -> None:
        """Once CRIU has connected to the page server, give that connection liveness.

        Polls CRIU's descriptors until the connection is there (within the
        first moments of the dump) or this dump is over.
        """

        while True:
            with self._lock:
                if self._pid != pid or self.reason is not None:
                    return
                try:
                    if _each_peer_socket(pid, server, keep_alive):
                        return
                except OSError:
                    return  # CRIU ended
            time.sleep(PAGE_STREAM_POLL)

    def unbind(self) -> None:
        """CRIU ended: a later cancel touches nothing (the pid may be reused)."""

        with self._lock:
            self._pid = None

    def cancel(self, reason: str) -> None:
        """Stop the dump: the first reason counts; later calls change nothing."""

        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            if self._pid is not None:
                self._break()
            for stop in self._stops:
                self._stop(stop)

    def check(self) -> None:
        """Raise if cancelled: called at CRIU's notifications, whose veto ends the dump."""

        if self.reason is not None:
            self.vetoed = True
            raise CriuError(f"the dump was cancelled: {self.reason}", action="dump")

    def _stop(self, stop: Callable[[], int]) -> None:
        try:
            self.cut += stop()
        except OSError as exc:
            log.warning("cannot cut the engine's dump (%s); it stops at its next step", exc)

    def _break(self) -> None:
        if self._pid is None or self._server is None:
            return
        try:
            self.broken += _shut_down_peer(self._pid, self._server)
        except OSError as exc:  # CRIU ended meanwhile, or the kernel lacks pidfd_getfd
            log.warning("cannot stop CRIU's page stream (%s); it stops at its next step", exc)


def _same_peer(peer: tuple[str, int], server: tuple[str, int]) -> bool:
    try:
        host = ipaddress.ip_address(peer[0].partition("%")[0])
        wanted = ipaddress.ip_address(server[0])
    except ValueError:
        return False
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    return host == wanted and int(peer[1]) == int(server[1])


def _shut_down_peer(pid: int, server: tuple[str, int]) -> int:
    """Shut down every TCP connection of process ``pid`` to ``server``; how many."""

    # The socket is shared with CRIU: its next send or receive fails.
    return _each_peer_socket(pid, server, lambda sock: sock.shutdown(socket.SHUT_RDWR))


def _each_peer_socket(
    pid: int, server: tuple[str, int], apply: Callable[[socket.socket], None]
) -> int:
    """``apply`` to every TCP connection of process ``pid`` to ``server``; how many.

    Each is a duplicate (``pidfd_getfd``) of CRIU's own: what is done to it
    (a shutdown, a socket option) is done to CRIU's connection.
    """

    count = 0
    os.close(os.pidfd_open(pid))  # (CRIU ended: ProcessLookupError, an OSError)
    for sock in tcp_connections(pid):
        with contextlib.suppress(OSError):
            if _same_peer(sock.getpeername(), server):
                apply(sock)
                count += 1
    return count
