"""The duplicate of its own connection a source enclave keeps (``__mig_hold``).

A migration or checkpoint driver gives the enclave a duplicate of the driver's
end of the enclave's connection, so that the driver's death (and its
guardian's) is no end of file: the enclave keeps the only copy of its state
for ``migsgx recover`` to take back (``docs/spec/commit.md`` section 4).  An
aborted source keeps it until the application has its connection back and
says so (``__mig_unhold``).  Two ways that word never comes, and a set of
holders that aged, are closed here:

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
  itself, and while any process holds its end nothing ends.
* **Who holds the connection changes after the hold**: the tree may fork and
  close descriptors until it is frozen, and a process named then may live on
  without the connection (the duplicate, and the enclave, would outlive every
  real holder).  So the driver names them again right before it continues the
  given-back tree (``__mig_watch``): it re-reads who holds the connection
  then (root, from ``/proc`` and ``sock_diag``: the sandboxed enclave cannot,
  its own uid under ``hidepid``), and the set it sends replaces the one named
  with the hold.  A
  child forked after the hold that keeps the connection is watched from then
  on, and a process named before that has closed the connection since no
  longer keeps the duplicate (the enclave would outlive every real holder).
  Only the hold's driver sends it: it carries the hold's nonce, which only the
  driver and its journal know.  A set that lies can only make the enclave keep
  its duplicate longer, or let it go after an abort, where the state is the
  source's to run on and each real holder's own end still keeps it; the watch
  never lets go of a committed enclave's duplicate.  A process forked after
  that re-read (the application, given its connection back, forks before its
  ``__mig_unhold``) is not named: its end keeps the enclave alive as any
  holder's does, only the duplicate goes with the last process named.
* **A stale holder** (a journal whose guardian died right after its hand-back)
  must not take a later migration's duplicate: each hold carries the driver's
  nonce, which its journal records; ``__mig_held`` answers whether the
  duplicate this enclave holds now is that one.

Whoever holds the connection may send these calls, the application and any
child of it included: none of them lets go of, or replaces, a duplicate while
the state may be the only copy (:meth:`Hold.why_kept`).  ``__mig_unhold`` and
a new ``__mig_hold`` are refused (``hold-kept``) unless the enclave answered an
abort itself since the hold (or a REFUSED that revoked its commit) and runs on
its own state again (or holds nothing worth keeping: discarded, wiped); the
watch follows the same rule.

The drivers send the descriptors of a ``__mig_hold`` and of a ``__mig_watch`` in
a message of the one byte ``H`` or ``W`` right after the frame
(``EnclaveLink.hold``, ``agent/watch_ask.py``): every enclave runtime reads that
form, one launched before an upgrade too.  This reader also takes them on the
frame's own message (one ``sendmsg``).  The one-byte message is taken only if it
is already there or comes within a bound (:data:`HOLD_WAIT`,
:data:`FOLLOW_WAIT`), and is peeked at first: whatever else follows (the
driver's next frame) is left unread, so a frame sent without its descriptors can
neither stall the reader for long nor put the stream out of step.  One that
comes after its bound (a preempted driver on a loaded host) finds its call
refused already; the reader passes it over at the next frame boundary and closes
its descriptors (``AppChannel._read``): no frame header begins with ``H`` or
``W``.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import os
import select
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Literal

from ..channel import HOLD_BYTE, HOLD_WATCHED, WATCH_BYTE
from ..errors import MigSGXError, ProtocolError, register_error

__all__ = ["FOLLOW_WAIT", "HOLD_WAIT", "Hold", "HoldKeptError", "NotThisHoldError", "State"]

#: How long the driver's descriptor message may take to follow a ``__mig_hold``
#: frame (the wait ends at the first byte that comes: one that is not that message is
#: left unread and the hold refused).
HOLD_WAIT = 10.0
#: The same for a ``__mig_watch`` frame that came without its pidfds.
FOLLOW_WAIT = 0.25
#: How often the watch looks whether its hold is still the one it watches.
WATCH_PERIOD = 1.0


@register_error
class NotThisHoldError(MigSGXError):
    """The duplicate this enclave holds is not the one the caller's journal names."""

    code = "not-this-hold"


