#!/usr/bin/env python3
"""How long each process migsgx starts takes to import its code; print JSON (min/median/max).

Every migration, and every cell of the integration suite, starts fresh
interpreters: platform services, the sandbox launcher and the enclave runtime it
execs, agents, the tool and its guardian, ``recover``, the applications.  Each
imports its part of migsgx before it does anything.  For each of them (``ENTRIES``:
the modules the process imports on its way to work, as its entry point imports
them), the wall time of ``python -c "import MODULES"`` to its exit, over
``--runs`` rounds, in two arms per tree:

* ``no_bytecode_cache``: a copy of the tree's ``src`` without ``__pycache__``,
  ``PYTHONDONTWRITEBYTECODE=1`` (as on these machines): every module compiled at
  every start;
* ``compiled``: a copy compiled as ``scripts/setup.sh`` does it
  (``compileall --invalidation-mode timestamp``), ``PYTHONDONTWRITEBYTECODE=1`` too.

``--baseline SRC`` adds another tree's ``src`` (an older revision: ``git archive
REV src | tar -x -C DIR``; CRIU's generated module is copied in from this tree).
Every arm of every tree is run once per entry per round, in turn, so that load
from elsewhere hits all alike; ``python -c pass`` is the floor.  Once per tree
and entry it also records how many migsgx modules the process imported and
which heavy libraries came with them.

Example::

    .venv/bin/python benchmarks/process_startup.py --runs 5 --baseline /tmp/main/src
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Each process and the modules its entry point imports before it works.
ENTRIES: dict[str, list[str]] = {
    "enclave_runtime": ["migsgx.enclave.runtime"],
    "sandbox_launcher": ["migsgx.sgx.launcher"],
    "platform_service": ["migsgx.cli", "migsgx.sgx.platform", "migsgx.sgx.service"],
    "agent": [
        "migsgx.cli", "migsgx.agent.server", "migsgx.agent.tls", "migsgx.containers",
        "migsgx.sgx.listener", "migsgx.sgx.spawn",
    ],
    "tool_migrate": [
        "migsgx.cli", "rich.console", "migsgx.agent.postcopy_choice", "migsgx.agent.source",
        "migsgx.agent.tls", "migsgx.containers",
    ],
    "guardian": ["migsgx.agent.guardian"],
    "recover": ["migsgx.cli", "migsgx.agent.recover", "migsgx.agent.recover_records",
                "migsgx.agent.tls"],
    "application": ["migsgx.host.appctl", "migsgx.host.client"],
}  # fmt: skip

HEAVY = ("numpy", "cryptography.x509", "cryptography.hazmat.primitives.ciphers.aead",
         "google.protobuf", "cbor2", "rich", "click", "ssl", "prometheus_client")  # fmt: skip

MODES = ("no_bytecode_cache", "compiled")


def summary(values: list[float], digits: int = 1) -> dict[str, float | int]:
    return {
        "n": len(values),
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def _wall_ms(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, env=env)
    return (time.perf_counter() - t0) * 1000


def _copy_src(src: Path, dest: Path, generated: Path, *, compiled: bool) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    gen = dest / "migsgx" / "criu" / "_generated"
    if not gen.is_dir() and generated.is_dir():
        shutil.copytree(generated, gen, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if compiled:
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0",
             "--invalidation-mode", "timestamp", str(dest)],
            check=True, stdin=subprocess.DEVNULL, env=_env(None),
        )  # fmt: skip
    return dest


def _env(src: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPYCACHEPREFIX", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if src is not None:
        env["PYTHONPATH"] = str(src)  # (ahead of the editable install's path)
    return env


def _what_it_imports(python: str, modules: list[str], env: dict[str, str]) -> dict[str, object]:
    code = f"import json, sys; import {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [python, "-c", code], check=True, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    loaded = set(json.loads(out.stdout))
    return {
        "migsgx_modules": sum(1 for m in loaded if m == "migsgx" or m.startswith("migsgx.")),
        "heavy": [h for h in HEAVY if h in loaded],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (>= 3)")
    parser.add_argument("--baseline", type=Path, default=None, help="another tree's src")
    parser.add_argument("--only", default=None, help="comma-separated entries (default: all)")
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3")
    entries = ENTRIES if args.only is None else {k: ENTRIES[k] for k in args.only.split(",")}
    python = sys.executable
    here = Path(__file__).resolve().parents[1] / "src"
    generated = here / "migsgx" / "criu" / "_generated"
    trees = {"this": here, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    out: dict[str, object] = {"benchmark": "process_startup", "entries": entries}
    with tempfile.TemporaryDirectory(prefix="migsgx-startup-bench-") as tmp:
        envs = {
            (tree, mode): _env(
                _copy_src(src, Path(tmp) / f"{tree}-{mode}", generated, compiled=mode == "compiled")
            )
            for tree, src in trees.items()
            for mode in MODES
        }
        floor: list[float] = []
        times: dict[tuple[str, str, str], list[float]] = {
            (tree, mode, entry): [] for (tree, mode) in envs for entry in entries
        }
        for env in envs.values():  # warm-up: the page cache
            _wall_ms([python, "-c", "import " + ", ".join(ENTRIES["agent"])], env)
        for _ in range(args.runs):
            floor.append(_wall_ms([python, "-c", "pass"], _env(None)))
            for entry, modules in entries.items():
                for (tree, mode), env in envs.items():
                    argv = [python, "-c", "import " + ", ".join(modules)]
                    times[(tree, mode, entry)].append(_wall_ms(argv, env))
        imports = {
            (tree, entry): _what_it_imports(python, modules, envs[(tree, "compiled")])
            for tree in trees
            for entry, modules in entries.items()
        }
    for (tree, mode, entry), values in times.items():
        tree_out = out.setdefault(tree, {})
        assert isinstance(tree_out, dict)
        entry_out = tree_out.setdefault(entry, {**imports[(tree, entry)]})
        entry_out[f"{mode}_ms"] = summary(values)
    if "baseline" in trees:
        ratios: dict[str, dict[str, object]] = {}
        for entry in entries:
            ratios[entry] = {
                # baseline without a cache (what every start paid) / this tree compiled
                "baseline_uncached_over_this_compiled": summary(
                    [
                        b / t
                        for b, t in zip(
                            times[("baseline", "no_bytecode_cache", entry)],
                            times[("this", "compiled", entry)],
                            strict=True,
                        )
                    ],
                    2,
                ),
                "baseline_compiled_over_this_compiled": summary(
                    [
                        b / t
                        for b, t in zip(
                            times[("baseline", "compiled", entry)],
                            times[("this", "compiled", entry)],
                            strict=True,
                        )
                    ],
                    2,
                ),
            }
        out["paired_ratios"] = ratios
    out["interpreter_ms"] = summary(floor)
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    out["cpus"] = os.cpu_count()
    out["uptime_hours"] = round(float(Path("/proc/uptime").read_text().split()[0]) / 3600, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
