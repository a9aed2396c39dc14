#!/usr/bin/env python3
"""Where the process page path's CPU goes, step by step; print JSON (min/median/max).

One arm moves a plain process holding SIZE of ordinary memory with CRIU on one
machine, over loopback TCP, and takes each step's CPU seconds apart:

* ``dump``: ``criu dump`` (its parasite splices the pages into the page socket);
* ``relay_out``: the source's :class:`~migsgx.datapath.pagerelay.PageRelay`
  (the whole source process but CRIU: one thread per direction, the main thread
  waits), reading CRIU's socket, sealing, writing TCP;
* ``relay_in``: the destination's relay, in a process of its own: reading TCP,
  opening, writing the page server's socket;
* ``page_server``: ``criu page-server`` writing the images;
* ``restore``: ``criu restore`` itself, and ``restore_task``: the restored task's
  own CPU, where CRIU's restorer reads the pages image into fresh memory (the
  first touch of that memory included).

Arms: ``relay`` (the production path) and ``plain`` (CRIU alone: its page server
on the TCP connection, no relay), each with the restore spending the images
(``auto_dedup``, as the agent restores) or not.  ``--baseline SRC`` runs the
relay arm of another tree's ``src`` too (an older revision: ``git archive REV src
| tar -x -C DIR``, and copy ``src/migsgx/criu/_generated`` into it), alternating
arm order round by round.  Needs root (CRIU).

Example::

    .venv/bin/python benchmarks/page_path_probe.py --size 1GiB --runs 3 --baseline /tmp/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SRC = HERE.parent.parent / "src"

PLAIN = """
import os, sys, time
import numpy as np
mib, ready = int(sys.argv[1]), sys.argv[2]
block = np.random.default_rng(3).integers(0, 256, size=1 << 20, dtype=np.uint8)
memory = np.empty((mib, 1 << 20), dtype=np.uint8)
for i in range(mib):
    memory[i] = block
    memory[i, :8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
open(ready, "w").close()
while True:
    time.sleep(1)
"""


def _children() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def _task_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, mult in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def destination(mode: str, images: Path, key: str, sid: str) -> None:
    """The destination's half: accept one connection, page server (behind a relay)."""

    from migsgx.criu import find_criu
    from migsgx.criu.pageserver import PageServer

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    cpu0, kids0, t0 = time.process_time(), _children(), time.monotonic()
    relay = None
    if mode == "relay":
        from migsgx.datapath.pagerelay import PageRelay, local_pair, relay_keys

        ours, theirs = local_pair()
        with theirs:
            server = PageServer(find_criu(), images, theirs)
        keys = relay_keys(bytes.fromhex(key), bytes.fromhex(sid), source=False)
        relay = PageRelay(ours, conn, **keys).start()
    else:
        with conn:
            server = PageServer(find_criu(), images, conn)
    server.wait(600)
    if relay is not None:
        relay.finish(60)
    counts = {k: getattr(relay, k) for k in ("frames_in", "wire_receives") if hasattr(relay, k)}
    out = {
        **counts,
        "relay_in": time.process_time() - cpu0,
        "page_server": _children() - kids0,
        "page_server_seconds": time.monotonic() - t0,
    }
    print(json.dumps(out), flush=True)


def one(mode: str, size: int, root: Path, spend: bool, frame: int = 0) -> dict[str, Any]:
    """One arm: dump through ``mode`` to a page server, copy, restore; CPU per step."""

    from migsgx.criu import Criu, InTaskNamespaces

    criu = Criu()
    here = Path(tempfile.mkdtemp(prefix="page-probe-", dir=root))
    images, dump_dir, ready = here / "images", here / "dump", here / "ready"
    images.mkdir()
    dump_dir.mkdir()
    launcher = subprocess.Popen(
        ["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", PLAIN,
         str(size >> 20), str(ready)],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    restored = 0
    try:
        while not ready.exists():
            if launcher.poll() is not None:
                raise SystemExit("the plain process did not start")
            time.sleep(0.02)
        kids = [int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
                .read_text().split()]  # fmt: skip
        pid = kids[0]
        key, sid = secrets.token_hex(32), secrets.token_hex(16)
        env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(SRC))}
        dst = subprocess.Popen(
            [sys.executable, str(HERE), "--destination", mode, "--images", str(images),
             "--key", key, "--sid", sid],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert dst.stdout is not None
        port = int(dst.stdout.readline())
        enter = InTaskNamespaces(pid)
        counts: dict[str, int] = {}
        cpu0, kids0, t0 = time.process_time(), _children(), time.monotonic()
        if mode == "relay":
            from migsgx.datapath.pagerelay import PageRelay, local_pair, relay_keys

            wire = socket.create_connection(("127.0.0.1", port))
            ours, theirs = local_pair()
            keys = relay_keys(bytes.fromhex(key), bytes.fromhex(sid), source=True)
            framed = {"frame_bytes": frame} if frame else {}
            relay = PageRelay(ours, wire, **keys, **framed).start()
            criu.dump(pid, dump_dir, page_fd=theirs.detach(), enter=enter)
            relay.finish(60)
            counts = {
                k: getattr(relay, k) for k in ("frames_out", "local_receives") if hasattr(relay, k)
            }
        else:
            criu.dump(pid, dump_dir, page_server=("127.0.0.1", port), enter=enter)
        dump_cpu = _children() - kids0
        relay_out = time.process_time() - cpu0
        dump_seconds = time.monotonic() - t0
        dest = json.loads(dst.stdout.readline())
        counts.update((k, v) for k, v in dest.items() if isinstance(v, int))
        dst.wait(30)
        for path in dump_dir.iterdir():
            if path.name != "dump.log":
                shutil.copyfile(path, images / path.name)
        launcher.wait(30)
        kids0, t0 = _children(), time.monotonic()
        extra = {"auto_dedup": True} if spend else {}
        restored = criu.restore(images, log_file="restore.log", extra=extra)
        restore_seconds = time.monotonic() - t0
        return {
            "mode": mode,
            "spend": spend,
            "frame": frame,
            "dump": dump_cpu,
            "relay_out": relay_out,
            "relay_in": dest["relay_in"],
            "page_server": dest["page_server"],
            "restore": _children() - kids0,
            "restore_task": _task_cpu(restored),
            "dump_seconds": dump_seconds,
            "restore_seconds": restore_seconds,
            **counts,
        }
    finally:
        if restored:
            subprocess.run(["kill", "-9", str(restored)], check=False)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        shutil.rmtree(here, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--root", default="/tmp", help="where the images go (ext4 here)")
    parser.add_argument(
        "--arms",
        default="relay,plain",
        help="comma-separated: relay, plain, relay-whole, plain-whole; relay@1MiB: "
        "the source's frames of at most 1 MiB",
    )
    parser.add_argument("--baseline", help="another tree's src: its relay arm too")
    parser.add_argument("--destination", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--sid", help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.destination:
        destination(args.destination, Path(args.images), args.key, args.sid)
        return
    size = _size(args.size)
    if args.one:
        arm, _, frame = args.one.partition("@")
        mode, _, whole = arm.partition("-")
        got = one(mode, size, Path(args.root), spend=whole != "whole",
                  frame=_size(frame) if frame else 0)  # fmt: skip
        print(json.dumps(got))
        return
    arms = [(a, str(SRC)) for a in args.arms.split(",")]
    if args.baseline:
        arms.append(("relay", str(Path(args.baseline).resolve())))
    rows: dict[str, list[dict[str, Any]]] = {}
    load0 = os.getloadavg()
    for r in range(args.runs):
        order = arms if r % 2 == 0 else arms[::-1]
        for arm, src in order:
            name = arm if src == str(SRC) else f"{arm}@baseline"
            env = {**os.environ, "PYTHONPATH": src}
            for _attempt in range(2):  # (one retry: a pid still taken, a slow start)
                out = subprocess.run(
                    [sys.executable, str(HERE), "--one", arm, "--size", args.size,
                     "--root", args.root],
                    capture_output=True, text=True, env=env,
                )  # fmt: skip
                if out.returncode == 0:
                    break
                print(f"{name}: {out.stderr[-800:]}", file=sys.stderr)
            else:
                raise SystemExit(f"{name} failed twice")
            rows.setdefault(name, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    gib = size / (1 << 30)
    result: dict[str, Any] = {"size": size, "runs": args.runs, "loadavg_before": load0,
                              "loadavg_after": os.getloadavg(), "arms": {}}  # fmt: skip
    for name, got in rows.items():
        keys = [k for k in got[0] if isinstance(got[0][k], float)]
        result["arms"][name] = {
            k: {"min": round(min(g[k] for g in got) / gib, 3),
                "median": round(statistics.median(g[k] for g in got) / gib, 3),
                "max": round(max(g[k] for g in got) / gib, 3)}
            for k in keys
        }  # fmt: skip
        result["arms"][name]["every_run"] = got
    result["unit"] = "seconds per GiB (CPU, or wall for *_seconds)"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
