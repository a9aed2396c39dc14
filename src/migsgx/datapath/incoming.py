"""The destination end's wait for the decision: run on an authentic COMMIT, discard on ABORT.

After LOADED only an authentic decision, judged by the destination enclave,
ends the wait (``docs/spec/commit.md``): it comes on the data connection or is
delivered by the agents' TLS channel; a frame the enclave does not find
authentic changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable

from ..core.commit import CommitError
from ..core.peer import PEER_FRAME_MAX
from ..errors import (
    EnclaveLostError,
    FrameError,
    MigrationError,
    MigSGXError,
    ProtocolError,
    ReplayError,
)
from ..wire import recv_frame
from .incoming_load import _SOURCE_GONE, _IncomingLoad, _SourceGone
from .peerwire import PEER, _check_received, _send


class IncomingEnclave(_IncomingLoad):
    """Destination side: launch a fresh enclave, load the state, run on COMMIT."""

    #: A pidfd of the enclave process, opened once it loaded (:meth:`lives`).
    _pidfd: int | None = None
    #: Its process had ended already when it was to be pinned.
    _ended = False

    def wait_commit(
        self,
        timeout: float | None = None,
        before_claim: Callable[[], None] | None = None,
        after_claim: Callable[[], None] | None = None,
        blocked: Callable[[], None] | None = None,
    ) -> socket.socket:
        """Wait for the source's decision; on COMMIT the enclave runs: return its connection.

        Only the destination enclave judges the decision.  A COMMIT token or an
        ABORT frame that it does not find authentic changes nothing and the wait
        goes on (``docs/spec/handshake.md``, 9.2): the untrusted side cannot talk
        the destination out of its copy while the source may have committed.
        Rejected frames are kept in :attr:`rejected`.  Decisions come on the
        data connection or through :meth:`deliver` (the agents' TLS channel,
        ``docs/spec/commit.md``); a lost data connection ends nothing.  On a
        timeout the copy is kept, in doubt.  ``blocked`` is called each time a
        decision could not be judged because the enclave's platform service is
        away (the enclave lives and waits for it).
        """

        if self.peer is None or self.link is None:
            raise MigrationError("nothing was received")
        self._pin_process()
        threading.Thread(
            target=self._read_peer, args=(self.peer,), name="migsgx-decision", daemon=True
        ).start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise MigrationError("no authentic decision from the source in time")
            try:
                frame = self._inbox.get(timeout=remaining)
            except queue.Empty as exc:
                raise MigrationError("no authentic decision from the source in time") from exc
            if frame is None:
                continue  # the data connection is gone; a delivery may still come
            if isinstance(frame, _SourceGone):
                self.decided = True
                self._abort_quietly("the source enclave died before it decided")
                raise MigrationError(
                    "the source enclave died before it decided: no decision can come"
                )
            if before_claim is not None:
                before_claim()  # (fault injection: window W2)
            if self.link is None:
                raise MigrationError("the destination enclave is gone")
            try:
                self.link.call("__mig_commit_in", frame)
            except EnclaveLostError as exc:
                if self.lives():
                    # The enclave lives, its platform service does not (the claim
                    # needs it; the enclave's own wait for a restarted one ended):
                    # a failed claim is no decision.  The copy waits on; a later
                    # delivery may find the service back, and the enclave
                    # re-attaches to it.
                    self.platform_blocked = True
                    self.rejected.append(exc)
                    if blocked is not None:
                        blocked()
                    continue
                # This copy is gone: tell the source side at once (no "active" will come).
                with contextlib.suppress(OSError):
                    self.peer.shutdown(socket.SHUT_RDWR)
                raise
            except (CommitError, FrameError) as exc:
                self.rejected.append(exc)  # not from the source: nothing changed
                with contextlib.suppress(MigSGXError, OSError):
                    _send(self.peer, {"t": "rejected"})  # a hint: deliver it again
                continue
            except ReplayError:
                self.decided = True
                self._abort_quietly("this migration id was committed before")
                raise
            except MigrationError as exc:
                if type(exc) is not MigrationError:
                    raise
                # The enclave found an authentic ABORT (and discarded itself): the source runs on.
                self.decided = True
                self._abort_quietly("the source aborted")
                raise MigrationError("the source aborted") from exc
            self.decided = True
            if after_claim is not None:
                after_claim()  # (fault injection: window W3)
            with contextlib.suppress(MigSGXError, OSError):
                _send(self.peer, {"t": "active"})
            return self.link.sock

    def lives(self) -> bool:
        """Whether this copy's enclave process still runs: asked of the process itself.

        Its pidfd (opened once it loaded) has not reported its exit, and its
        end of the connection is open (an enclave closes it only as its
        process ends).  Never a runtime call, and never a timeout: a call
        waits behind one in flight (a claim that waits for a restarted
        platform service, ``REATTACH_WAIT``), and a failed one says nothing of
        the process.  A live copy is never replaced (``docs/spec/commit.md``,
        section 5, W2 (c)).
        """

        link = self.link
        if self._ended or link is None or link.sock.fileno() < 0 or _hung_up(link.sock):
            return False
        pidfd = self._pidfd
        if pidfd is None:
            return True  # (not pinned: the connection alone tells)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return not poller.poll(0)

    def _pin_process(self) -> None:
        """A pidfd of the loaded enclave's process (the agent and its platform service
        share a pid namespace): from now on a reused pid cannot pass for it."""

        pid = self.info.pid if self.info is not None else 0
        if self._pidfd is not None or pid <= 0:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._ended = True
            return
        except OSError:
            return  # (the connection alone tells)
        self._pidfd = pidfd
        weakref.finalize(self, os.close, pidfd)

    def source_gone(self) -> None:
        """The source host says the source enclave died before it was asked to decide.

        Only the session's own tool says so (on its mutual-TLS control connection):
        that enclave can never make a COMMIT token, so this copy can never run,
        and keeping it held only leaves a stopped tree and an enclave for good.
        A host that lied would only give up a copy whose token it alone could
        deliver (``docs/spec/commit.md``, section 5, W1).
        """

        self._inbox.put(_SOURCE_GONE)

    def deliver(self, frame: bytes) -> None:
        """A decision frame from elsewhere (re-delivered): judged like one from the peer."""

        self.platform_blocked = False  # until this one, too, could not be judged
        self._inbox.put(bytes(frame))

    def _read_peer(self, peer: socket.socket) -> None:
        with contextlib.suppress(OSError):
            peer.settimeout(None)
        while True:
            try:
                msg = recv_frame(peer, PEER, max_size=PEER_FRAME_MAX)
            except (MigSGXError, OSError):
                self._inbox.put(None)
                return
            try:
                if msg["t"] not in ("commit", "abort"):
                    raise ProtocolError(f"expected commit or abort, got {msg['t']!r}")
                _check_received(peer, msg)
            except MigSGXError:
                self._inbox.put(None)  # a protocol violation: stop reading this peer
                return
            self._inbox.put(msg["token"] if msg["t"] == "commit" else msg["frame"])

    def abort(self) -> None:
        self._abort_quietly("aborted by the destination")


def _hung_up(sock: socket.socket) -> bool:
    """Whether the far end of ``sock`` closed: polled, never read."""

    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))
