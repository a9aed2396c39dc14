"""Named fault points, for tests of the failure paths with real processes.

``MIGSGX_FAULT=POINT:ACTION[,POINT:ACTION...]`` in the environment of an agent
or a migration tool makes it fail at ``POINT``: ``exit`` ends the process at
once (as a crash would), ``kill`` sends it SIGKILL, ``kill-after=SECONDS``
sends it SIGKILL that much later while the work goes on, ``fail`` raises
:class:`InjectedFault`, ``wait-file=PATH`` holds the process there until PATH
exists (a test looks at it in that state, then lets it go),
``wait-file-then-fail=PATH`` holds it there, then fails as ``fail``; any other action
is returned to the caller, which knows what it means there (``corrupt``
before a restore, ``corrupt``/``drop``/``reorder``/``truncate``/``replay`` of the
page stream (:func:`~.fault_relays.tampering_relay`), ``kill-after-bytes=N`` while an
enclave stream comes in, ``kill-source`` at a point of the tool: SIGKILL to
the source application, for example; ``kill-platform-and-enclave`` at
``agent.before-claim``: SIGKILL to this host's platform service, then to the
loaded enclaves, each dead before the step goes on; ``hold-to-restored=N`` and
``flip-byte-in-restore=N`` at ``tool.enclave-stream``: the enclave stream from
byte N on is held until the destination answered ``restored`` (resp. held,
byte N flipped, until the tool asked for the restore), so that the restore
overlaps a load that cannot have ended; ``kill-criu`` after the commit point of
a post-copy migration: SIGKILL to the source's CRIU, the only server of the
pages still missing; ``kill-guardian-and-tool`` at a point of the tool: SIGKILL to
its guardian, then to the tool itself; ``kill-source-platform-and-tool``: SIGKILL
to this host's platform service, then to the tool; ``kill-first-source-enclave-and-tool``:
SIGKILL to the first source enclave, then to the tool (``...-guardian-and-tool``: to
its guardian first; ``stop-first-source-enclave-and-tool``: SIGSTOP to it instead, a
hung enclave); ``kill-first-source-enclave``: SIGKILL to it alone, the tool lives on;
``kill-enclave-and-exit`` at a point of the checkpoint tool: SIGKILL to its first
enclave, then the tool ends (``kill-enclave-guardian-and-exit``: to its guardian
first); ``abort-rest`` at ``ckpt.between-commits``: the checkpoint tool aborts the
enclaves not yet committed, as a racing guardian would, and dies; ``drop`` and
``drop-and-stop`` at ``tool.abort-enclave``: the roll-back's ``__mig_abort`` is lost
on the enclave's connection, and the enclave is stopped too (:mod:`.abort_confirm`)).
Unset, every point is a no-op.
A fault's mark is on stderr (``migsgx fault: POINT:ACTION at T``); with
``MIGSGX_TRACE`` set the steps around it are too (:mod:`migsgx._trace`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Final

from .. import _proc
from ..errors import MigrationError, register_error

ENV: Final = "MIGSGX_FAULT"

#: Every point the code defines, so that a typo in a test is caught.
POINTS: Final = frozenset(
    {
        "agent.enclave-receive",  # while the incoming enclaves receive
        "agent.page-stream",  # corrupt|drop|reorder|truncate|replay: the page stream in flight
        "agent.before-restore",
        # The engine made the container, its restore has not returned; a process tree:
        # CRIU restored it, in its pre-resume notification (it has not detached).
        "agent.in-restore",
        # The tree restored and held (overlapped: the enclaves may still load), the
        # record not answered, ``restored`` not yet sent.
        "agent.after-restore",
        # Overlapped: held-loading, every enclave LOADED, not yet checked alive nor answered.
        "agent.enclaves-loaded",
        "agent.before-resume",  # the tool's resume arrived (the tokens went before it)
        "agent.resume-marked",  # no enclaves: the resume is recorded, the tree not yet continued
        "agent.after-resume",  # the tree runs (and its enclaves are attached), no answer yet
        "agent.before-claim",  # the first decision frame reached an enclave (window W2)
        "agent.after-claim",  # an enclave claimed the id and runs, the tree not resumed (W3)
        # early handshake done (``--live``: every enclave's pre-copy handshake, no round
        # yet), the application not yet frozen
        "tool.after-handshake",
        # ``--live``: one enclave's pre-copy round ended (its figures reported), the next
        # not begun; the enclave runs and serves ECALLs, nothing is quiesced.  Each round.
        "tool.precopy-round",
        # In the application (``resume``): its connections taken back, no ``__mig_unhold``
        # sent yet; ``no-unhold``: answer without it, as a runtime older than that call.
        "app.resume-taken",
        # In an enclave's runtime (its platform service's environment): ``__mig_hold``
        # answered as by a runtime older than that call; ``unknown-call`` only (read by
        # :mod:`migsgx.enclave.app_channel` itself).
        "enclave.hold",
        "tool.after-prepare",
        "guardian.retry",  # ``give-up``: the guardian in doubt stops as if its 10 minutes ran out
        # the tool died; the source enclaves answered the guardian's abort, frames not journaled
        "guardian.abort-answered",
        # the tool died; the guardian handed the aborted enclaves back, its journal not done
        "guardian.handed-back",
        # the tool died; every live source enclave aborted and the journal says ``aborted``,
        # the source not given back yet (a ``recover`` run now must not give it back too)
        "guardian.aborted",
        # recover took the connections back; the enclaves answered its abort, frames not journaled
        "recover.abort-answered",
        "recover.redeliver",  # a re-delivery without the tool: fresh copy's data connection open
        # A platform store's first user found none and writes it now (``wait-file`` only;
        # read by :mod:`migsgx.sgx.store_file` itself, below this module).
        "counters.before-create",
        # The platform service received an enclave's COMMIT (a decision, or a lone
        # checkpoint gate's commit) and has not written it; ``after``: written, not yet
        # answered.  ``kill-enclave`` only: it SIGKILLs that enclave and goes on once its
        # channel hung up (read by :mod:`migsgx.sgx.service_requests` itself).
        "platform.before-commit",
        "platform.after-commit",
        # (also ``exit`` at either: the service itself ends there, the enclave lives on,
        # its COMMIT sent and the answer lost: it may or may not be recorded)
        "ckpt.before-dump",  # checkpoint: enclave files written, CRIU not started
        "ckpt.before-commit",  # checkpoint: in post-dump, metadata written, tree fenced
        "ckpt.between-commits",  # checkpoint: one enclave's gate committed, the next not yet
        "ckpt.after-commit",  # checkpoint: every enclave gave its state up
        "ckpt.rolled-back",  # checkpoint: the enclaves aborted, not yet handed back
        "restore.before-criu",  # restore: enclaves loaded (not running), CRIU not started
        "restore.held",  # restore: enclaves loaded (not running), CRIU restored the tree held
        "restore.loaded",  # restore: the same step, right before the activation
        "restore.activated",  # restore: the enclaves activated, the tree not running, not attached
        # restore: the tree continued, the enclaves not attached yet (the tool's, its
        # guardian's or recover's attach); ``fail``: an application that does not take them
        "restore.attach",
        "tool.before-dump",  # the enclaves stream, CRIU has not started
        # CRIU froze the tree, nothing of it dumped (the pid driver's ``query-ext-files``);
        # a connection fault (``stall-control``) there holds the dump until the tool gives
        # it up (at most 20 s): a stall that begins inside the engine's long step.
        "tool.in-dump",
        "tool.ring-handover",  # an enclave's __mig_ring frame went, its descriptors not yet
        "tool.before-images",  # every enclave LOADED, CRIU dumped, the images not yet sent
        "tool.before-restore",  # post-copy: the lazy dump serves, no restore asked yet
        "tool.before-commit",
        # Overlapped: the destination answered ``restored``, the enclave streams not joined.
        "tool.restored-loading",
        "tool.after-group",  # every source enclave joined the migration group, none decided
        "tool.between-commits",  # one source enclave committed, the next not yet
        "tool.after-commit",
        "tool.before-release",  # journal ``done``, the committed source enclaves not released
        "tool.after-resumed",  # no enclaves: the destination answered resumed, journal not done
        "tool.after-abort",  # roll-back: the source enclaves decided ABORT, nothing undone yet
        # roll-back: the destination answered it keeps nothing, the source not resumed yet
        "tool.rolled-back",
        # roll-back: an enclave answered its ABORT, the frame not yet on its data connection
        "tool.abort-answered",
        # roll-back: each source enclave's __mig_abort, before it goes on its connection;
        # ``drop``: the request is lost there (the enclave is not told), ``drop-and-stop``:
        # lost, and the enclave stopped (SIGSTOP: alive, its connection open, silent)
        "tool.abort-enclave",
        "tool.before-token",  # each COMMIT token, before it goes on the data connection
        "tool.enclave-stream",  # each enclave's data connection, once it is open
    }
)


@register_error
class InjectedFault(MigrationError):
    """A fault injected through $MIGSGX_FAULT."""

    code = "injected-fault"


WAIT_LIMIT: Final = 120.0


def _wait_for(path: Path, point: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not path.exists():
        if time.monotonic() > deadline:
            raise InjectedFault(f"{point}: {path} did not appear within {WAIT_LIMIT} s")
        time.sleep(0.02)


def armed(point: str) -> bool:
    """Whether the fault spec names ``point`` (without firing it): a step that costs
    time only to reach the point (a CRIU notification) is taken only then."""

    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}")
    names = {item.strip().partition(":")[0] for item in os.environ.get(ENV, "").split(",")}
    return point in names


def fault(point: str) -> str | None:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}")
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    for item in spec.split(","):
        name, _, action = item.strip().partition(":")
        if name != point:
            continue
        # When, on the system-wide monotonic clock: tests measure from here.
        sys.stderr.write(f"migsgx fault: {point}:{action} at {time.monotonic():.6f}\n")
        sys.stderr.flush()
        if action == "exit":
            os._exit(70)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action.startswith("kill-after="):
            delay = float(action.partition("=")[2])
            timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()
            return None
        if action == "fail":
            raise InjectedFault(f"fault injected at {point}")
        if action.startswith("wait-file="):
            _wait_for(Path(action.partition("=")[2]), point)
            return None
        if action.startswith("wait-file-then-fail="):
            # Held there until PATH exists, then as ``fail``: a roll-back from a
            # moment the test chose (what the application did meanwhile).
            _wait_for(Path(action.partition("=")[2]), point)
            raise InjectedFault(f"fault injected at {point}")
        return action
    return None


def socket_owner(path: Path) -> int:
    """The pid that listens on the Unix socket ``path`` (``SO_PEERCRED``)."""

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    finally:
        sock.close()
    return int.from_bytes(creds[:4], "little")


def kill_dead(pids: list[int]) -> None:
    """SIGKILL ``pids`` and return once each has ended, every thread of it: a zombie
    whose other threads still exit holds its sockets (a platform service's channels:
    a request sent then is taken for received, its answer lost)."""

    from .enclave_loss import ended  # (lazy: only a fault that kills needs it)

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while not all(ended(p) for p in pids):
        if time.monotonic() > deadline:
            raise InjectedFault("fault injection: a victim did not die")
        time.sleep(0.01)


#: ``PF_EXITING`` in the flags of ``/proc/PID/stat``: the task is in ``do_exit``.
_PF_EXITING: Final = 0x4
#: SIGKILL in the pending-signal masks of ``/proc/PID/status`` (bit ``signal - 1``).
_SIGKILL_BIT: Final = 1 << (signal.SIGKILL - 1)


def dying(pid: int) -> bool:
    """Whether ``pid`` is gone, a zombie, past the point of no return (exiting), or
    holds a SIGKILL it has yet to take.

    A killed pid-namespace init whose children CRIU still traces stays in its
    exit until CRIU lets them go; waiting for it to be a zombie there would wait
    on CRIU, which waits on the tool.  A task frozen in its cgroup (a committed
    container's, cgroup v1's freezer) takes its SIGKILL only once thawed: waiting
    for it to exit would wait for good (the tool hung at ``kill-source`` after the
    commit, found by a podman storm).
    """

    fields = _proc.stat(pid)
    if fields is None:
        return True
    if fields[_proc.STATE] in ("Z", "X") or bool(int(fields[_proc.FLAGS]) & _PF_EXITING):
        return True
    return any(
        int(_proc.status_field(pid, name) or "0", 16) & _SIGKILL_BIT
        for name in ("ShdPnd", "SigPnd")
    )


def kill_until_dying(pid: int, within: float = 10.0) -> None:
    """SIGKILL ``pid`` (``kill-source``'s application) and return once it is :func:`dying`.

    Not once it is a zombie: a pid-namespace init ends only after every task of
    its namespace was reaped, and CRIU, which traces them, lets them go only when
    this process goes on (the checkpoint hung at ``ckpt.after-commit:kill-source``,
    found by a storm).  Bounded: an :class:`InjectedFault` after ``within`` seconds.
    """

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + within
    while not dying(pid):  # (SIGKILL's delivery is asynchronous; it cannot be ignored)
        if time.monotonic() > deadline:
            raise InjectedFault(f"fault injection: pid {pid} did not take its SIGKILL")
        time.sleep(0.01)
