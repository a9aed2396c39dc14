#!/usr/bin/env python3
"""A storm of migrations, each under a random fault: what an attacker would try.

Two namespaced hosts with real CRIU (:class:`migsgx.lab.testbed.Testbed`); the
kvstore example moves back and forth between them, ``--count`` times or for
``--seconds``, whichever ends first.  Each migration draws one fault from its
seed (:mod:`migsgx.lab.storm_faults`: ``kill -9`` of a party or a network fault
of a connection at a named point, or none) and is judged by
:mod:`migsgx.lab.storm_checks`.  One JSON object per migration on stdout (seed,
fault, outcome, seconds, failures), per fault kind the seconds to the source's
return where it stayed (min / median / max), then ``storm-summary {...}``.  Exit
status 1 when any migration failed: a fault that did not fire, or a source back
later than ``--bound`` seconds, counts as a failure too.  Run as root from the checkout:

    .venv/bin/python benchmarks/storm.py --count 100 --seed 1
    .venv/bin/python benchmarks/storm.py --fault tool.after-commit:kill-source-enclave

``--fault SPEC`` (as printed) replays one migration's fault, ``--count`` times.
``--checkpoints``: rounds of ``migsgx checkpoint`` and ``migsgx restore`` of a plain
process instead, each under a fault of either (:mod:`migsgx.lab.storm_ckpt`).
``--keep-failed DIR`` keeps what a failed migration leaves to read: CRIU's and
runc's logs of its failed steps (``$MIGSGX_KEEP_LOGS``), the tool's output and
the agents' logs, in ``DIR/INDEX-SEED/``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from migsgx.lab.containers import ContainerLab
from migsgx.lab.netns import cleanup_stale, list_namespaces
from migsgx.lab.storm import Outcome, Storm, as_json, summary
from migsgx.lab.storm_ckpt import CheckpointStorm
from migsgx.lab.storm_ckpt import parse as parse_ckpt
from migsgx.lab.storm_faults import parse
from migsgx.lab.storm_outcome import back_lines
from migsgx.lab.testbed import Testbed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="migrations (default 20)")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault", default=None, help="this fault every time (a printed spec)")
    parser.add_argument(
        "--bound",
        type=float,
        default=5.0,
        help="seconds for the source to answer again where it did not move",
    )
    parser.add_argument(
        "--subnet", type=int, default=212, help="the subnet preferred (the first free one from it)"
    )
    parser.add_argument(
        "--engine",
        choices=("pid", "runc", "podman", "containerd"),
        default="pid",
        help="a plain process (default) or a container of that engine",
    )
    parser.add_argument(
        "--keep-failed",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep a failed migration's logs in DIR/INDEX-SEED/ (CRIU's and runc's logs "
        "of failed steps, the tool's output, the agents' logs)",
    )
    parser.add_argument(
        "--options",
        default="",
        help="more options of migsgx migrate for every migration, one string "
        "(e.g. '--live --post-copy', '--mode sequential', '--late-handshake')",
    )
    parser.add_argument(
        "--checkpoints",
        action="store_true",
        help="checkpoint and restore a plain process instead of migrating it",
    )
    args = parser.parse_args()
    if args.checkpoints and args.engine != "pid":
        parser.error("--checkpoints takes a plain process (--engine pid)")
    reader = parse_ckpt if args.checkpoints else parse
    fault = reader(args.fault) if args.fault else None
    outcomes: list[Outcome] = []
    t_end = time.monotonic() + args.seconds if args.seconds else float("inf")
    # SIGTERM ends the storm as Ctrl-C does: every host, process and namespace goes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Subreaper of the restored trees (as the tests are): a killed one is reaped here.
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    cleanup_stale()
    with tempfile.TemporaryDirectory(prefix="migsgx-storm-") as root:
        with Testbed(Path(root), subnet=args.subnet) as bed, contextlib.ExitStack() as stack:
            lab = stack.enter_context(ContainerLab(bed)) if args.engine != "pid" else None
            kind = CheckpointStorm if args.checkpoints else Storm
            storm = kind(bed, args.seed, bound=args.bound, lab=lab, engine=args.engine,
                         keep_failed=args.keep_failed,
                         options=shlex.split(args.options))  # fmt: skip
            for index in range(args.count):
                if time.monotonic() >= t_end:
                    break
                out = storm.one(index, fault)  # type: ignore[arg-type]
                outcomes.append(out)
                print(as_json(out), flush=True)
            namespaces = bed.net.name_prefix
        if args.keep_failed is not None:  # (the last migration's, which did not fail)
            shutil.rmtree(args.keep_failed / "pending", ignore_errors=True)
        left = [n for n in list_namespaces() if n.startswith(namespaces)]
    result = summary(outcomes)
    result["seed"], result["engine"] = args.seed, args.engine
    result["checkpoints"], result["options"] = args.checkpoints, args.options
    result["namespaces_left"] = left
    for line in back_lines(result):
        print(line, flush=True)
    print("storm-summary " + json.dumps(result, sort_keys=True), flush=True)
    return 1 if result["failed"] or left else 0


if __name__ == "__main__":
    sys.exit(main())
