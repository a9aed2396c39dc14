#!/usr/bin/env python3
"""How long ``migsgx recover`` takes to start; print JSON (min/median/max).

``recover`` runs in the cells of the fault matrix that need it, by hand after
a crash, and from the guardian's path: its own start-up counts toward the
seconds until the source runs again.  Three figures, each over ``--runs`` fresh
interpreters (alternating, so that load from elsewhere hits all alike):

* ``interpreter_ms``: ``python -c pass``, the floor;
* ``recover_ms``: ``python -m migsgx recover --state EMPTY --json`` with nothing in
  doubt (a state directory with no journal), wall time to its exit;
* ``import_ms``: what ``python -X importtime -m migsgx recover --help`` reports for
  ``migsgx.cli`` (cumulative), and the slowest top-level imports of the last run.

Each figure is taken twice: without a bytecode cache (``PYTHONDONTWRITEBYTECODE=1``
and no ``.pyc`` of migsgx's own modules: every one is compiled at each start, as
on a machine whose environment sets that variable) and with one
(``PYTHONPYCACHEPREFIX``, a fresh directory filled by a warm-up run).
``--baseline SRC`` measures another tree's ``src`` directory (an older revision,
``git archive REV src | tar -x -C DIR``) in the same rounds, alternating.

Example::

    .venv/bin/python benchmarks/recover_startup.py --runs 7 --baseline /tmp/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)")


def summary(values: list[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "min": round(min(values), 1),
        "median": round(statistics.median(values), 1),
        "max": round(max(values), 1),
    }


def _wall_ms(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, env=env)
    return (time.perf_counter() - t0) * 1000


def _imports(python: str, env: dict[str, str]) -> tuple[float, list[tuple[str, float]]]:
    """``migsgx.cli``'s cumulative import time (ms), and every module imported under it
    directly (the first level below it) with its own cumulative time."""

    out = subprocess.run(
        [python, "-X", "importtime", "-m", "migsgx", "recover", "--help"],
        check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    total = 0.0
    children: list[tuple[str, float]] = []
    for line in out.stderr.splitlines():
        found = _LINE.match(line)
        if found is None:
            continue
        cumulative, depth, name = int(found[2]) / 1000, len(found[3]) // 2, found[4]
        if depth == 0 and name == "migsgx.cli":
            total = cumulative
        elif depth == 1:
            children.append((name, cumulative))
    return total, sorted(children, key=lambda c: -c[1])[:8]


def _env(src: str | None, cache: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPYCACHEPREFIX", None)
    if src is not None:
        env["PYTHONPATH"] = src  # (ahead of the editable install's path)
    if cache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="per figure (>= 5)")
    parser.add_argument("--baseline", type=Path, default=None, help="another tree's src")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    python = sys.executable
    here = str(Path(__file__).resolve().parents[1] / "src")
    trees = {"this": here, **({"baseline": str(args.baseline)} if args.baseline else {})}
    out: dict[str, object] = {"benchmark": "recover_startup"}
    with tempfile.TemporaryDirectory(prefix="migsgx-recover-bench-") as tmp:
        state = Path(tmp) / "state"
        (state / "agent").mkdir(mode=0o700, parents=True)
        recover = [python, "-m", "migsgx", "recover", "--state", str(state), "--json"]
        envs = {
            (tree, mode): _env(src, None if mode == "no_bytecode_cache" else Path(tmp) / tree)
            for tree, src in trees.items()
            for mode in ("no_bytecode_cache", "bytecode_cache")
        }
        times: dict[tuple[str, str], dict[str, list[float]]] = {
            key: {"interpreter_ms": [], "recover_ms": [], "import_ms": []} for key in envs
        }
        slowest: dict[tuple[str, str], list[tuple[str, float]]] = {}
        for env in envs.values():
            _wall_ms(recover, env)  # warm-up (the page cache, the bytecode cache)
        for _ in range(args.runs):
            for key, env in envs.items():
                times[key]["interpreter_ms"].append(_wall_ms([python, "-c", "pass"], env))
                times[key]["recover_ms"].append(_wall_ms(recover, env))
                total, slowest[key] = _imports(python, env)
                times[key]["import_ms"].append(total)
    for (tree, mode), figures in times.items():
        entry = out.setdefault(tree, {})
        assert isinstance(entry, dict)
        entry[mode] = {
            **{name: summary(values) for name, values in figures.items()},
            "slowest_imports_under_cli_ms": {n: round(ms, 1) for n, ms in slowest[(tree, mode)]},
        }
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    out["cpus"] = os.cpu_count()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
