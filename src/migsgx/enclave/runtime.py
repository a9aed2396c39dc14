"""The enclave process: ``python -m migsgx.enclave.runtime --channel FD --app FD``.

Started only by the platform service, never by the application, so the
application's process tree (what CRIU dumps) never contains enclave memory.
``--channel`` is the private link to the platform (keys, reports, quotes,
counters); ``--app`` is the application's connection, on which ECALLs arrive
and OCALLs leave.  Nothing secret is ever written to stderr (the log): only
event names and exception types.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ..channel import ECALL, ECALL_FRAME_MAX, IMAGE_FRAME_MAX, PLATFORM
from ..errors import (
    ConnectionClosedError,
    EnclaveLostError,
    FrameError,
    MigSGXError,
    ProtocolError,
    error_from_wire,
)
from ..sgx import syscalls
from ..sgx.image import EnclaveImage
from ..sgx.sandbox import apply_limits, manifest_limits
from ..sgx.store_types import Decision, RecordUpdate
from ..sgx.structs import KeyRequest, Report, ReportBody, TargetInfo
from ..wire import recv_frame, send_frame
from . import selftest
from .hold import Hold
from .instance import EnclaveInstance
from .migrator import RUNTIME_CALLS, Migrator
from .sidechannel import receive_side_channel


def log(event: str) -> None:
    sys.stderr.write(f"enclave[{os.getpid()}]: {event}\n")
    sys.stderr.flush()


#: How long an enclave waits for a restarted platform service before it gives up.
#: A restarted service greets every enclave at once, so a request after the
#: restart never waits; this bounds only a request made while no service runs,
#: which may be a commit with the source frozen: it must fail in seconds.
REATTACH_WAIT = 3.0
#: Within REATTACH_WAIT of a wait that found no service, the next request only
#: looks (this long) instead of waiting again: an abort right after a commit that
#: failed for want of the platform must not add another full wait to the time
#: the source stays frozen.
REATTACH_LOOK = 0.05


@dataclass
class Reserve:
    """A second channel to the platform, for after a restart of the service.

    The runtime holds both ends of a socket pair at fixed descriptor numbers
    (named on its command line).  A restarted service, as root, takes a
    duplicate of the peer end out of this process (``pidfd_getfd``), says
    hello on it, and binds it to the identity the launch ticket proves: a MAC
    only that host's platform makes, over the identity it measured.  The
    enclave needs no network and opens nothing: it only answers.
    """

    fd: int
    peer_fd: int
    ticket: bytes | None = None


class ChannelServices:
    """:class:`~migsgx.sgx.trusted.TrustedServices` over the private platform channel."""

    def __init__(
        self, sock: socket.socket, identity: ReportBody, reserve: Reserve | None = None
    ) -> None:
        self._sock: socket.socket | None = sock
        self._identity = identity
        self._reserve = reserve
        self._lock = threading.Lock()
        #: When a wait for a restarted service last found none (monotonic), if recently.
        self._gone_at: float | None = None

    @property
    def identity(self) -> ReportBody:
        return self._identity

    def _ask(self, msg: dict[str, Any]) -> Any:
        with self._lock:
            if self._sock is None:
                self._sock = self._reattach()
            try:
                send_frame(self._sock, msg)
            except (OSError, ConnectionClosedError):
                # Not delivered: the service restarted since the last request, so
                # sending it to the new one cannot apply it twice.
                self._sock.close()
                self._sock = self._reattach()
                try:
                    send_frame(self._sock, msg)
                except (OSError, ConnectionClosedError) as exc:
                    self._sock.close()
                    self._sock = None
                    raise EnclaveLostError("the platform service is gone") from exc
            try:
                reply = recv_frame(self._sock, PLATFORM)
            except (OSError, ConnectionClosedError) as exc:
                # It may or may not have been applied: never sent again blindly.
                self._sock.close()
                self._sock = None
                raise EnclaveLostError("the platform service went away during a request") from exc
        if reply["t"] == "err":
            raise error_from_wire(reply["code"], reply["message"])
        if reply["t"] != "ok":
            raise ProtocolError(f"unexpected platform reply {reply['t']!r}")
        return reply["value"]

    def _reattach(self) -> socket.socket:
        """Wait for a restarted service on the reserve channel and show the launch ticket."""

        reserve = self._reserve
        if reserve is None or reserve.ticket is None:
            raise EnclaveLostError("the platform service is gone")
        sock = socket.socket(fileno=os.dup(reserve.fd))
        now = time.monotonic()
        recently_gone = self._gone_at is not None and now - self._gone_at < REATTACH_WAIT
        try:
            sock.settimeout(REATTACH_LOOK if recently_gone else REATTACH_WAIT)
            try:
                hello = recv_frame(sock, PLATFORM)
            except OSError:
                if not recently_gone:
                    self._gone_at = time.monotonic()
                raise
            sock.settimeout(REATTACH_WAIT)
            if hello["t"] != "hello":
                raise ProtocolError("expected the platform's hello")
            send_frame(sock, {"t": "reattach", "identity": self._identity.pack(),
                              "ticket": reserve.ticket})  # fmt: skip
            reply = recv_frame(sock, PLATFORM)
            if reply["t"] != "reserve":
                raise EnclaveLostError("the restarted platform refused this enclave's ticket")
            # A fresh reserve pair, at the same descriptor numbers, for the next restart.
            _, fds, _, _ = socket.recv_fds(sock, 1, 2)
            if len(fds) != 2:
                raise ProtocolError("the platform sent no reserve channel")
            os.dup2(fds[0], reserve.fd)
            os.dup2(fds[1], reserve.peer_fd)
            for fd in fds:
                os.close(fd)
            sock.settimeout(None)
        except (OSError, MigSGXError) as exc:
            sock.close()
            raise EnclaveLostError("the platform service is gone") from exc
        self._gone_at = None
        log("reattached to a restarted platform service")
        return sock

    def get_key(self, request: KeyRequest) -> bytes:
        return bytes(self._ask({"t": "getkey", "request": request.pack()}))

    def report(self, target: TargetInfo, report_data: bytes) -> Report:
        raw = self._ask({"t": "report", "target": target.pack(), "data": bytes(report_data)})
        return Report.unpack(raw)

    def quote(self, report_data: bytes) -> bytes:
        return bytes(self._ask({"t": "quote", "data": bytes(report_data)}))

    def trusted_roots(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self._ask({"t": "roots"}))

    def collateral(self) -> list[bytes]:
        value = self._ask({"t": "collateral"})
        if not isinstance(value, list):
            raise ProtocolError("the platform's collateral is not a list")
        return [bytes(v) for v in value]

    def counter_create(self, initial: int = 0) -> tuple[str, int]:
        cid, value = self._ask({"t": "ctr_create", "initial": initial})
        return str(cid), int(value)

    def counter_read(self, counter_id: str) -> int:
        return int(self._ask({"t": "ctr_read", "id": counter_id}))

    def counter_increment(self, counter_id: str, by: int = 1) -> int:
        return int(self._ask({"t": "ctr_inc", "id": counter_id, "by": by}))

    def counter_destroy(self, counter_id: str) -> None:
        self._ask({"t": "ctr_destroy", "id": counter_id})

    def claim_migration(self, migration_id: bytes) -> bool:
        return bool(self._ask({"t": "claim", "mid": bytes(migration_id)}))

    def migration_claimed(self, migration_id: bytes) -> bool:
        return bool(self._ask({"t": "claimed", "mid": bytes(migration_id)}))

    def refuse_migration(self, migration_id: bytes) -> bool:
        return bool(self._ask({"t": "refuse", "mid": bytes(migration_id)}))

    def persist_read(self, name: str) -> bytes | None:
        value = self._ask({"t": "ps_read", "name": name})
        return None if value is None else bytes(value)

    def persist_update(self, name: str, update: RecordUpdate) -> None:
        self._ask({"t": "ps_update", "name": name, **update.to_wire()})

    def decide(
        self, decision: Decision, retire: Sequence[tuple[str, RecordUpdate]] = ()
    ) -> Decision:
        held = self._ask(
            {
                "t": "decide",
                "mid": decision.migration_id,
                "kind": decision.kind,
                "frame": decision.frame,
                "group": decision.group,
                "changes": [{"name": name, **update.to_wire()} for name, update in retire],
            }
        )
        return Decision(decision.migration_id, str(held["kind"]), bytes(held["frame"]))

    def persist_transaction(
        self, changes: Sequence[tuple[str, RecordUpdate]], *, claim: bytes | None = None
    ) -> None:
        wire = [{"name": name, **update.to_wire()} for name, update in changes]
        self._ask({"t": "ps_txn", "changes": wire, "claim": claim})

    def revoke_commit(
        self, migration_id: bytes, reopen: Sequence[tuple[str, RecordUpdate]] = ()
    ) -> Decision:
        wire = [{"name": name, **update.to_wire()} for name, update in reopen]
        held = self._ask({"t": "revoke", "mid": bytes(migration_id), "changes": wire})
        return Decision(bytes(migration_id), str(held["kind"]), bytes(held["frame"]))


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
        #: the application's exit.
        self.hold = Hold(log)

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
        self._reply(reply, name)
        if name == "__mig_abort":
            if reply["t"] == "ret" and self._runs_on():
                self.hold.kept_after_abort()
            else:
                self.hold.drop()  # the migration ended: the driver's death ends us again
        if self.migrator.exit_after_reply:
            # The state has moved: hang up, the serve loop ends and the process exits.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def serve(self) -> str:
        """Read frames until the application leaves; return why we stopped."""

        assert self.instance is not None
        while True:
            try:
                msg = recv_frame(self.sock, ECALL, max_size=ECALL_FRAME_MAX)
            except ConnectionClosedError:
                return "application closed the connection"
            except MigSGXError as exc:
                # A garbled frame cannot be resynchronised: report and hang up.
                log(f"bad frame from the application: {exc.code}")
                try:
                    self.send({"t": "err", "id": 0, "code": exc.code, "message": exc.message})
                except (OSError, MigSGXError):
                    pass
                return "protocol error"
            except OSError:
                return "application connection broke"
            kind = msg["t"]
            if kind == "ecall" and msg["fn"] in RUNTIME_CALLS:
                assert self.migrator is not None
                call_id, name = msg["id"], msg["fn"]
                if name == "__mig_side":
                    try:
                        receive_side_channel(self.sock, self.migrator, log)
                        self.send({"t": "ret", "id": call_id, "value": None})
                    except MigSGXError as exc:
                        self.send(
                            {"t": "err", "id": call_id, "code": exc.code, "message": exc.message}
                        )
                    continue
                if name in ("__mig_hold", "__mig_held"):
                    self._hold(call_id, name, msg["args"])
                    continue
                if name == "__mig_unhold":
                    # The application has its connection back (it asks), or nobody
                    # can take it any more (the party that holds it asks): the end
                    # of file ends this enclave again.
                    self.hold.drop()
                    self.send({"t": "ret", "id": call_id, "value": None})
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

    def _hold(self, call_id: int, name: str, args: list[Any]) -> None:
        """``__mig_hold``: keep the descriptors that follow the frame (:mod:`.hold`);
        ``__mig_held``: whether the duplicate held now is the caller's.

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
            else:
                value = self.hold.take(self.sock, args)
            self.send({"t": "ret", "id": call_id, "value": value})
        except (MigSGXError, OSError) as exc:
            err = exc if isinstance(exc, MigSGXError) else ProtocolError(f"{name}: {exc}")
            self.send({"t": "err", "id": call_id, "code": err.code, "message": err.message})

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

    def fail_waiters(self) -> None:
        with self._waiters_lock:
            for waiter in self._ocall_waiters.values():
                waiter.put({"lost": True})


