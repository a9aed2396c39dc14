"""Sealing for enclave code: AES-GCM under a key from EGETKEY.

Sealed blob layout (``docs/spec/sealing.md``), little-endian::

    magic "MSXSEAL1" | key_policy u16 | isv_svn u16 | cpu_svn 16 | key_id 32
    | nonce 12 | aad_len u32 | aad | ciphertext || tag 16

Everything before the ciphertext is authenticated.  The key request is
rebuilt from the header, so a blob sealed on another host (another root
secret), by another enclave (policy MRENCLAVE) or another signer (policy
MRSIGNER), or sealed by a newer SVN, does not open; nor does a changed byte.

Migratable blobs (``seal_with_msk`` / ``open_with_msk``, ``docs/spec/persistent.md``)
are sealed under the enclave's own migratable sealing key instead, which moves
with a migration; :mod:`.persistent` decides when that key may be used.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import KeyRequestError, SealError
from ..sgx.structs import KEYNAME_SEAL, KEYPOLICY_MRENCLAVE, KEYPOLICY_MRSIGNER, KeyRequest
from ..sgx.trusted import TrustedServices

POLICY_MRENCLAVE = KEYPOLICY_MRENCLAVE
POLICY_MRSIGNER = KEYPOLICY_MRSIGNER
_MAGIC = b"MSXSEAL1"
_HEAD = struct.Struct("<8sHH16s32s12sI")
MAX_SEALED = 64 << 20


def seal(
    services: TrustedServices,
    plaintext: bytes,
    *,
    aad: bytes = b"",
    policy: int = POLICY_MRSIGNER,
) -> bytes:
    if policy not in (POLICY_MRENCLAVE, POLICY_MRSIGNER):
        raise ValueError("policy must be POLICY_MRENCLAVE or POLICY_MRSIGNER")
    ident = services.identity
    key_id = os.urandom(32)
    key = services.get_key(
        KeyRequest(
            KEYNAME_SEAL,
            key_policy=policy,
            isv_svn=ident.isv_svn,
            cpu_svn=ident.cpu_svn,
            key_id=key_id,
        )
    )
    nonce = os.urandom(12)
    head = _HEAD.pack(_MAGIC, policy, ident.isv_svn, ident.cpu_svn, key_id, nonce, len(aad)) + aad
    return head + AESGCM(key).encrypt(nonce, plaintext, head)


def unseal(services: TrustedServices, blob: bytes, *, aad: bytes | None = None) -> bytes:
    """Open a sealed blob; ``aad``, when given, must equal the sealed AAD."""

    if len(blob) < _HEAD.size + 16 or len(blob) > MAX_SEALED:
        raise SealError("not a sealed blob")
    magic, policy, svn, cpu_svn, key_id, nonce, aad_len = _HEAD.unpack_from(blob)
    if magic != _MAGIC or policy not in (POLICY_MRENCLAVE, POLICY_MRSIGNER):
        raise SealError("not a sealed blob")
    if _HEAD.size + aad_len + 16 > len(blob):
        raise SealError("sealed blob is truncated")
    head = blob[: _HEAD.size + aad_len]
    if aad is not None and head[_HEAD.size :] != aad:
        raise SealError("sealed data was bound to other additional data")
    try:
        key = services.get_key(
            KeyRequest(KEYNAME_SEAL, key_policy=policy, isv_svn=svn, cpu_svn=cpu_svn, key_id=key_id)
        )
    except KeyRequestError as exc:
        raise SealError(f"cannot unseal: {exc}") from exc
    try:
        return AESGCM(key).decrypt(nonce, blob[len(head) :], head)
    except InvalidTag as exc:
        raise SealError(
            "cannot unseal: sealed on another platform or by another enclave, or tampered"
        ) from exc


def sealed_aad(blob: bytes) -> bytes:
    """The additional data a blob was sealed with (authenticated, not secret)."""

    if len(blob) < _HEAD.size:
        raise SealError("not a sealed blob")
    (aad_len,) = struct.unpack_from("<I", blob, _HEAD.size - 4)
    return blob[_HEAD.size : _HEAD.size + aad_len]


# --- migratable sealing ------------------------------------------------------------
# Blobs sealed under one of an enclave's migratable sealing keys (MSKs), which live
# in the enclave's persistent record and move with a migration; every arrival adds
# a key generation (``docs/spec/persistent.md``).  The platform is not involved:
# the keys are the enclave's own secrets.
_MIG_MAGIC = b"MSXMSEA1"
_MIG_HEAD = struct.Struct("<8s16sI32s12sQB3sI")
_MIG_INFO = b"migsgx/v1 migratable seal key"
MAX_BINDING_NAME = 64
MIGRATABLE_OVERHEAD = _MIG_HEAD.size + 16


def _migratable_key(msk: bytes, record_id: bytes, generation: int, key_id: bytes) -> bytes:
    info = _MIG_INFO + record_id + generation.to_bytes(4, "little")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=key_id, info=info).derive(msk)


def seal_with_msk(
    msk: bytes,
    record_id: bytes,
    plaintext: bytes,
    *,
    generation: int = 0,
    aad: bytes = b"",
    binding: tuple[str, int] | None = None,
    random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """A migratable blob under key ``generation``; ``binding`` is (counter name, value)."""

    if len(msk) != 32 or len(record_id) != 16 or not 0 <= generation < 1 << 32:
        raise ValueError("a migratable sealing key is 32 bytes, a record id 16")
    name, version = binding if binding is not None else ("", 0)
    raw_name = name.encode("ascii")
    if binding is not None and (not 1 <= len(raw_name) <= MAX_BINDING_NAME or version < 1):
        raise ValueError("a binding names a counter and a value of at least 1")
    key_id = random(32)
    nonce = random(12)
    head = (
        _MIG_HEAD.pack(
            _MIG_MAGIC,
            record_id,
            generation,
            key_id,
            nonce,
            version,
            len(raw_name),
            bytes(3),
            len(aad),
        )
        + raw_name
        + aad
    )
    key = _migratable_key(msk, record_id, generation, key_id)
    return head + AESGCM(key).encrypt(nonce, plaintext, head)


@dataclass(frozen=True)
class MigratableHeader:
    """The public header of a migratable blob (authentic only once the blob opened)."""

    record_id: bytes
    generation: int
    binding: tuple[str, int] | None
    aad: bytes
    size: int


def migratable_header(blob: bytes) -> MigratableHeader:
    """Parse a migratable blob's header (no key needed, nothing verified yet)."""

    if len(blob) < MIGRATABLE_OVERHEAD or len(blob) > MAX_SEALED:
        raise SealError("not a migratable sealed blob")
    magic, record_id, generation, _kid, _nonce, version, name_len, reserved, aad_len = (
        _MIG_HEAD.unpack_from(blob)
    )
    if magic != _MIG_MAGIC or reserved != bytes(3) or name_len > MAX_BINDING_NAME:
        raise SealError("not a migratable sealed blob")
    if (name_len == 0) != (version == 0):
        raise SealError("not a migratable sealed blob")
    size = _MIG_HEAD.size + name_len + aad_len
    if size + 16 > len(blob):
        raise SealError("sealed blob is truncated")
    try:
        name = blob[_MIG_HEAD.size : _MIG_HEAD.size + name_len].decode("ascii")
    except UnicodeDecodeError as exc:
        raise SealError("not a migratable sealed blob") from exc
    binding = (name, int(version)) if name_len else None
    aad = bytes(blob[size - aad_len : size])
    return MigratableHeader(bytes(record_id), int(generation), binding, aad, size)


def open_with_msk(
    keys: Sequence[bytes], record_id: bytes, blob: bytes, *, aad: bytes | None = None
) -> tuple[bytes, MigratableHeader]:
    """Open a migratable blob with the key of its generation among ``keys``.

    Returns the plaintext and the (now authentic) header.
    """

    head = migratable_header(blob)
    if aad is not None and head.aad != aad:
        raise SealError("sealed data was bound to other additional data")
    key_id, nonce = _MIG_HEAD.unpack_from(blob)[3:5]
    if head.record_id != record_id or head.generation >= len(keys):
        # The same answer as a failed tag: which enclave sealed it is not told.
        raise SealError(_NOT_OURS)
    key = _migratable_key(keys[head.generation], record_id, head.generation, key_id)
    try:
        plaintext = AESGCM(key).decrypt(nonce, blob[head.size :], blob[: head.size])
    except InvalidTag as exc:
        raise SealError(_NOT_OURS) from exc
    return plaintext, head


_NOT_OURS = "cannot unseal: sealed under another enclave's persistent state, or tampered"
