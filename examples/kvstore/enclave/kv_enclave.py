"""A key-value store whose values are secrets: they exist in plaintext only here.

Values live in a heap in enclave memory (bulk state); the index of keys to
heap offsets is small structured state.  Both move with a migration.

Values can be sealed two ways: ``seal_value`` binds the blob to this host
(platform sealing), ``seal_value_migratable`` to the store's persistent state,
which moves with the enclave (open it first with ``open_persistent``).  A
versioned migratable blob is bound to a counter per key, so a replayed older
blob of the key is refused, also after a migration.
"""

from __future__ import annotations

import hashlib
import threading
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
        # ECALLs run concurrently (one thread per calling thread, as with several TCSs):
        # the heap's top and the index change together or not at all.
        self._lock = threading.RLock()

    # --- ECALLs ---------------------------------------------------------------
    @ecall
    def put(self, key: str, value: bytes) -> int:
        if not isinstance(key, str) or not isinstance(value, bytes):
            raise EnclaveError("put takes a str key and a bytes value")
        with self._lock:
            start = self.top
            end = start + len(value)
            if end > HEAP_BYTES:
                raise EnclaveError("the store is full")
            self.heap[start:end] = np.frombuffer(value, dtype=np.uint8)
            self.index[key] = [start, len(value)]
            self.top = end
            self.puts += 1
            return len(self.index)

    @ecall
    def get(self, key: str) -> bytes | None:
        with self._lock:
            where = self.index.get(key)
            if where is None:
                return None
            off, n = where
            return self.heap[off : off + n].tobytes()

    @ecall
    def delete(self, key: str) -> bool:
        with self._lock:
            return self.index.pop(key, None) is not None

    @ecall
    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self.index)

    @ecall
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"keys": len(self.index), "heap_used": self.top, "puts": self.puts}

    @ecall
    def digest(self) -> str:
        """A digest of the whole store, to compare states without revealing them."""

        h = hashlib.sha256()
        with self._lock:
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

    # --- persistent state: it moves with the enclave ---------------------------
    @ecall
    def open_persistent(self, name: str) -> bool:
        """Open this store's persistent state on this host (True: created now)."""

        return bool(self.ctx.open_persistent(name))

    @ecall
    def seal_value_migratable(self, key: str, versioned: bool = False) -> bytes:
        value = self.get(key)
        if value is None:
            raise EnclaveError("no such key")
        counter = None
        if versioned:
            counter = _version_counter(key)
            if counter not in self.ctx.mcounter_names():
                self.ctx.mcounter_create(counter)
        return bytes(self.ctx.seal_migratable(value, aad=key.encode(), counter=counter))

    @ecall
    def unseal_value_migratable(self, key: str, blob: bytes) -> int:
        """Put a migratable blob's value back; a stale versioned blob is refused."""

        return self.put(key, self.ctx.unseal_migratable(blob, aad=key.encode()))

    @ecall
    def mcounter_create(self, name: str, initial: int = 0) -> int:
        return int(self.ctx.mcounter_create(name, initial))

    @ecall
    def mcounter_read(self, name: str) -> int:
        return int(self.ctx.mcounter_read(name))

    @ecall
    def mcounter_increment(self, name: str, by: int = 1) -> int:
        return int(self.ctx.mcounter_increment(name, by))

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


def _version_counter(key: str) -> str:
    """A counter name for any key (counter names are short and plain)."""

    return "v-" + hashlib.sha256(key.encode()).hexdigest()[:32]
