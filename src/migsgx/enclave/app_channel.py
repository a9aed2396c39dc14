"""The enclave's side of the application's connection: :class:`AppChannel`.

ECALLs arrive on it, each run on a thread of its own once the instance admits
it; OCALLs leave on it and their answers come back in between.  Runtime calls
(``__mig_*``, ``__ckpt_*``) go to the :class:`~.migrator.Migrator`; the few that
carry descriptors or change the connection itself (a side channel, a ring, the
held duplicate) are answered here.  A failure is answered with its code and
message, or with only its type where a message could carry state.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
from collections.abc import Sequence
from typing import Any

from ..channel import ECALL, ECALL_FRAME_MAX, HOLD_BYTE, HOLD_WATCHED, WATCH_BYTE
from ..core.handshake import Role
from ..errors import (
    CommittedError,
    ConnectionClosedError,
    EnclaveLostError,
    FrameError,
    MigSGXError,
    ProtocolError,
    error_from_wire,
)
from ..wire import HEADER, decode_body, recv_exactly, send_frame
from .eventlog import log
from .hold import Hold, HoldKeptError, State
from .instance import EnclaveInstance
from .migrator import RUNTIME_CALLS, Migrator
from .sidechannel import receive_side_channel

__all__ = ["ENDED", "AppChannel"]

#: Why :meth:`AppChannel.serve` stopped when nothing more can be read: the
#: connection closed (or shut down by a holder), or broken.
ENDED = ("application closed the connection", "application connection broke")
#: The calls whose descriptors may ride on their own frame (one ``sendmsg``).
_WITH_FDS = ("__mig_hold", "__mig_watch")


class AppChannel:
    """Serves ECALLs arriving on the application's connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._ocall_waiters: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._waiters_lock = threading.Lock()
        self._local = threading.local()
        self.instance: EnclaveInstance | None = None
        self.migrator: Migrator | None = None
        #: A duplicate of the driver's end of this connection (``__mig_hold``): while
        #: it is held, the driver's death is no end of file, so a source whose
        #: checkpoint tool and guardian both died keeps its state for recovery.  An
        #: abort keeps it until ``__mig_unhold`` (the application has it back) or
        #: the application's exit.  An abort that leaves the state frozen, committed
        #: or undecided keeps it too (:meth:`keeps_state`), with no watch.
        self.hold = Hold(log, self._uncommitted, self._hold_state)
        #: One abort's outcome for the duplicate at a time (:meth:`after_abort`).
        self._abort_rule = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        with self._send_lock:
            send_frame(self.sock, msg, max_size=ECALL_FRAME_MAX)

    def ocall(self, name: str, args: tuple[Any, ...]) -> Any:
        call_id = getattr(self._local, "call_id", None)
        if call_id is None:
            raise ProtocolError("OCALL outside an ECALL")
        waiter: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
        with self._waiters_lock:
            self._ocall_waiters[call_id] = waiter
        try:
            self.send({"t": "ocall", "id": call_id, "fn": name, "args": list(args)})
            reply = waiter.get()
        finally:
            with self._waiters_lock:
                self._ocall_waiters.pop(call_id, None)
        if reply.get("lost"):
            raise EnclaveLostError("the application went away during an OCALL")
        if not reply["ok"]:
            raise error_from_wire(reply.get("code") or "error", reply.get("message") or "")
        return reply.get("value")

    def _run(self, call_id: int, name: str, args: list[Any]) -> None:
        assert self.instance is not None
        self._local.call_id = call_id
        try:
            value = self.instance.run(name, args)
            reply: dict[str, Any] = {"t": "ret", "id": call_id, "value": value}
        except MigSGXError as exc:
            reply = {"t": "err", "id": call_id, "code": exc.code, "message": exc.message}
        finally:
            self._local.call_id = None
            self.instance.leave()
        self._reply(reply, name)

    def _reply(self, reply: dict[str, Any], name: str) -> None:
        """Send a result; one that cannot be encoded becomes an error for the caller."""

        try:
            self.send(reply)
        except FrameError:
            log(f"result of {name} cannot be sent (not plain data, or too large)")
            with contextlib.suppress(OSError, MigSGXError):
                self.send(
                    {
                        "t": "err",
                        "id": reply["id"],
                        "code": "enclave",
                        "message": f"the result of {name} is not plain data or too large",
                    }
                )
        except (OSError, MigSGXError):
            log("could not deliver a result: application gone")

    def _run_runtime_call(self, call_id: int, name: str, args: list[Any]) -> None:
        assert self.migrator is not None
        try:
            value = self.migrator.call(name, args)
            reply: dict[str, Any] = {"t": "ret", "id": call_id, "value": value}
        except MigSGXError as exc:
            reply = {"t": "err", "id": call_id, "code": exc.code, "message": exc.message}
        except Exception as exc:
            # Only the type: a message could carry state.
            log(f"runtime call {name} failed: {type(exc).__name__}")
            reply = {
                "t": "err",
                "id": call_id,
                "code": "migration",
                "message": f"{name} failed inside the enclave: {type(exc).__name__}",
            }
        if name in ("__mig_abort", "__mig_refused"):
            # Before the answer: whoever heard it may hand the connection back at
            # once, and the application's ``__mig_unhold`` must find the abort kept
            # (a revoked commit, ``__mig_refused``, runs on its state as an abort does).
            self.after_abort(answered=reply["t"] == "ret")
        self._reply(reply, name)
        if self.migrator.exit_after_reply:
            # The state has moved: hang up, the serve loop ends and the process exits.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _read(self) -> tuple[dict[str, Any], list[int], bool]:
        """One frame, the descriptors that came on its first bytes (a ``__mig_watch``
        or ``__mig_hold`` may send them on the frame's own message), and whether more
        were cut off.  Descriptors on any other frame are closed.

        A late follow-up at a frame boundary is passed over (:func:`_late_follow_up`):
        the one byte ``W`` or ``H`` of a driver's descriptor message that came after
        its call's wait ended (the call was refused then).  Taken for a header, it
        and three bytes of the next frame put the stream out of step for good."""

        header, fds, truncated = b"", [], False
        try:
            while len(header) < HEADER.size:
                data, got, flags, _ = socket.recv_fds(
                    self.sock, HEADER.size - len(header), 1 + HOLD_WATCHED
                )
                cut = bool(flags & socket.MSG_CTRUNC)
                if not header and _late_follow_up(data, got, cut):
                    _close(got)
                    log(f"a late {data[:1].decode()} message after its call was refused: "
                        f"its {len(got)} descriptors closed")  # fmt: skip
                    header = data[1:]
                    continue
                fds.extend(got)
                truncated = truncated or cut
                if not data:
                    if not header:
                        raise ConnectionClosedError("peer closed the connection")
                    raise FrameError("connection closed inside a frame header")
                header += data
            (length,) = HEADER.unpack(header)
            if length > ECALL_FRAME_MAX:
                raise FrameError(f"frame of {length} bytes exceeds the cap of {ECALL_FRAME_MAX}")
            msg = decode_body(recv_exactly(self.sock, length), ECALL)
        except BaseException:
            _close(fds)
            raise
        if fds and not (msg["t"] == "ecall" and msg["fn"] in _WITH_FDS):
            _close(fds)
            fds = []
        return msg, fds, truncated

    def serve(self) -> str:
        """Read frames until the application leaves; return why we stopped."""

        assert self.instance is not None
        while True:
            try:
                msg, fds, truncated = self._read()
            except ConnectionClosedError:
                return ENDED[0]
            except MigSGXError as exc:
                # A garbled frame cannot be resynchronised: report and hang up.
                log(f"bad frame from the application: {exc.code}")
                try:
                    self.send({"t": "err", "id": 0, "code": exc.code, "message": exc.message})
                except (OSError, MigSGXError):
                    pass
                return "protocol error"
            except OSError:
                return ENDED[1]
            kind = msg["t"]
            older = kind == "ecall" and _as_older_runtime(msg["fn"])
            if older:
                _close(fds)  # (such a runtime reads none: an ECALL of that name follows)
            if kind == "ecall" and msg["fn"] in RUNTIME_CALLS and not older:
                assert self.migrator is not None
                call_id, name = msg["id"], msg["fn"]
                if name == "__mig_side":
                    try:
                        receive_side_channel(self.sock, self.migrator, log,
                                             self.after_abort)  # fmt: skip
                        self.send({"t": "ret", "id": call_id, "value": None})
                    except MigSGXError as exc:
                        self.send(
                            {"t": "err", "id": call_id, "code": exc.code, "message": exc.message}
                        )
                    continue
                if name in ("__mig_hold", "__mig_held", "__mig_watch"):
                    self._hold(call_id, name, msg["args"], fds, truncated)
                    continue
                if name == "__mig_unhold":
                    self._unhold(call_id)
                    continue
                if name == "__mig_ring":
                    # The descriptors follow the frame on the socket: take them now.
                    try:
                        self.migrator.attach_ring(self.sock)
                        self.send({"t": "ret", "id": call_id, "value": None})
                    except MigSGXError as exc:
                        self.send(
                            {"t": "err", "id": call_id, "code": exc.code, "message": exc.message}
                        )
                    continue
                threading.Thread(
                    target=self._run_runtime_call, args=(call_id, name, msg["args"]), daemon=True
                ).start()
            elif kind == "ecall":
                call_id, name = msg["id"], msg["fn"]
                try:
                    self.instance.enter(name)
                except MigSGXError as exc:
                    self.send({"t": "err", "id": call_id, "code": exc.code, "message": exc.message})
                    continue
                threading.Thread(
                    target=self._run, args=(call_id, name, msg["args"]), daemon=True
                ).start()
            elif kind == "oret":
                with self._waiters_lock:
                    waiter = self._ocall_waiters.get(msg["id"])
                if waiter is not None:
                    waiter.put(msg)
            elif kind == "detach":
                self.send({"t": "detached"})
            elif kind == "destroy":
                return "destroyed by the application"
            else:
                log(f"unexpected frame {kind!r}")
                return "protocol error"

    def _unhold(self, call_id: int) -> None:
        """``__mig_unhold``: the application has its connection back (it asks), or
        nobody can take it any more (the party that holds it asks): the end of file
        ends this enclave again.  Any holder may ask, the application's child too:
        refused (``hold-kept``) while the state may be the only copy
        (:meth:`.hold.Hold.why_kept`)."""

        why = self.hold.why_kept()
        if why:
            log("__mig_unhold refused: the duplicate stays")
            err = HoldKeptError(f"__mig_unhold refused: {why}")
            self.send({"t": "err", "id": call_id, "code": err.code, "message": err.message})
            return
        self.hold.drop()
        self.send({"t": "ret", "id": call_id, "value": None})

    def _hold(
        self,
        call_id: int,
        name: str,
        args: list[Any],
        fds: Sequence[int] = (),
        truncated: bool = False,
    ) -> None:
        """``__mig_hold``: keep the descriptors that follow the frame (:mod:`.hold`);
        ``__mig_held``: whether the duplicate held now is the caller's;
        ``__mig_watch``: the processes that hold the connection now, from its driver.

        The answer to a hold is the duplicate's number in this process, which a
        recovering root process (``migsgx recover``) takes a duplicate of
        (``pidfd_getfd``) to abort and hand this enclave back to its application.
        The driver is untrusted either way: it could as well keep the connection
        open itself, and this process never reads the descriptor.
        """

        try:
            if name == "__mig_held":
                self.hold.check(args)
                value: int | None = None
            elif name == "__mig_watch":
                value = self._rewatch(args, fds, truncated)
            else:
                value = self.hold.take(self.sock, args, fds)
                migrator = self.migrator
                if migrator is not None and migrator.role is Role.DESTINATION:
                    # A restore's or a migration's destination enclave (loaded, about
                    # to claim its id): no abort comes, and its tree may die before it
                    # has the connection; from now on the tree's exit lets the
                    # duplicate go, as an application's does after an abort (the
                    # state undecided or not: without its tree it is worth nothing).
                    self.hold.kept_after_abort(destination=True)
            self.send({"t": "ret", "id": call_id, "value": value})
        except (MigSGXError, OSError) as exc:
            err = exc if isinstance(exc, MigSGXError) else ProtocolError(f"{name}: {exc}")
            self.send({"t": "err", "id": call_id, "code": err.code, "message": err.message})

    def _rewatch(self, args: list[Any], fds: Sequence[int], truncated: bool) -> int:
        """``__mig_watch`` (:meth:`.hold.Hold.rewatch`), refused once committed: a
        committed source's duplicate never follows anyone's set."""

        if not self._uncommitted():
            with contextlib.suppress(MigSGXError, OSError):
                self.hold.rewatch(self.sock, [], fds, truncated)  # (descriptors closed)
            raise CommittedError("this enclave committed: its duplicate follows no watch")
        return self.hold.rewatch(self.sock, args, fds, truncated)

    def _uncommitted(self) -> bool:
        migrator = self.migrator
        return migrator is None or not migrator.committed

    def _hold_state(self) -> State:
        """What the state is to the duplicate held (:data:`.hold.State`)."""

        migrator = self.migrator
        if migrator is None:
            return "idle"
        if migrator.discarded or migrator.instance.retired:
            return "ended"
        idle = not (migrator.committed or migrator.dumping or migrator.dumped)
        return "idle" if idle and migrator.role is None else "busy"

    def after_abort(self, *, answered: bool) -> None:
        """What an abort leaves of the duplicate, whichever channel carried it (this
        connection, or a live migration's side channel, whose driver's going away
        aborts too): kept and watched when the enclave answered and runs on, let go
        when nothing of a migration is left, else kept as it is.  Under the hold's
        own lock: a failed abort that finishes after one that succeeded finds the
        abort kept and lets nothing go."""

        with self._abort_rule:
            if answered and self._runs_on():
                self.hold.kept_after_abort()
            elif self.hold.kept_since_abort():
                pass  # (another abort was answered and kept it: that one stands)
            elif self._migration_ended():
                self.hold.drop()  # the migration ended: the driver's death ends us again
            elif self.hold.held:
                log("the abort did not end the migration: the duplicate stays")

    def _runs_on(self) -> bool:
        """After an abort: whether this enclave still holds its live state (a source).

        Then it keeps its duplicate until ``__mig_unhold``: the party that asked
        for the abort may die before the connection is back with the application
        (or before the ABORT frame it got is kept anywhere), and an end of file
        then would take the only copy of the state with it.  A discarded
        destination holds nothing worth keeping.
        """

        migrator = self.migrator
        return migrator is not None and not (migrator.discarded or migrator.committed)

    def _migration_ended(self) -> bool:
        """After an abort: whether nothing of a migration is left here to keep.

        A discarded destination, a wiped state, or no migration under way and nothing
        committed.  Not an abort that failed and left the state frozen, committed
        or undecided (``committed``, ``group-decided``, ``group-unchecked``,
        ``decision-unknown``, a destination awaiting its decision): the duplicate
        stays, so that neither the death of whoever asked nor an end of file
        takes the only copy with it (``docs/spec/commit.md``, section 4).
        """

        migrator = self.migrator
        if migrator is None or migrator.discarded or migrator.instance.retired:
            return True  # (nothing to keep: a released or checkpointed state is wiped)
        return migrator.role is None and not migrator.committed

    def keeps_state(self) -> bool:
        """Whether this enclave holds a migration's state that must outlive its
        serve loop: frozen, committed or undecided, its duplicate still held
        (``migsgx recover`` takes it back with ``pidfd_getfd``)."""

        return self.hold.held and not self._migration_ended()

    def fail_waiters(self) -> None:
        with self._waiters_lock:
            for waiter in self._ocall_waiters.values():
                waiter.put({"lost": True})


