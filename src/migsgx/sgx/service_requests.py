"""The PLATFORM requests an enclave sends its service, as one table (``spec/channels.md``,
section 6): each is answered by the :class:`LocalServices` bound to the identity the
service measured at launch, never to one the request names."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization

from ..errors import ProtocolError
from .platform import LocalServices
from .store_types import Decision, RecordUpdate
from .structs import KeyRequest, TargetInfo

__all__ = ["answer"]


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


def _record_changes(changes: object) -> list[tuple[str, RecordUpdate]]:
    """The record updates of a transaction (or a decision's retirement), checked."""

    if not isinstance(changes, list) or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) for c in changes
    ):
        raise ProtocolError("a record transaction is malformed")
    return [(c["name"], RecordUpdate.from_wire(c)) for c in changes]
