"""A key-value store whose values are secrets: they exist in plaintext only here.

Values live in a heap in enclave memory (bulk state); the index of keys to
heap offsets is small structured state.  Both move with a migration.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from migsgx.enclave import Enclave, EnclaveError, ecall

HEAP_BYTES = 48 << 20


class KeyValueStore(Enclave):
    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.heap = ctx.memory.array("heap", HEAP_BYTES, np.uint8)
        self.index: dict[str, list[int]] = {}
        self.top = 0
        self.puts = 0

    # --- ECALLs ---------------------------------------------------------------
    @ecall
    def put(self, key: str, value: bytes) -> int:
        if not isinstance(key, str) or not isinstance(value, bytes):
            raise EnclaveError("put takes a str key and a bytes value")
        end = self.top + len(value)
        if end > HEAP_BYTES:
            raise EnclaveError("the store is full")
        self.heap[self.top : end] = np.frombuffer(value, dtype=np.uint8)
        self.index[key] = [self.top, len(value)]
        self.top = end
        self.puts += 1
        return len(self.index)

    @ecall
    def get(self, key: str) -> bytes | None:
        where = self.index.get(key)
        if where is None:
            return None
        off, n = where
        return self.heap[off : off + n].tobytes()

    @ecall
    def delete(self, key: str) -> bool:
        return self.index.pop(key, None) is not None

    @ecall
    def keys(self) -> list[str]:
        return sorted(self.index)

    @ecall
    def stats(self) -> dict[str, int]:
        return {"keys": len(self.index), "heap_used": self.top, "puts": self.puts}

    @ecall
    def digest(self) -> str:
        """A digest of the whole store, to compare states without revealing them."""

        h = hashlib.sha256()
        for key in sorted(self.index):
            off, n = self.index[key]
            h.update(key.encode() + b"\0" + self.heap[off : off + n].tobytes() + b"\0")
        return h.hexdigest()

    @ecall
    def attest(self, nonce: bytes) -> bytes:
        """A quote binding the caller's nonce, for a remote verifier."""

        data = hashlib.sha512(b"kvstore-attest" + nonce).digest()
        return self.ctx.quote(data)

    @ecall
    def seal_value(self, key: str) -> bytes:
        value = self.get(key)
        if value is None:
            raise EnclaveError("no such key")
        return self.ctx.seal(value, aad=key.encode())

    @ecall
    def unseal_value(self, key: str, blob: bytes) -> int:
        return self.put(key, self.ctx.unseal(blob, aad=key.encode()))

    @ecall
    def log_event(self, text: str) -> None:
        self.ctx.ocall("log", f"enclave says: {text}")

    # --- migration ------------------------------------------------------------
    def export_state(self) -> Any:
        return {"index": self.index, "top": self.top, "puts": self.puts}

    def import_state(self, state: Any) -> None:
        self.index = {str(k): [int(v[0]), int(v[1])] for k, v in state["index"].items()}
        self.top = int(state["top"])
        self.puts = int(state["puts"])
