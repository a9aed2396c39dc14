#!/usr/bin/env python3
"""Measure the emulated platform's ECALL round trip and enclave launch; print JSON.

A fresh deployment (CA, one host, author key) in a temporary directory, a real
platform service process, and the example key-value enclave:

* ``ecall_rtt_us``: one thread calling ``get`` (16-byte value) ``--calls`` times,
  after ``--warmup`` calls; mean, p50, p90, p99 and max in microseconds.
* ``launch_ms``: ``EnclaveClient.launch`` until the enclave is ready (image sent,
  EINIT, enclave process started and its code imported), ``--launches`` times,
  each enclave destroyed before the next; mean, min and max in milliseconds.

Example::

    .venv/bin/python benchmarks/platform_probe.py --calls 2000 --launches 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from migsgx.host.client import EnclaveClient
from migsgx.lab.hosts import Deployment, start_service


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""

    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def measure(calls: int, warmup: int, launches: int, example: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="migsgx-probe-") as tmp:
        dep = Deployment.create(Path(tmp), n_hosts=1)
        image = dep.signed_image(example)
        service = start_service(dep.hosts[0])
        try:
            launch_s = []
            for _ in range(launches):
                t0 = time.perf_counter()
                client = EnclaveClient.launch(image, socket_path=service.socket)
                launch_s.append(time.perf_counter() - t0)
                client.destroy()

            with EnclaveClient.launch(image, socket_path=service.socket) as client:
                client.ecall.put("k", b"0123456789abcdef")
                for _ in range(warmup):
                    client.ecall.get("k")
                rtt = []
                for _ in range(calls):
                    t0 = time.perf_counter_ns()
                    client.ecall.get("k")
                    rtt.append((time.perf_counter_ns() - t0) / 1000)
        finally:
            service.stop()
    rtt.sort()
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "enclave": example,
        "ecall_rtt_us": {
            "calls": calls,
            "mean": round(statistics.fmean(rtt), 1),
            "p50": round(percentile(rtt, 50), 1),
            "p90": round(percentile(rtt, 90), 1),
            "p99": round(percentile(rtt, 99), 1),
            "max": round(rtt[-1], 1),
        },
        "launch_ms": {
            "launches": launches,
            "mean": round(statistics.fmean(launch_s) * 1000, 1),
            "min": round(min(launch_s) * 1000, 1),
            "max": round(max(launch_s) * 1000, 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--launches", type=int, default=10)
    parser.add_argument("--example", default="kvstore")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.launches < 1:
        parser.error("--calls and --launches must be at least 1")
    result = measure(args.calls, args.warmup, args.launches, args.example)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
