"""The former, separate migration-id claim store (``migrations.cbor``).

Claims moved into the counter store (:mod:`migsgx.sgx.record_store`), where
one atomic write claims an id and installs the state it carries; a host's
older claims stay in this file, and still count there, so that no COMMIT
token accepted before the move activates a second copy after it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import cbor2

from .._fs import read_private, write_private
from ..errors import CounterError, StoreFullError
from .store_file import _create_once, _FileLock

# Quotas (see :mod:`migsgx.sgx.record_store`); the counter store's claims share them
# (:func:`_admit_claim`).
MAX_CLAIMS_PER_OWNER = 4096
MAX_CLAIMS_TOTAL = 65536


class ClaimStore:
    """Migration ids this host has accepted, each at most once, durably.

    This is the destination's seen-ids store: a migration's COMMIT token can
    activate a copy only by claiming its id here first.  On hardware it would
    be a rollback-protected log (a monotonic counter over a sealed list).
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        empty = cbor2.dumps({"v": 1, "claims": []})
        _create_once(self._path, _FileLock(self._lock, self._lock_path), empty)

    def _load(self) -> list[bytes]:
        try:
            data = cbor2.loads(read_private(self._path))
        except (OSError, ValueError, cbor2.CBORDecodeError) as exc:
            raise CounterError(f"claim store {self._path} is unreadable") from exc
        claims = data.get("claims") if isinstance(data, dict) else None
        if not isinstance(claims, list) or not all(isinstance(c, bytes) for c in claims):
            raise CounterError(f"claim store {self._path} is corrupt")
        return claims

    def claim(self, owner: bytes, mid: bytes) -> bool:
        """Record ``mid`` for ``owner``; False if it was recorded before."""

        key = owner + b"/" + _check_mid(mid)
        with _FileLock(self._lock, self._lock_path):
            claims = self._load()
            if key in claims:
                return False
            _admit_claim(claims, owner)
            claims.append(key)
            write_private(self._path, cbor2.dumps({"v": 1, "claims": claims}))
            return True

    def claimed(self, owner: bytes, mid: bytes) -> bool:
        with _FileLock(self._lock, self._lock_path):
            return owner + b"/" + _check_mid(mid) in self._load()

    def claimed_by_any(self, mid: bytes) -> bool:
        """Whether any enclave claimed ``mid`` here (an agent answering ``migsgx recover``)."""

        tail = b"/" + _check_mid(mid)
        with _FileLock(self._lock, self._lock_path):
            return any(key.endswith(tail) for key in self._load())


def _admit_claim(claims: list[bytes], owner: bytes) -> None:
    """Room for one more claim of ``owner`` (either store's quotas), or StoreFullError."""

    prefix = owner + b"/"
    if sum(1 for c in claims if c.startswith(prefix)) >= MAX_CLAIMS_PER_OWNER:
        raise StoreFullError("too many migration claims for this enclave's owner")
    if len(claims) >= MAX_CLAIMS_TOTAL:
        raise StoreFullError("the host's claim store is full")


def _check_mid(mid: bytes) -> bytes:
    if not isinstance(mid, bytes | bytearray) or not 1 <= len(mid) <= 64:
        raise CounterError("a migration id is 1 to 64 bytes")
    return bytes(mid)


def _refusals_sound(refusals: object) -> bool:
    """The refused ids: ``{hex(mid): {"owner": bstr, "at": float}}``, 16-byte ids only."""

    if not isinstance(refusals, dict):
        return False
    for key, entry in refusals.items():
        if not isinstance(key, str) or len(key) != 32 or not isinstance(entry, dict):
            return False
        try:
            bytes.fromhex(key)
        except ValueError:
            return False
        if not isinstance(entry.get("owner"), bytes):
            return False
    return True


def _quota_keys(data: dict[str, Any]) -> list[bytes]:
    """Claims and refusals as one list of ``owner/mid`` keys: they share the claim quotas."""

    refused = [bytes(e["owner"]) + b"/" + bytes.fromhex(k) for k, e in data["refusals"].items()]
    return [*data["claims"], *refused]
