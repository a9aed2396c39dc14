#!/usr/bin/env python3
"""Enclave launch time with and without the sandbox; print JSON (min/median/max).

A fresh deployment (CA, one host, author key), the example key-value enclave,
and two real platform service processes on the same host state: one started
with ``--no-sandbox`` (the enclave runs as the service's user, the old mode),
one with the default sandbox (launcher, namespaces, read-only root, uid change,
seccomp).  ``launch_ms`` is ``EnclaveClient.launch`` until the enclave is ready,
each enclave destroyed before the next; the two modes alternate so that load
from elsewhere on the machine hits both alike.  Needs root.

Example::

    .venv/bin/python benchmarks/sandbox_launch.py --launches 10
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


def summary(values: list[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "min": round(min(values), 1),
        "median": round(statistics.median(values), 1),
        "max": round(max(values), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launches", type=int, default=10, help="per mode (>= 3)")
    parser.add_argument("--example", default="kvstore")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the sandbox needs root", file=sys.stderr)
        return 2
    if args.launches < 3:
        parser.error("--launches must be at least 3")
    with tempfile.TemporaryDirectory(prefix="migsgx-sandbox-bench-") as tmp:
        dep = Deployment.create(Path(tmp), n_hosts=1)
        image = dep.signed_image(args.example)
        services = {
            "no_sandbox": start_service(
                dep.hosts[0], socket_path=Path(tmp) / "plain.sock", extra_args=["--no-sandbox"]
            ),
            "sandbox": start_service(dep.hosts[0], socket_path=Path(tmp) / "sandbox.sock"),
        }
        times: dict[str, list[float]] = {mode: [] for mode in services}
        try:
            for svc in services.values():  # one warm-up each, not counted
                EnclaveClient.launch(image, socket_path=svc.socket).destroy()
            for _ in range(args.launches):
                for mode, svc in services.items():
                    t0 = time.perf_counter()
                    client = EnclaveClient.launch(image, socket_path=svc.socket)
                    times[mode].append((time.perf_counter() - t0) * 1000)
                    client.destroy()
        finally:
            for svc in services.values():
                svc.stop()
    out = {
        "benchmark": "sandbox_launch",
        "example": args.example,
        "launch_ms": {mode: summary(values) for mode, values in times.items()},
        "overhead_ms_median": round(
            statistics.median(times["sandbox"]) - statistics.median(times["no_sandbox"]), 1
        ),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(), "loadavg_1m": os.getloadavg()[0]},
    }  # fmt: skip
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
