"""The enclave's side of the PLATFORM channel: :class:`ChannelServices`.

:class:`~migsgx.sgx.trusted.TrustedServices` (keys, reports, quotes, counters,
persistent records, migration decisions and claims) as requests to the
platform service, one at a time.  A restarted service takes the enclave back on
its reserve channel (:class:`Reserve`), which the launch ticket binds to the
identity the service measured; a request is never sent twice where the first
may have been applied, and one whose answer was lost after it went out raises
:class:`~migsgx.errors.PlatformAnswerLostError` (it may have been applied).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ..channel import PLATFORM
from ..errors import (
    ConnectionClosedError,
    EnclaveLostError,
    MigSGXError,
    PlatformAnswerLostError,
    ProtocolError,
    error_from_wire,
)
from ..sgx.store_types import Decision, RecordUpdate
from ..sgx.structs import KeyRequest, Report, ReportBody, TargetInfo
from ..wire import recv_frame, send_frame
from .eventlog import log

__all__ = ["REATTACH_LOOK", "REATTACH_WAIT", "ChannelServices", "Reserve"]

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

    @classmethod
    def receive(cls, chan: socket.socket, fd: int | None, peer_fd: int | None) -> Reserve | None:
        """The launch ticket, which follows ``init`` when the command line names a pair."""

        if fd is None or peer_fd is None:
            return None
        ticket = recv_frame(chan, PLATFORM)
        return cls(fd, peer_fd, ticket["ticket"]) if ticket["t"] == "ticket" else None


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
                # It may or may not have been applied: never sent again blindly, and
                # said so (a decision's caller then does not know the decision).
                self._sock.close()
                self._sock = None
                raise PlatformAnswerLostError(
                    "the platform service went away during a request"
                ) from exc
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