@register_error
class HoldKeptError(MigSGXError):
    """The duplicate held may be what keeps the only copy of the state: not let go."""

    code = "hold-kept"


#: What the enclave's state is to its duplicate: ``idle``, the source runs on its own
#: state, nothing under way; ``busy``, a migration or checkpoint holds it (frozen,
#: dumped, decided or undecided: it may be the only copy); ``ended``, nothing left to
#: keep (a discarded destination, a wiped state).
State = Literal["idle", "busy", "ended"]


class Hold:
    """The duplicate an enclave holds, whom it is for, and the watch on its application."""

    def __init__(
        self,
        log: Callable[[str], None],
        may_let_go: Callable[[], bool] = lambda: True,
        state: Callable[[], State] = lambda: "ended",
    ) -> None:
        self._log = log
        #: Whether the enclave still runs on its own state (never after a commit): the
        #: watch lets the duplicate go only then.
        self._may_let_go = may_let_go
        #: The enclave's state now (:data:`State`): what may let the duplicate go.
        self._state = state
        self._lock = threading.Lock()
        self._held: socket.socket | None = None
        #: Pidfds of the application's processes the driver named with the hold.
        self._apps: list[int] = []
        self._nonce = b""
        #: Set by an abort that kept the duplicate: from then on the application's
        #: exit lets it go.  Cleared by every new hold.
        self._after_abort = False
        #: A destination's watch: its tree gone, undecided or not (:meth:`kept_after_abort`).
        self._destination = False
        #: Bumped by every new hold, every new set (``__mig_watch``) and every drop: a
        #: watch of an older one ends at its next look.
        self._generation = 0

    @property
    def held(self) -> bool:
        return self._held is not None

    def why_kept(self) -> str:
        """Why the duplicate held now may be neither let go nor replaced ("": it may).

        It may once the enclave answered an abort itself since the hold and its
        state is the source's own to run on again (nothing under way since), or
        when nothing is left to keep.  Never while a migration or checkpoint holds
        the state (frozen, dumped, decided, undecided, a checkpoint not committed):
        then it may be the only copy, and only this duplicate keeps it when every
        driver is gone.  Nor between the hold and the abort: its driver is about to
        freeze the state.  Whoever asks is untrusted (the application, a child of
        it): a nonce proves nothing here, the hold's own driver asks no differently.
        """

        with self._lock:
            held, after_abort = self._held is not None, self._after_abort
        if not held:
            return ""
        state = self._state()
        if state == "ended" or (state == "idle" and after_abort):
            return ""
        if state == "idle":
            return ("no abort was answered since the hold: its driver may still "
                    "freeze the state")  # fmt: skip
        return ("a migration or checkpoint holds this enclave's state (frozen, dumped, "
                "decided or undecided): it may be the only copy")  # fmt: skip

    def take(self, sock: socket.socket, args: list[object], came: Sequence[int] = ()) -> int:
        """``__mig_hold``: keep the descriptors that came with it; their number here.

        ``args``: none, or the driver's nonce (bytes, up to 64).  The descriptors
        (``came``: on the frame's own message; none there: the driver's message
        of the one byte ``H`` right after it, within :data:`HOLD_WAIT`):
        the driver's end of this connection, then optionally pidfds of the
        application's processes, up to :data:`~migsgx.channel.HOLD_WATCHED` (none: no watch).
        Read before anything is checked (a refused call leaves the connection in
        step) and closed on any refusal: ``hold-kept`` while the duplicate held
        may not be let go (:meth:`why_kept`).
        """

        fds = list(came)
        if not fds:
            followed = _following(sock, HOLD_BYTE, 1 + HOLD_WATCHED, HOLD_WAIT)
            if followed is None:
                raise ProtocolError("__mig_hold comes with its descriptors")
            fds = followed[0]
        try:
            nonce = args[0] if args else b""
            if not isinstance(nonce, bytes) or len(nonce) > 64:
                raise ProtocolError("__mig_hold takes a nonce of at most 64 bytes")
            if not fds:
                raise ProtocolError("__mig_hold carries one descriptor")
            why = self.why_kept()
            if why:
                raise HoldKeptError(f"__mig_hold refused: this enclave keeps the duplicate "
                                    f"it holds ({why})")  # fmt: skip
            held = socket.socket(fileno=fds[0])
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        self.drop()
        with self._lock:
            self._held, self._apps, self._nonce = held, list(fds[1:]), nonce
            self._after_abort = False
            self._generation += 1
        return held.fileno()

    def rewatch(
        self,
        sock: socket.socket,
        args: list[object],
        came: Sequence[int] = (),
        truncated: bool = False,
    ) -> int:
        """``__mig_watch``: the processes that hold the connection now replace those
        named with the hold; how many are watched.

        ``args``: the hold's nonce (bytes, 1 to 64).  The 1 to
        :data:`~migsgx.channel.HOLD_WATCHED` pidfds come on the frame's own
        message (``came``; ``truncated``: more were cut off); none there, the
        driver's message of the one byte ``W`` right after the frame (the form
        every runtime reads, which the driver sends) is taken if it comes within
        :data:`FOLLOW_WAIT` (peeked first: anything else is left unread).  They
        are read before anything is checked, so that a refused call leaves the
        connection in step, and closed on any refusal.  After an abort that kept
        the duplicate, the watch follows the new set at once.
        """

        fds = _checked_pidfds(list(came), truncated) if came or truncated else _receive_pidfds(sock)
        try:
            nonce = args[0] if len(args) == 1 else None
            if not isinstance(nonce, bytes) or not 1 <= len(nonce) <= 64:
                raise ProtocolError("__mig_watch takes the hold's nonce (bytes, 1 to 64)")
            with self._lock:
                if self._held is None:
                    raise NotThisHoldError("this enclave holds no duplicate of its connection")
                if not self._nonce or not hmac.compare_digest(self._nonce, nonce):
                    raise NotThisHoldError("__mig_watch names another hold than the one held")
                armed = self._after_abort
                apps: list[int] = []
                try:  # (duplicated before anything changes: a failed dup changes nothing)
                    apps.extend(os.dup(app) for app in (fds if armed else ()))
                except OSError:
                    for app in apps:
                        os.close(app)
                    raise
                old, self._apps = self._apps, fds
                self._generation += 1
                held, generation = self._held, self._generation
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for app in old:
            with contextlib.suppress(OSError):
                os.close(app)
        if armed:
            self._start_watch(held, apps, generation)
        return len(fds)

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

    def kept_since_abort(self) -> bool:
        """Whether an abort answered since the hold kept the duplicate (and watches)."""

        with self._lock:
            return self._held is not None and self._after_abort

    def kept_after_abort(self, *, destination: bool = False) -> None:
        """An abort answered and the duplicate stays: watch the application from now on.

        ``destination``: a destination's hold, armed from the hold on (its held
        tree is named, no abort comes): once the tree is gone the duplicate goes,
        the state undecided (``busy``) or not.  A destination's copy is worth
        nothing without its tree (before its claim the committed source still
        holds the state, and a restore's checkpoint does; after it, only that tree
        could run it), and kept for good it would outlive everything."""

        with self._lock:
            if self._held is None or self._after_abort:
                return  # (one watch per hold: an abort asked again arms nothing more)
            self._after_abort = True
            self._destination = destination
            apps = [os.dup(app) for app in self._apps]
            held, generation = self._held, self._generation
        self._start_watch(held, apps, generation)

    def _start_watch(self, held: socket.socket, apps: list[int], generation: int) -> None:
        if not apps:
            return
        watch = threading.Thread(
            target=self._watch, args=(held, apps, generation), name="hold-watch", daemon=True
        )
        watch.start()

    def _watch(self, held: socket.socket, apps: list[int], generation: int) -> None:
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
                    if (self._held is not held or not self._after_abort
                            or self._generation != generation):  # fmt: skip
                        return  # handed back (__mig_unhold), a new hold, or a new set
                    if exited and apps:
                        self._log(f"a process of the application ended after the abort; "
                                  f"{len(apps)} named still live: the duplicate stays")  # fmt: skip
                    if apps:
                        continue
                    if not self._may_let_go():
                        self._log("the application ended, but this enclave committed: "
                                  "its duplicate stays")  # fmt: skip
                        return
                    if self._state() == "busy" and not self._destination:
                        self._log("the application ended, but a migration or checkpoint "
                                  "holds this enclave's state: its duplicate stays")  # fmt: skip
                        return
                    # Said first: once the duplicate is closed the enclave may read end
                    # of file and exit before this thread writes another line.
                    self._log("the application ended after the abort: its duplicate is let go")
                    # Closed before it reads as let go: whoever sees ``held`` false
                    # finds the descriptor closed too.
                    with contextlib.suppress(OSError):
                        held.close()
                    self._held = None
                    self._close_apps()
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
            self._destination = False
            self._generation += 1


