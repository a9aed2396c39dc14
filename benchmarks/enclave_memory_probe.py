"""Where a destination enclave's CPU goes per GiB it loads: first touch, copy, decrypt.

One process, no migration: the destination's load writes its fresh memory in
order, chunk by chunk (the private copy of a ring slot, then AES-GCM opened into
enclave memory).  Each figure is CPU seconds per GiB (``process_time``), min /
median / max over ``--repeat`` runs, the 4 KiB and the 2 MiB arm alternating
first run by run:

* ``populate_4k`` / ``populate_huge``: fresh enclave memory faulted in
  (``MADV_POPULATE_WRITE``, as the prefault ahead does), without and with
  ``EnclaveMemory.advise_huge``;
* ``load_4k`` / ``load_huge``: the load into fresh memory (copy + decrypt +
  first touch), without and with the advice;
* ``load_touched``: the same into memory already faulted in (copy + decrypt);
* ``copy_only``: the private copy of each chunk alone.

The machine's ``thp_fault_alloc``, ``thp_fault_fallback`` and ``compact_stall``
over each huge-page arm say whether huge pages came, and at what price.

    .venv/bin/python benchmarks/enclave_memory_probe.py --size 1GiB --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from migsgx._populate import thp_mode
from migsgx.enclave.memory import EnclaveMemory
from migsgx.lab.bench.figures import loadavg

_EVENTS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "pgfault")


def _vmstat() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name in _EVENTS:
                out[name] = int(value)
    return out


def _parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * factor
    return int(text)


class _Load:
    """The destination's load loop, as ``migrator_destination.load`` runs it."""

    def __init__(self, chunk: int) -> None:
        key = AESGCM.generate_key(bit_length=256)
        self.aead = AESGCM(key)
        self.nonce = os.urandom(12)
        self.chunk = chunk
        self.sealed = self.aead.encrypt(self.nonce, os.urandom(chunk), None)
        self.private = bytearray(len(self.sealed))

    def into(self, memory: EnclaveMemory, size: int, *, decrypt: bool = True) -> None:
        view = memory.view(0, size)
        private = memoryview(self.private)
        for pos in range(0, size, self.chunk):
            private[:] = self.sealed  # the private copy of the slot (against double fetch)
            if decrypt:
                self.aead.decrypt_into(self.nonce, private, None, view[pos : pos + self.chunk])
        view.release()


def _measure(fn: Callable[[], Any]) -> tuple[float, dict[str, int]]:
    ev0 = _vmstat()
    cpu0 = time.process_time()
    fn()
    cpu = time.process_time() - cpu0
    ev1 = _vmstat()
    return cpu, {k: ev1.get(k, 0) - ev0.get(k, 0) for k in _EVENTS}


def one_run(size: int, load: _Load, huge_first: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    order = [True, False] if huge_first else [False, True]
    gib = size / (1 << 30)
    for huge in order:
        tag = "huge" if huge else "4k"
        mem = EnclaveMemory(size)
        if huge:
            mem.advise_huge(size)
        cpu, ev = _measure(lambda m=mem: m.prefault(size, threading.Event()))
        out[f"populate_{tag}"] = cpu / gib
        out[f"populate_{tag}_events"] = ev
        mem.wipe()
        mem = EnclaveMemory(size)
        if huge:
            mem.advise_huge(size)
        cpu, ev = _measure(lambda m=mem: load.into(m, size))
        out[f"load_{tag}"] = cpu / gib
        out[f"load_{tag}_events"] = ev
        if not huge:
            cpu, _ = _measure(lambda m=mem: load.into(m, size))
            out["load_touched"] = cpu / gib
            cpu, _ = _measure(lambda m=mem: load.into(m, size, decrypt=False))
            out["copy_only"] = cpu / gib
        mem.wipe()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--chunk", default="1MiB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size, chunk = _parse_size(args.size), _parse_size(args.chunk)
    load = _Load(chunk)
    before = loadavg()
    runs = [one_run(size, load, huge_first=i % 2 == 1) for i in range(args.repeat)]
    figures = {}
    for name, value in runs[0].items():
        if isinstance(value, float):
            values = sorted(r[name] for r in runs)
            figures[name] = {
                "min": values[0], "median": statistics.median(values), "max": values[-1],
            }  # fmt: skip
    with open("/proc/uptime", encoding="ascii") as f:
        uptime = float(f.read().split()[0])
    print(json.dumps({
        "cpu_seconds_per_gib": figures,
        "runs": runs,
        "size": size,
        "chunk": chunk,
        "thp_mode": thp_mode(),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
        "uptime_seconds": uptime,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
