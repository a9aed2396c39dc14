"""The trusted half of checkpoints: fork-proof by a gate kept in the platform store.

A checkpoint must never become a second live copy of an enclave.  Its stream
secret therefore has two halves: one sealed into the checkpoint's key file
(``file``), one kept by the platform in a *gate record* (``share``, sealed too,
under the runtime-reserved name ``!ckpt-<id>``) beside a gate counter:

* ``start`` creates the gate record with its counter at 0 (*pending*);
* the source's commit advances the counter to 1 (*committed*) in the same
  atomic platform update that retires its persistent record, right before the
  source wipes itself; the same update rewrites the gate record with the
  SHA-256 of the checkpoint's metadata (``migsgx.json``, which holds the digest
  of every other file), so that a restore refuses a directory whose metadata
  was rewritten together with its files;
* an abort deletes the gate record and its counter: the share is gone, so the
  files on disk can never be opened again;
* a restore needs the counter at 1, and consumes the gate (record and counter
  go) in the same atomic update that installs the persistent state: at most
  once, and never while the source may still run.

The enclaves of one application checkpoint together: the first committed gate
is the commit point of them all.  Their gates are therefore created tagged with
the checkpoint's *group* (16 random bytes the driver gives every enclave), and
in a group the commit and the abort are each recorded as a decision of the
platform store (``docs/spec/commit.md``, 1.1) in the same atomic write that
moves the gate: the store refuses an abort once a sibling committed, and a
commit once a sibling aborted, so no race of a commit and an abort splits the
checkpoint.

On another host, or in an enclave the migration policy does not allow, the
key file does not unseal; on this host nothing restores without its gate.
Root on an emulated host could roll the store file back (as for counters; on
hardware the gate is a monotonic counter of the platform).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..core.policy import IDENTITY_SIZE, EnclaveIdentity, MigrationPolicy, PolicyMode
from ..core.stream_channel import StreamChannel
from ..errors import (
    CheckpointDamagedError,
    CheckpointGateError,
    CounterError,
    MigSGXError,
    SealError,
)
from ..sgx.store_types import RecordUpdate
from ..sgx.trusted import TrustedServices
from . import sealing
from .instance import EnclaveInstance

AAD_LABEL = b"migsgx checkpoint v2 "
GATE_AAD_LABEL = b"migsgx checkpoint gate v2 "
STREAM_INFO = b"migsgx checkpoint stream v2"
PENDING = 0
COMMITTED = 1
#: The metadata digest a committed gate binds: SHA-256, or empty (nothing bound).
META_SIZES = (0, 32)


@dataclass
class Checkpoint:
    checkpoint_id: bytes
    sealed_key: bytes
    gate_counter: str
    gate_blob: bytes = field(repr=False)
    streams: StreamChannel = field(repr=False)
    #: The checkpoint's group (16 bytes), or empty for an enclave checkpointed alone.
    group: bytes = b""

    @property
    def gate_name(self) -> str:
        return gate_name(self.checkpoint_id)


def gate_name(checkpoint_id: bytes) -> str:
    return "!ckpt-" + checkpoint_id.hex()


def _policy(instance: EnclaveInstance) -> MigrationPolicy:
    m = instance.manifest
    return MigrationPolicy(mode=PolicyMode(m.migration_policy), allow_debug=m.debug)


def _seal_policy(instance: EnclaveInstance) -> int:
    if instance.manifest.migration_policy == "same-signer":
        return sealing.POLICY_MRSIGNER
    return sealing.POLICY_MRENCLAVE


def _stream_secret(checkpoint_id: bytes, file_half: bytes, share: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=checkpoint_id, info=STREAM_INFO)
    return hkdf.derive(file_half + share)


def start(instance: EnclaveInstance, group: bytes = b"") -> Checkpoint:
    """A fresh checkpoint id, its pending gate on this host, and the sealed key file.

    ``group``: the checkpoint's group when several enclaves checkpoint together;
    the gate is created tagged with it (the store keeps their decisions while
    any gate of the group is there).
    """

    services = instance.services
    checkpoint_id = os.urandom(16)
    file_half = os.urandom(32)
    share = os.urandom(32)
    counter = os.urandom(16).hex()
    own = EnclaveIdentity.from_report(services.identity)
    policy = _seal_policy(instance)
    key_payload = {
        "v": 2, "id": checkpoint_id, "secret": file_half, "source": own.pack(),
        "debug": own.debug,
    }  # fmt: skip
    blob = sealing.seal(
        services, cbor2.dumps(key_payload), aad=AAD_LABEL + checkpoint_id, policy=policy
    )
    gate_payload = {"v": 2, "id": checkpoint_id, "share": share, "counter": counter}
    gate_blob = sealing.seal(
        services, cbor2.dumps(gate_payload), aad=GATE_AAD_LABEL + checkpoint_id, policy=policy
    )
    services.persist_update(
        gate_name(checkpoint_id),
        RecordUpdate(gate_blob, create={counter: PENDING}, expect_absent=True, group=group),
    )
    streams = StreamChannel(
        _stream_secret(checkpoint_id, file_half, share),
        migration_id=checkpoint_id, source=own, destination=own, sending=True,
    )  # fmt: skip
    return Checkpoint(checkpoint_id, blob, counter, gate_blob, streams, bytes(group))


def commit_change(
    instance: EnclaveInstance, ckpt: Checkpoint, meta: bytes = b""
) -> tuple[str, RecordUpdate]:
    """The source's commit: the gate goes from pending to committed (and only from there).

    The committed gate record also binds ``meta``, the SHA-256 of the
    checkpoint's metadata file (or nothing, for a bare enclave checkpoint): a
    restore presents the digest of the metadata it reads, and only the same one
    opens the gate (:func:`open_key`).
    """

    if len(meta) not in META_SIZES:
        raise ValueError("the checkpoint metadata digest is SHA-256 (32 bytes) or empty")
    gate = _unseal_map(instance.services, ckpt.gate_blob, GATE_AAD_LABEL, "checkpoint gate")
    committed = sealing.seal(
        instance.services, cbor2.dumps({**gate, "meta": bytes(meta)}),
        aad=GATE_AAD_LABEL + ckpt.checkpoint_id, policy=_seal_policy(instance),
    )  # fmt: skip
    return ckpt.gate_name, RecordUpdate(
        committed,
        advance={ckpt.gate_counter: COMMITTED},
        check={ckpt.gate_counter: PENDING},
        expect=_sha256(ckpt.gate_blob),
    )


def consume_change(ckpt: Checkpoint) -> tuple[str, RecordUpdate]:
    """The restore's activation: a committed gate goes, record and counter."""

    return ckpt.gate_name, RecordUpdate(
        None,
        destroy=(ckpt.gate_counter,),
        check={ckpt.gate_counter: COMMITTED},
        expect=_sha256(ckpt.gate_blob),
    )


