"""The duplicate of its own connection a source enclave keeps (``__mig_hold``).

A migration or checkpoint driver gives the enclave a duplicate of the driver's
end of the enclave's connection, so that the driver's death (and its
guardian's) is no end of file: the enclave keeps the only copy of its state
for ``migsgx recover`` to take back (``docs/spec/commit.md`` section 4).  An
aborted source keeps it until the application has its connection back and
says so (``__mig_unhold``).  Two ways that word never comes are closed here:

* **The application dies** after ``resume`` took its connections back and before
  its ``__mig_unhold`` arrived (or it runs a runtime older than that call).  The
  driver names the application with the hold: pidfds of its processes, opened
  by the driver (root, in the host's pid namespace, so a container's
  application is named too) and passed with the duplicate: the process that
  answers the driver, and every process of its tree that holds this very
  connection (a child it forked, which may go on using the enclave after the
  parent exited).  Once this enclave answered an abort and still holds the
  duplicate, a thread watches those pidfds, and when the last of them has
  exited, lets the duplicate go: the end of file then ends the enclave as a
  crash of the application would.  Never while a migration is under way (the
  application is frozen or being dumped, not exited; the watch starts only
  with the abort), never after a commit (no abort keeps a hold then), never
  while one process of the application named lives.  A pidfd names one process
  for good (no pid reuse), and the driver is untrusted either way: a wrong one
  only makes the enclave let go of a duplicate the driver could as well close
  itself, and while any process holds its end nothing ends.  A process forked
  after the hold (the application, given its connection back, forked before
  its ``__mig_unhold``) is not named: its end keeps the enclave alive as any
  holder's does, only the duplicate goes with the last process named.
* **A stale holder** (a journal whose guardian died right after its hand-back)
  must not take a later migration's duplicate: each hold carries the driver's
  nonce, which its journal records; ``__mig_held`` answers whether the
  duplicate this enclave holds now is that one.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import select
import socket
import threading
from collections.abc import Callable

from ..channel import HOLD_WATCHED
from ..errors import MigSGXError, ProtocolError, register_error

__all__ = ["HOLD_WAIT", "Hold", "NotThisHoldError"]

#: How long the descriptors may take to follow a ``__mig_hold`` frame.
HOLD_WAIT = 10.0
#: How often the watch looks whether its hold is still the one it watches.
WATCH_PERIOD = 1.0


@register_error
class NotThisHoldError(MigSGXError):
    """The duplicate this enclave holds is not the one the caller's journal names."""

    code = "not-this-hold"


class Hold:
    """The duplicate an enclave holds, whom it is for, and the watch on its application."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._held: socket.socket | None = None
        #: Pidfds of the application's processes the driver named with the hold.
        self._apps: list[int] = []
        self._nonce = b""
        #: Set by an abort that kept the duplicate: from then on the application's
        #: exit lets it go.  Cleared by every new hold.
        self._after_abort = False

    @property
    def held(self) -> bool:
        return self._held is not None

    def take(self, sock: socket.socket, args: list[object]) -> int:
        """Receive the descriptors that follow ``__mig_hold`` on ``sock``; their number here.

        ``args``: none, or the driver's nonce (bytes, up to 64).  The descriptors:
        the driver's end of this connection, then optionally pidfds of the
        application's processes, up to :data:`~migsgx.channel.HOLD_WATCHED` (none: no watch).
        """

        nonce = args[0] if args else b""
        if not isinstance(nonce, bytes) or len(nonce) > 64:
            raise ProtocolError("__mig_hold takes a nonce of at most 64 bytes")
        ready, _, _ = select.select([sock], [], [], HOLD_WAIT)
        if not ready:
            raise ProtocolError("no descriptor followed __mig_hold")
        _, fds, _, _ = socket.recv_fds(sock, 1, 1 + HOLD_WATCHED)
        if not fds:
            raise ProtocolError("__mig_hold carries one descriptor")
        try:
            held = socket.socket(fileno=fds[0])
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        self.drop()
        with self._lock:
            self._held, self._apps, self._nonce = held, list(fds[1:]), nonce
            self._after_abort = False
        return held.fileno()

    def check(self, args: list[object]) -> None:
        """``__mig_held``: refuse unless the duplicate held now came with this nonce."""

        nonce = args[0] if args else None
        if not isinstance(nonce, bytes) or not nonce:
            raise ProtocolError("__mig_held takes the hold's nonce")
        with self._lock:
            if self._held is None:
                raise NotThisHoldError("this enclave holds no duplicate of its connection")
            if not hmac.compare_digest(self._nonce, nonce):
                raise NotThisHoldError(
                    "the duplicate this enclave holds belongs to another migration"
                )

    def kept_after_abort(self) -> None:
        """An abort answered and the duplicate stays: watch the application from now on."""

        with self._lock:
            if self._held is None or self._after_abort:
                return  # (one watch per hold: an abort asked again arms nothing more)
            self._after_abort = True
            apps = [os.dup(app) for app in self._apps]
            held = self._held
        if not apps:
            return
        watch = threading.Thread(
            target=self._watch, args=(held, apps), name="hold-watch", daemon=True
        )
        watch.start()

    def _watch(self, held: socket.socket, apps: list[int]) -> None:
        """Until ``held`` is let go: once every process named exited, let it go."""

        try:
            while True:
                exited: list[int] = []
                with contextlib.suppress(InterruptedError):
                    exited, _, _ = select.select(apps, [], [], WATCH_PERIOD)
                for app in exited:
                    apps.remove(app)
                    os.close(app)
                with self._lock:
                    if self._held is not held or not self._after_abort:
                        return  # handed back (__mig_unhold), or a new hold
                    if exited and apps:
                        self._log(f"a process of the application ended after the abort; "
                                  f"{len(apps)} named still live: the duplicate stays")  # fmt: skip
                    if apps:
                        continue
                    # Closed before it reads as let go: whoever sees ``held`` false
                    # finds the descriptor closed too.
                    with contextlib.suppress(OSError):
                        held.close()
                    self._held = None
                    self._close_apps()
                self._log("the application ended after the abort: its duplicate is let go")
                return
        finally:
            for app in apps:
                os.close(app)

    def _close_apps(self) -> None:
        apps, self._apps = self._apps, []
        for app in apps:
            with contextlib.suppress(OSError):
                os.close(app)

    def drop(self) -> None:
        with self._lock:
            if self._held is not None:
                with contextlib.suppress(OSError):
                    self._held.close()
            self._held = None
            self._close_apps()
            self._nonce = b""
            self._after_abort = False
