"""``migsgx bench live --pid``: the same workload moved as a process, pre-copy then post-copy.

``migsgx migrate PID --live`` is what a user runs: the enclave's memory moves
by pre-copy rounds while the application runs, and the process's own memory
by CRIU's post-copy (lazy pages) after the destination resumed.  This column
runs it on two namespaced hosts (:class:`~migsgx.lab.testbed.Testbed`, real
CRIU, root needed): the example ``model`` app holding SIZE of enclave memory
and :data:`ORDINARY_MIB` of ordinary memory, its own thread changing RATE
bytes of random enclave pages per second through ECALLs while it moves.  Per
run, from ``migrate --json``:

* ``downtime_seconds``: the application's freeze to its resumption;
* ``post_copy_window_seconds``: from the destination tree's start to its last
  page, the time in which the destination still depends on the source (a
  source lost then loses the application: ``post-copy-source-lost``);
* ``total_seconds``, ``bytes_sent``, ``rounds``, ``stop_rule``;
* ``scribbles_after``: the app's writer calls counted on the destination a
  moment after the move (the writer, and so the enclave, runs there).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ...errors import MigSGXError
from ...system.process import kill_tree
from ..testbed import Testbed
from .figures import loadavg
from .process import start_model

__all__ = ["FIGURES", "ORDINARY_MIB", "run_pid"]

ORDINARY_MIB = 256
SUBNET = 205
FIGURES = (
    "downtime_seconds",
    "post_copy_window_seconds",
    "total_seconds",
    "bytes_sent",
    "rounds",
)


def _info(bed: Testbed, port: int, at: str, via: str) -> dict[str, Any]:
    reply = bed.ask("INFO", port, at=at, via=via)
    if not reply.startswith("INFO "):
        raise MigSGXError(f"the model app answered {reply!r}")
    info: dict[str, Any] = json.loads(reply[5:])
    return info


def one_run(bed: Testbed, size: int, rate: int) -> dict[str, Any]:
    """One ``migrate --live`` of the model app under its writer; the app is gone after."""

    agent = bed.start_agent()
    try:
        app = start_model(bed, size, ORDINARY_MIB, "--dirty-rate", str(rate))
        time.sleep(0.5)  # the writer runs before the move
        run = bed.migrate(app.pid, agent, args=("--live",))
        if run.returncode != 0 or run.stats is None:
            raise MigSGXError(f"migsgx migrate --live failed ({run.returncode}): "
                              f"{run.stderr[-2000:]}")  # fmt: skip
        stats = run.stats
        first = _info(bed, app.port, at="dst", via="src")
        time.sleep(0.3)
        second = _info(bed, app.port, at="dst", via="src")
        kill_tree(int(stats["details"]["restored_pid"]))
    finally:
        agent.stop()
    enclave = (stats["details"].get("enclave_stats") or [{}])[0]
    window = stats.get("post_copy_window")
    return {
        "downtime_seconds": float(stats["downtime"]),
        "post_copy_window_seconds": None if window is None else float(window),
        "total_seconds": float(stats["total"]),
        "bytes_sent": int(stats["bytes"]),
        "rounds": len(enclave.get("rounds") or []),
        "stop_rule": enclave.get("stop_rule"),
        # The writer runs on at the destination (its count grows).
        "scribbles_after": [int(first["scribbled"]), int(second["scribbled"])],
        "loadavg": loadavg(),
    }


def run_pid(size: int, rate: int, repeat: int, *, keep: Path | None = None) -> list[dict[str, Any]]:
    """``repeat`` runs on one testbed; the caller summarizes them beside the other modes."""

    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="migsgx-bench-live-pid-"))
    runs = []
    try:
        with Testbed(root, subnet=SUBNET) as bed:
            for _ in range(repeat):
                runs.append(one_run(bed, size, rate))
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return runs