def abort_change(ckpt: Checkpoint) -> tuple[str, RecordUpdate]:
    """An aborted checkpoint: its gate (and with it half its key) goes while still pending."""

    return ckpt.gate_name, RecordUpdate(
        None,
        destroy=(ckpt.gate_counter,),
        check={ckpt.gate_counter: PENDING},
        expect=_sha256(ckpt.gate_blob),
    )


def destroy(instance: EnclaveInstance, ckpt: Checkpoint) -> None:
    """An enclave checkpointed alone aborts: its gate goes (:func:`abort_change`).

    If the platform cannot be reached the gate stays pending, and a pending
    gate never opens; only its record lingers.  (In a group the abort is a
    decision, :meth:`Migrator.abort`, never best effort.)
    """

    with contextlib.suppress(MigSGXError, OSError):
        instance.services.persist_update(*abort_change(ckpt))


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _unseal_map(services: TrustedServices, blob: bytes, label: bytes, what: str) -> dict[str, Any]:
    aad = sealing.sealed_aad(blob)
    if not aad.startswith(label) or len(aad) != len(label) + 16:
        raise SealError(f"not a migsgx {what}")
    try:
        payload = sealing.unseal(services, blob, aad=aad)
    except SealError as exc:
        raise SealError(
            f"cannot open the {what}: it was made on another host or by an enclave "
            "this one may not take over"
        ) from exc
    try:
        data: Any = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise SealError(f"the {what} is malformed") from exc
    if not isinstance(data, dict) or data.get("v") != 2 or data.get("id") != aad[len(label) :]:
        raise SealError(f"the {what} is malformed")
    return data


