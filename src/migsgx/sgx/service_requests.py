"""The PLATFORM requests an enclave sends its service, as one table (``spec/channels.md``,
section 6): each is answered by the :class:`LocalServices` bound to the identity the
service measured at launch, never to one the request names.

:func:`reply_to` serves one request of an enclave whose channel is ``sock``: its
store operations are refused once that channel hung up (checked under the
store's lock, :func:`~migsgx.sgx.record_store.for_requester`), so that a COMMIT
an enclave sent and died before it was written is never written afterwards
(``docs/spec/commit.md``, section 5).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time
from typing import Any, Final

from cryptography.hazmat.primitives import serialization

from ..errors import MigSGXError, ProtocolError
from .platform import LocalServices
from .record_store import for_requester
from .store_types import Decision, RecordUpdate
from .structs import KeyRequest, TargetInfo

__all__ = ["answer", "hung_up", "reply_to"]

#: A checkpoint gate's record name begins so (``migsgx.enclave.checkpoints.gate_name``).
GATE_PREFIX: Final = "!ckpt-"


def reply_to(svc: LocalServices, msg: dict[str, Any], sock: socket.socket, pid: int
             ) -> dict[str, Any]:  # fmt: skip
    """The reply to ``msg``, a request of the enclave process ``pid`` on channel ``sock``."""

    commit = _commits(msg)
    if commit:
        _fault("platform.before-commit", pid, sock)
    try:
        with for_requester(lambda: hung_up(sock)):
            reply: dict[str, Any] = {"t": "ok", "value": answer(svc, msg)}
    except MigSGXError as exc:
        reply = {"t": "err", "code": exc.code, "message": exc.message}
    except Exception as exc:
        reply = {
            "t": "err",
            "code": "platform",
            "message": f"platform request failed: {type(exc).__name__}",
        }
    if commit and reply["t"] == "ok":
        _fault("platform.after-commit", pid, sock)
    return reply


def hung_up(sock: socket.socket) -> bool:
    """Whether the enclave at the other end of its channel ``sock`` let go of it.

    Only the enclave's process holds that end, so it closes only as the
    process ends.  Polled, never read (no request is pending: one is answered
    at a time).
    """

    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def answer(svc: LocalServices, msg: dict[str, Any]) -> Any:
    kind = msg["t"]
    if kind == "getkey":
        return svc.get_key(KeyRequest.unpack(msg["request"]))
    if kind == "report":
        return svc.report(TargetInfo.unpack(msg["target"]), msg["data"]).pack()
    if kind == "quote":
        return svc.quote(msg["data"])
    if kind == "roots":
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svc.trusted_roots())
    if kind == "collateral":
        return svc.collateral()
    if kind == "ctr_create":
        return list(svc.counter_create(msg["initial"]))
    if kind == "ctr_read":
        return svc.counter_read(msg["id"])
    if kind == "ctr_inc":
        return svc.counter_increment(msg["id"], msg["by"])
    if kind == "ctr_destroy":
        svc.counter_destroy(msg["id"])
        return None
    if kind == "claim":
        return svc.claim_migration(msg["mid"])
    if kind == "claimed":
        return svc.migration_claimed(msg["mid"])
    if kind == "refuse":
        return svc.refuse_migration(msg["mid"])
    if kind == "ps_read":
        return svc.persist_read(msg["name"])
    if kind == "ps_update":
        svc.persist_update(msg["name"], RecordUpdate.from_wire(msg))
        return None
    if kind == "decide":
        retire = _record_changes(msg["changes"])
        decision = Decision(msg["mid"], msg["kind"], msg["frame"], group=msg["group"])
        held = svc.decide(decision, retire)
        return {"kind": held.kind, "frame": held.frame}
    if kind == "ps_txn":
        svc.persist_transaction(_record_changes(msg["changes"]), claim=msg["claim"])
        return None
    if kind == "revoke":
        held = svc.revoke_commit(msg["mid"], _record_changes(msg["changes"]))
        return {"kind": held.kind, "frame": held.frame}
    raise ProtocolError(f"unexpected request {kind!r} from an enclave")


def _commits(msg: dict[str, Any]) -> bool:
    """Whether ``msg`` records a COMMIT: a decision, or a checkpoint gate's commit (the
    lone enclave's: an update, alone or in a transaction, that advances its gate's
    counter)."""

    kind = msg.get("t")
    if kind == "decide":
        return msg.get("kind") == "commit"
    changes = [msg] if kind == "ps_update" else msg.get("changes") if kind == "ps_txn" else None
    return isinstance(changes, list) and any(
        isinstance(c, dict) and str(c.get("name", "")).startswith(GATE_PREFIX) and c.get("advance")
        for c in changes
    )


#: Held at a fault point, ``kill-enclave`` waits this long at most for the channel to hang up.
_KILL_WAIT: Final = 10.0


def _fault(point: str, pid: int, sock: socket.socket) -> None:
    """A fault point of the service, around the COMMIT of the enclave ``pid`` asked for.

    ``MIGSGX_FAULT=platform.before-commit:kill-enclave`` (received, not yet
    written) or ``platform.after-commit:kill-enclave`` (written, not yet
    answered) SIGKILLs that enclave and goes on once its channel hung up: the
    enclave dies inside ``__mig_commit``, at a step a test names (the agent's
    fault syntax, :mod:`migsgx.agent.faults`, read here: this layer imports
    nothing above it).  ``exit`` there ends the service itself at once (as a
    crash would): the enclave lives, its request sent and its answer lost.
    """

    for item in os.environ.get("MIGSGX_FAULT", "").split(","):
        name, _, action = item.strip().partition(":")
        if name != point or action not in ("kill-enclave", "exit"):
            continue
        sys.stderr.write(f"migsgx fault: {point}:{action} at {time.monotonic():.6f}\n")
        sys.stderr.flush()
        if action == "exit":
            os._exit(70)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + _KILL_WAIT
        while not hung_up(sock) and time.monotonic() < deadline:
            time.sleep(0.01)


def _record_changes(changes: object) -> list[tuple[str, RecordUpdate]]:
    """The record updates of a transaction (or a decision's retirement), checked."""

    if not isinstance(changes, list) or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) for c in changes
    ):
        raise ProtocolError("a record transaction is malformed")
    return [(c["name"], RecordUpdate.from_wire(c)) for c in changes]