def _following(
    sock: socket.socket, byte: bytes, most: int, wait: float
) -> tuple[list[int], bool] | None:
    """A sender's message of the one byte ``byte`` right after its frame: the
    descriptors that came with it and whether more were cut off; None, with nothing
    read, if nothing comes within ``wait`` seconds or what comes is anything else.

    Its first byte is peeked at first (without its descriptors: a peek that takes
    them leaves the message unreadable on this kernel), and a frame never starts
    with ``byte`` (its length is at most 2**24): the next frame of the driver, which a
    frame sent without its descriptors may be followed by, is never taken for them,
    and a wait ends at the first byte that comes.
    """

    ready, _, _ = select.select([sock], [], [], wait)
    if not ready or sock.recv(1, socket.MSG_PEEK) != byte:
        return None
    _, fds, flags, _ = socket.recv_fds(sock, 1, most)
    return list(fds), bool(flags & socket.MSG_CTRUNC)


def _receive_pidfds(sock: socket.socket) -> list[int]:
    """The 1 to :data:`~migsgx.channel.HOLD_WATCHED` descriptors that the driver
    sends after a ``__mig_watch`` frame, in a message of the one byte :data:`WATCH_BYTE`."""

    followed = _following(sock, WATCH_BYTE, HOLD_WATCHED, FOLLOW_WAIT)
    if followed is None:
        raise ProtocolError("__mig_watch comes with its pidfds (on its own frame)")
    return _checked_pidfds(*followed)


def _checked_pidfds(fds: list[int], truncated: bool) -> list[int]:
    """``fds`` if they are 1 to :data:`~migsgx.channel.HOLD_WATCHED` pidfds; else all
    closed and refused."""

    problem = (
        f"__mig_watch carries at most {HOLD_WATCHED} pidfds"
        if truncated or len(fds) > HOLD_WATCHED
        else "__mig_watch carries 1 or more pidfds" if not fds
        else ""
    )  # fmt: skip
    if not problem and not all(_is_pidfd(fd) for fd in fds):
        problem = "__mig_watch's descriptors must be pidfds"
    if problem:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(problem)
    return list(fds)


def _is_pidfd(fd: int) -> bool:
    """Whether ``fd`` refers to a process: signal 0 through it is refused with EBADF
    (or EINVAL) when it does not, and sent, or refused for another reason (its
    process gone, another user's), when it does."""

    try:
        signal.pidfd_send_signal(fd, 0)
    except OSError as exc:
        return exc.errno not in (errno.EBADF, errno.EINVAL)
    return True