def open_key_record(services: TrustedServices, blob: bytes) -> tuple[bytes, bytes, EnclaveIdentity]:
    """Unseal a checkpoint key record: (checkpoint id, key-file half, source identity).

    Checks the format only (``docs/spec/checkpoint.md``, section 2); whether this
    enclave may take the checkpoint over, and whether its gate lets it restore,
    is :func:`open_key`'s.
    """

    data = _unseal_map(services, blob, AAD_LABEL, "checkpoint key")
    if not (
        set(data) == {"v", "id", "secret", "source", "debug"}
        and isinstance(data.get("secret"), bytes)
        and len(data["secret"]) == 32
        and isinstance(data.get("source"), bytes)
        and len(data["source"]) == IDENTITY_SIZE
        and isinstance(data.get("debug"), bool)
    ):
        raise SealError("the checkpoint key is malformed")
    packed = EnclaveIdentity.unpack(data["source"])
    source = EnclaveIdentity(
        packed.mr_enclave, packed.mr_signer, packed.isv_prod_id, packed.isv_svn, data["debug"]
    )
    return data["id"], data["secret"], source


def open_gate_record(
    services: TrustedServices, blob: bytes
) -> tuple[bytes, bytes, str, bytes | None]:
    """Unseal a gate record: (checkpoint id, share, gate counter, bound metadata digest).

    The digest is None in a pending gate, bytes (32, or empty: nothing bound) in
    a committed one (``docs/spec/checkpoint.md``, section 2).
    """

    gate = _unseal_map(services, blob, GATE_AAD_LABEL, "checkpoint gate")
    share, counter, meta = gate.get("share"), gate.get("counter"), gate.get("meta")
    if not (
        set(gate) in ({"v", "id", "share", "counter"}, {"v", "id", "share", "counter", "meta"})
        and isinstance(share, bytes)
        and len(share) == 32
        and isinstance(counter, str)
        and (meta is None or (isinstance(meta, bytes) and len(meta) in META_SIZES))
    ):
        raise SealError("the checkpoint gate is malformed")
    return gate["id"], share, counter, meta


def open_key(instance: EnclaveInstance, blob: bytes, meta: bytes = b"") -> Checkpoint:
    """Open a checkpoint's key file and its committed gate on this host.

    ``meta`` is the SHA-256 of the metadata the restore read (empty for a bare
    enclave checkpoint); it must be the digest the source committed.
    """

    services = instance.services
    checkpoint_id, file_half, source = open_key_record(services, blob)
    _policy(instance).check(source, EnclaveIdentity.from_report(services.identity))
    gate_blob = services.persist_read(gate_name(checkpoint_id))
    if gate_blob is None:
        raise CheckpointGateError(
            "this checkpoint was aborted or restored before (it restores only once)"
        )
    gate_id, share, counter, bound = open_gate_record(services, gate_blob)
    if gate_id != checkpoint_id:
        raise SealError("the checkpoint gate names another checkpoint")
    try:
        state = services.counter_read(counter)
    except CounterError as exc:
        raise CheckpointGateError("this checkpoint's gate is gone") from exc
    if state != COMMITTED or bound is None:
        raise CheckpointGateError(
            "this checkpoint was never committed: its source may still run, so it cannot "
            "be restored"
        )
    if not hmac.compare_digest(bound, bytes(meta)):
        raise CheckpointDamagedError(
            "the checkpoint's metadata is not the one its source committed (rewritten or "
            "replaced): nothing of it is restored"
        )
    streams = StreamChannel(
        _stream_secret(checkpoint_id, file_half, share),
        migration_id=checkpoint_id, source=source, destination=source, sending=False,
    )  # fmt: skip
    return Checkpoint(checkpoint_id, blob, counter, gate_blob, streams)
