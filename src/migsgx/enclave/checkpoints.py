"""The trusted half of checkpoints: a stream secret sealed to this host.

``start`` makes a fresh checkpoint id and stream secret and seals both (with
the source's identity) under the enclave's seal key; the state then streams
exactly as in a live migration, with the source as both ends of the stream
header.  ``open_key`` unseals them in a fresh enclave: on another host, or in
an enclave the migration policy does not allow, that fails; a checkpoint id
already claimed on this host is refused before anything is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import cbor2

from ..core.policy import IDENTITY_SIZE, EnclaveIdentity, MigrationPolicy, PolicyMode
from ..core.stream import StreamChannel
from ..errors import ReplayError, SealError
from ..sgx.trusted import TrustedServices
from . import sealing
from .instance import EnclaveInstance

AAD_LABEL = b"migsgx checkpoint v1 "


@dataclass
class Checkpoint:
    checkpoint_id: bytes
    sealed_key: bytes
    streams: StreamChannel = field(repr=False)


def _policy(instance: EnclaveInstance) -> MigrationPolicy:
    m = instance.manifest
    return MigrationPolicy(mode=PolicyMode(m.migration_policy), allow_debug=m.debug)


def _seal_policy(instance: EnclaveInstance) -> int:
    if instance.manifest.migration_policy == "same-signer":
        return sealing.POLICY_MRSIGNER
    return sealing.POLICY_MRENCLAVE


def start(instance: EnclaveInstance) -> Checkpoint:
    services = instance.services
    checkpoint_id = os.urandom(16)
    secret = os.urandom(32)
    own = EnclaveIdentity.from_report(services.identity)
    payload = cbor2.dumps(
        {"v": 1, "id": checkpoint_id, "secret": secret, "source": own.pack(), "debug": own.debug}
    )
    blob = sealing.seal(
        services, payload, aad=AAD_LABEL + checkpoint_id, policy=_seal_policy(instance)
    )
    streams = StreamChannel(
        secret, migration_id=checkpoint_id, source=own, destination=own, sending=True
    )
    return Checkpoint(checkpoint_id, blob, streams)


def open_key_record(services: TrustedServices, blob: bytes) -> tuple[bytes, bytes, EnclaveIdentity]:
    """Unseal a checkpoint key record: (checkpoint id, stream secret, source identity).

    Checks the format only (``docs/spec/checkpoint.md``, section 2); whether this
    enclave may take the checkpoint over, and whether it was restored before, is
    :func:`open_key`'s.
    """

    aad = sealing.sealed_aad(blob)
    if not aad.startswith(AAD_LABEL) or len(aad) != len(AAD_LABEL) + 16:
        raise SealError("not a migsgx checkpoint key")
    try:
        payload = sealing.unseal(services, blob, aad=aad)
    except SealError as exc:
        raise SealError(
            "cannot open the checkpoint: it was made on another host or by an enclave "
            "this one may not take over"
        ) from exc
    try:
        data: Any = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise SealError("the checkpoint key is malformed") from exc
    if not (
        isinstance(data, dict)
        and data.get("v") == 1
        and isinstance(data.get("id"), bytes)
        and len(data["id"]) == 16
        and isinstance(data.get("secret"), bytes)
        and len(data["secret"]) == 32
        and isinstance(data.get("source"), bytes)
        and len(data["source"]) == IDENTITY_SIZE
        and isinstance(data.get("debug"), bool)
    ):
        raise SealError("the checkpoint key is malformed")
    checkpoint_id = data["id"]
    if checkpoint_id != aad[len(AAD_LABEL) :]:
        raise SealError("the checkpoint key names another checkpoint")
    packed = EnclaveIdentity.unpack(data["source"])
    source = EnclaveIdentity(
        packed.mr_enclave, packed.mr_signer, packed.isv_prod_id, packed.isv_svn, data["debug"]
    )
    return checkpoint_id, data["secret"], source


def open_key(instance: EnclaveInstance, blob: bytes) -> Checkpoint:
    services = instance.services
    checkpoint_id, secret, source = open_key_record(services, blob)
    _policy(instance).check(source, EnclaveIdentity.from_report(services.identity))
    if services.migration_claimed(checkpoint_id):
        raise ReplayError("this checkpoint was restored before; it restores only once")
    streams = StreamChannel(
        secret, migration_id=checkpoint_id, source=source, destination=source, sending=False
    )
    return Checkpoint(checkpoint_id, blob, streams)
