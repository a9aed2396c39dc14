"""A numeric workload: a model whose weights are a secret.

The weights (float32, ``rows x cols``, any size up to the enclave's memory)
live in enclave memory; the application only ever sees predictions.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from migsgx.enclave import Enclave, EnclaveError, ecall


class SecretModel(Enclave):
    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.shape: tuple[int, int] | None = None
        self.served = 0

    def _weights(self) -> Any:
        if self.shape is None:
            raise EnclaveError("no model loaded")
        return self.ctx.memory.get("weights")

    @ecall
    def generate(self, rows: int, cols: int, seed: int) -> str:
        """Make secret weights inside the enclave; returns their digest."""

        if self.shape is not None:
            raise EnclaveError("a model is already loaded")
        w = self.ctx.memory.array("weights", (rows, cols), np.float32)
        rng = np.random.default_rng(seed)
        step = max(1, (16 << 20) // max(1, cols * 4))
        for r in range(0, rows, step):
            w[r : r + step] = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        self.shape = (rows, cols)
        return self.digest()

    @ecall
    def load_weights(self, rows: int, cols: int, data: bytes) -> str:
        if self.shape is not None:
            raise EnclaveError("a model is already loaded")
        w = self.ctx.memory.array("weights", (rows, cols), np.float32)
        w[:] = np.frombuffer(data, dtype=np.float32).reshape(rows, cols)
        self.shape = (rows, cols)
        return self.digest()

    @ecall
    def predict(self, x: list[float]) -> list[float]:
        w = self._weights()
        v = np.asarray(x, dtype=np.float32)
        if v.shape != (w.shape[1],):
            raise EnclaveError(f"input must have {w.shape[1]} values")
        self.served += 1
        return [float(y) for y in (w @ v)[:16]]

    @ecall
    def scribble(self, pages: int, seed: int) -> int:
        """Change one value in each of ``pages`` random 4 KiB pages of the weights.

        A workload that dirties enclave memory at a rate the caller sets: what
        ``migsgx bench live`` runs while the enclave migrates.
        """

        flat = self._weights().reshape(-1)
        per_page = 4096 // flat.itemsize
        rng = np.random.default_rng(seed)
        where = rng.integers(0, max(1, flat.size // per_page), size=pages) * per_page
        flat[where] += np.float32(1.0)
        self.served += 1
        return pages

    @ecall
    def digest(self) -> str:
        h = hashlib.sha256()
        w = self._weights()
        flat = w.reshape(-1).view(np.uint8)
        for off in range(0, flat.size, 64 << 20):
            h.update(flat[off : off + (64 << 20)].data)
        return h.hexdigest()

    @ecall
    def info(self) -> dict[str, Any]:
        return {"shape": list(self.shape or (0, 0)), "served": self.served}

    def export_state(self) -> Any:
        return {"shape": list(self.shape) if self.shape else None, "served": self.served}

    def import_state(self, state: Any) -> None:
        shape = state["shape"]
        self.shape = (int(shape[0]), int(shape[1])) if shape else None
        self.served = int(state["served"])
