"""The handshake's transcript encoding, its hash and MACs, and the key schedule.

These are the handshake's cryptographic recipe (``docs/spec/handshake.md``,
sections 5 and 6), built only from ``cryptography``'s primitives.  They are kept
apart from the state machine in :mod:`.handshake` so the recipe can be read and
checked against the spec and its vectors in one place, and so that the commit
protocol (:mod:`.commit`), which binds its tokens to the same transcript
encoding, needs no handshake to use it.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

__all__ = ["key_schedule", "mac", "mac_ok", "sha512", "transcript_item"]


def transcript_item(label: str, value: bytes) -> bytes:
    raw = label.encode("ascii")
    return bytes([len(raw)]) + raw + len(value).to_bytes(4, "big") + value


def sha512(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA512())
    h.update(data)
    return h.finalize()


def mac(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def mac_ok(key: bytes, data: bytes, tag: bytes) -> bool:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    try:
        h.verify(tag)
    except InvalidSignature:
        return False
    return True


_KEY_LABELS: Final = (
    "source confirm",
    "destination confirm",
    "stream source to destination",
    "control source to destination",
    "control destination to source",
)


def key_schedule(shared: bytes, transcript_hash: bytes) -> dict[str, bytes]:
    """The session's keys from the X25519 result and TH (spec, section 6)."""

    master = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=transcript_hash,
        info=b"migsgx/v1 handshake master",
    ).derive(shared)
    return {
        label: HKDFExpand(
            algorithm=hashes.SHA256(), length=32, info=b"migsgx/v1 " + label.encode()
        ).derive(master)
        for label in _KEY_LABELS
    }