def _not_dumpable() -> None:
    """Keep other processes of this user (other enclaves, the application) out of
    this process's memory: no ptrace attach, no /proc/PID/mem, no core dump."""

    import ctypes

    pr_set_dumpable = 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        log(f"cannot make the enclave process non-dumpable (errno {ctypes.get_errno()})")


def _seal_sandbox() -> None:
    """Inside the launcher's sandbox: stack the filter that forbids ``execve``.

    The launcher's filter had to allow ``execve`` for its own last step; this
    runtime never runs a program, so enclave code must not either.  Without the
    binding (the launcher then loaded no filter either) there is nothing to stack.
    """

    if syscalls.available():
        syscalls.install_runtime_filter()


def main(argv: list[str] | None = None) -> int:
    _not_dumpable()
    parser = argparse.ArgumentParser(prog="migsgx-enclave")
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--app", type=int, default=None)
    parser.add_argument("--sandboxed", action="store_true")
    parser.add_argument("--reserve", type=int, default=None)
    parser.add_argument("--reserve-peer", type=int, default=None)
    parser.add_argument("--platform-tag", default=None)
    args = parser.parse_args(argv)
    if args.sandboxed:
        _seal_sandbox()
    chan = socket.socket(fileno=args.channel)
    # The runtime is ready before it knows which enclave it will be: a platform
    # service keeps one such process warm, so a launch costs no process start.
    selftest.run()
    init = recv_frame(chan, PLATFORM, max_size=IMAGE_FRAME_MAX)
    if init["t"] != "init":
        log("platform sent no init")
        return 2
    if args.app is not None:
        app = socket.socket(fileno=args.app)
    else:
        _, fds, _, _ = socket.recv_fds(chan, 1, 1)
        if len(fds) != 1:
            log("platform sent no application connection")
            return 2
        app = socket.socket(fileno=fds[0])
    identity = ReportBody.unpack(init["identity"])
    reserve = None
    if args.reserve is not None and args.reserve_peer is not None:
        ticket = recv_frame(chan, PLATFORM)
        if ticket["t"] == "ticket":
            reserve = Reserve(args.reserve, args.reserve_peer, ticket["ticket"])
    channel = AppChannel(app)
    try:
        image = EnclaveImage.from_files(init["files"])
        if args.sandboxed:
            # The manifest's limits, before a line of the enclave's code runs.
            m = image.manifest
            apply_limits(manifest_limits(m.memory_size, m.thread_slots))
        services = ChannelServices(chan, identity, reserve)
        instance = EnclaveInstance(image, services, channel.ocall)
    except MigSGXError as exc:
        log(f"enclave failed to start: {exc.code}")
        send_frame(app, {"t": "err", "id": 0, "code": exc.code, "message": exc.message})
        return 1
    channel.instance = instance
    channel.migrator = Migrator(instance)
    m = image.manifest
    channel.send(
        {
            "t": "ready",
            "pid": os.getpid(),
            "mr_enclave": identity.mr_enclave,
            "mr_signer": identity.mr_signer,
            "isv_prod_id": identity.isv_prod_id,
            "isv_svn": identity.isv_svn,
            "debug": identity.attributes.debug,
            "memory_size": m.memory_size,
            "thread_slots": m.thread_slots,
            "ecalls": instance.ecall_names,
        }
    )
    log(f"started {m.name} mrenclave={identity.mr_enclave.hex()[:16]}")
    reason = channel.serve()
    channel.fail_waiters()
    try:
        instance.quiesce(timeout=5.0)
    except MigSGXError:
        log("ECALLs still running at exit")
    if channel.migrator.role is not None and not channel.migrator.committed:
        try:
            channel.migrator.abort("the driver went away")
            reason += " during a migration (aborted)"
        except MigSGXError as exc:
            # Another enclave of its migration committed first: this one committed
            # too (its token is in the decision record), or could not (said).
            reason += f" during a migration ({exc.code}: {exc.message})"
    instance.retire(reason)
    log(f"exiting: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
