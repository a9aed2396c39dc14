#!/usr/bin/env python3
"""Two faults in one migration, each pair judged by the storm's checks.

``benchmarks/storm.py`` draws one fault per migration; here each migration
carries a pair: the tool's ``MIGSGX_FAULT`` (several points joined by commas:
the guardian inherits the tool's environment, so ``guardian.abort-answered:kill``
kills the guardian once its first abort was answered) and the destination
agent's.  The hosts, the supervisor's restarts, the one ``migsgx recover`` per
host and the checks are the storm's (:mod:`migsgx.lab.storm`).  One JSON object
per migration, the seconds to the source's return per fault kind, then
``pairs-summary {...}``; exit status 1 when any failed (a point of a pair that did not
fire, or a source back past the storm's bound, included).
Run as root from the checkout:

    .venv/bin/python benchmarks/storm_pairs.py            # every pair
    .venv/bin/python benchmarks/storm_pairs.py 0 3        # pairs 0 and 3
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from migsgx.lab.netns import cleanup_stale, list_namespaces
from migsgx.lab.storm import Storm, as_json, summary
from migsgx.lab.storm_faults import Fault
from migsgx.lab.storm_outcome import back_lines
from migsgx.lab.testbed import Testbed


@dataclass(frozen=True)
class Pair(Fault):
    """A fault of the tool (points joined by commas) and one of the destination agent.

    ``lose``: why no copy may be left (the storm's :attr:`Fault.may_lose`), ``""``
    where exactly one must run; ``kills_tool``: the tool dies by SIGKILL.
    """

    lose: str = ""
    tool_killed: bool = False

    @property
    def kind(self) -> str:
        return "pair"

    @property
    def kills_tool(self) -> bool:
        return self.tool_killed

    @property
    def may_lose(self) -> str:
        return self.lose


_W3 = "the destination enclave held the only copy"

PAIRS = (
    # The guardian killed while it waits for the source platform service (the group
    # joined, nothing decided): the enclave must stay frozen for ``recover``.
    Pair(
        "tool.after-group:kill-source-platform-and-tool,guardian.abort-answered:kill",
        tool_killed=True,
    ),
    Pair(
        "tool.abort-answered:kill-guardian-and-tool", "agent.after-restore:kill", tool_killed=True
    ),
    Pair("tool.after-commit:kill-guardian", "agent.before-claim:kill"),
    Pair(
        "tool.after-commit:kill-guardian-and-tool",
        "agent.before-claim:kill-enclave",
        tool_killed=True,
    ),
    # (Where the destination's fault comes first, the tool's is one of its roll-back:
    # a point after the commit's, or the tool's ``resume``, is never reached then.)
    Pair("tool.abort-answered:kill-source-platform", "agent.after-restore:kill"),
    Pair(
        "tool.after-commit:kill-source-platform-and-tool",
        "agent.after-claim:kill-platform",
        tool_killed=True,
    ),
    Pair("tool.after-commit:kill,guardian.retry:kill", "agent.before-claim:kill", tool_killed=True),
    Pair("tool.after-abort:kill", "agent.after-restore:kill-enclave", tool_killed=True),
    Pair(
        "tool.after-abort:kill,guardian.handed-back:kill",
        "agent.after-restore:stall",
        tool_killed=True,
    ),
    Pair(
        "tool.rolled-back:kill-source-platform-and-tool",
        "agent.after-restore:kill",
        tool_killed=True,
    ),
    Pair("tool.after-commit:drop-data", "agent.before-claim:kill-platform"),
    Pair("tool.before-token:kill-source-platform", "agent.before-resume:kill", lose=_W3),
    Pair(
        "tool.after-abort:kill,guardian.abort-answered:kill",
        "agent.after-restore:kill",
        tool_killed=True,
    ),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="*", type=int, help="indices of PAIRS (default: all)")
    parser.add_argument("--subnet", type=int, default=230)
    parser.add_argument("--keep-failed", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    wanted = args.pairs or list(range(len(PAIRS)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    cleanup_stale()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="migsgx-pairs-") as root:
        with Testbed(Path(root), subnet=args.subnet) as bed:
            storm = Storm(bed, 0, keep_failed=args.keep_failed, engine="pid")
            for index in wanted:
                out = storm.one(index, PAIRS[index])
                outcomes.append(out)
                print(as_json(out), flush=True)
            with contextlib.suppress(Exception):
                storm.target.remove()
            prefix = bed.net.name_prefix
        left = [n for n in list_namespaces() if n.startswith(prefix)]
    result = summary(outcomes)
    result["namespaces_left"] = left
    for line in back_lines(result):
        print(line, flush=True)
    print("pairs-summary " + json.dumps(result, sort_keys=True), flush=True)
    return 1 if result["failed"] or left else 0


if __name__ == "__main__":
    sys.exit(main())
