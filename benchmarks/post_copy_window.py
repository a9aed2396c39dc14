#!/usr/bin/env python3
"""Measure post-copy of process pages (CRIU lazy pages in TLS) between two netns hosts.

A process holding SIZE of random memory (in a pid namespace of its own) moves
from host A to host B with ``migsgx.containers.postcopy``; the images are copied at
``post-dump`` as the agents would stream them.  Per run it reports:

``frozen_seconds``  from the dump's start until the restored tree runs (what
                    the process pays; its memory does not travel in it);
``window_seconds``  from the tree running until the last page arrived: the
                    time in which a source failure loses the application;
``image_bytes``     what moved while frozen; ``served_bytes`` the page data.

Medians with min/max over ``--repeat`` runs (>= 3), as one JSON object.
Run as root from the checkout (``.venv/bin/python benchmarks/post_copy_window.py``).

    post_copy_window.py --sizes 64M,256M --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from migsgx.agent.tls import issue_agent_identity
from migsgx.containers.postcopy import PostCopyRestore, lazy_dump, served_port
from migsgx.criu import Criu, InNetns, InTaskNamespaces
from migsgx.lab.netns import HostNetwork
from migsgx.sgx.ca import ProvisioningCA
from migsgx.system.process import kill_tree, tree_pids

HOLDER = """
import os, sys, time
blob = bytearray(os.urandom(int(sys.argv[2])))
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(3600)
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def one_run(criu: Criu, net: HostNetwork, size: int, root: Path, ca_dir: Path) -> dict[str, Any]:
    src, dst = net["pcs"], net["pcd"]
    src_id = issue_agent_identity(ca_dir, root / "a", "src", [src.address])
    dst_id = issue_agent_identity(ca_dir, root / "b", "dst", [dst.address])
    ready = root / "ready"
    launcher = src.spawn(
        ["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", HOLDER, str(ready),
         str(size)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while not ready.exists():
        if launcher.poll() is not None:
            raise SystemExit("holder did not start")
        time.sleep(0.02)
    pid = tree_pids(launcher.pid)[1]
    src_dir, dst_dir = root / "src-images", root / "dst-images"
    src_dir.mkdir()
    images_ready = threading.Event()
    failure: list[BaseException] = []

    def notify(script: str, _pid: int) -> None:
        if script == "post-dump":
            shutil.copytree(src_dir, dst_dir)
            images_ready.set()

    def work() -> None:
        try:
            lazy_dump(
                criu, pid, src_dir, tls=(src_id.ca, src_id.cert, src_id.key), notify=notify,
                enter=InTaskNamespaces(pid),
            )  # fmt: skip
        except BaseException as exc:
            failure.append(exc)
        finally:
            images_ready.set()

    t0 = time.monotonic()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    images_ready.wait()
    if failure:
        raise failure[0]
    port = served_port(src_dir, timeout=60, alive=thread.is_alive)
    post = PostCopyRestore(
        criu, dst_dir, (src.address, port), tls=(dst_id.ca, dst_id.cert, dst_id.key),
        enter=InNetns(dst.netns),
    )  # fmt: skip
    try:
        new_pid = post.restore()
        running = time.monotonic()
        report = post.wait(600)
    finally:
        post.close()
    thread.join(60)
    kill_tree(new_pid)
    launcher.wait(10)
    image_bytes = sum(p.stat().st_size for p in dst_dir.iterdir() if p.is_file())
    return {
        "frozen_seconds": running - t0,
        "window_seconds": report.window_seconds,
        "restore_seconds": report.restore_seconds,
        "image_bytes": image_bytes,
        "served_bytes": size,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {
            "min": min(values),
            "median": statistics.median(values),
            "max": max(values),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64M,256M")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.repeat < 3:
        ap.error("--repeat must be at least 3")
    criu = Criu()
    result: dict[str, Any] = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "repeat": args.repeat,
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="migsgx-pc-") as tmp:
        base = Path(tmp)
        ProvisioningCA.init(base / "ca")
        net = HostNetwork(("pcs", "pcd"), subnet=77)
        net.create()
        try:
            for text in args.sizes.split(","):
                runs = []
                for i in range(args.repeat):
                    root = base / f"{text}-{i}"
                    root.mkdir()
                    runs.append(one_run(criu, net, parse_size(text), root, base / "ca"))
                result["sizes"][text] = {**summarise(runs), "runs": runs}
        finally:
            net.close()
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