#: ``MIGSGX_FAULT=enclave.hold:unknown-call`` (its platform service's environment): a
#: runtime older than ``__mig_hold``, which takes it for an application's ECALL and
#: answers ``unknown-ecall`` (``enclave-busy`` while quiesced).  The agent's fault
#: syntax (:mod:`migsgx.agent.faults`), read here: this layer imports nothing above it.
_HOLD_POINT = "enclave.hold"


def _as_older_runtime(name: str) -> bool:
    """Whether this call is to be answered as a runtime that predates it would."""

    if name != "__mig_hold":
        return False
    for item in os.environ.get("MIGSGX_FAULT", "").split(","):
        point, _, action = item.strip().partition(":")
        if point == _HOLD_POINT and action == "unknown-call":
            log(f"migsgx fault: {point}:{action}")
            return True
    return False


def _late_follow_up(data: bytes, fds: Sequence[int], truncated: bool) -> bool:
    """Whether what was read at a frame boundary is a descriptor message of the one
    byte :data:`~migsgx.channel.WATCH_BYTE` or :data:`~migsgx.channel.HOLD_BYTE`
    (descriptors came with it, or were cut off) rather than a frame's header.

    No frame header begins so: its first byte is the top byte of a big-endian length
    of at most :data:`~migsgx.channel.ECALL_FRAME_MAX` (2**24), so 0 or 1, never
    ``W`` (0x57) or ``H`` (0x48)."""

    return data[:1] in (WATCH_BYTE, HOLD_BYTE) and bool(fds or truncated)


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
