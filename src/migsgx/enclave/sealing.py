"""Sealing for enclave code: AES-GCM under a key from EGETKEY.

Sealed blob layout (``docs/spec/sealing.md``), little-endian::

    magic "MSXSEAL1" | key_policy u16 | isv_svn u16 | cpu_svn 16 | key_id 32
    | nonce 12 | aad_len u32 | aad | ciphertext || tag 16

Everything before the ciphertext is authenticated.  The key request is
rebuilt from the header, so a blob sealed on another host (another root
secret), by another enclave (policy MRENCLAVE) or another signer (policy
MRSIGNER), or sealed by a newer SVN, does not open; nor does a changed byte.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import KeyRequestError, SealError
from ..sgx.platform import TrustedServices
from ..sgx.structs import KEYNAME_SEAL, KEYPOLICY_MRENCLAVE, KEYPOLICY_MRSIGNER, KeyRequest

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
