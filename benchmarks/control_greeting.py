"""Cost of the control protocol's first exchange during a rolling upgrade.

A tool of this release greets an agent of this release (one TLS connection,
``hello`` offering 2, ``welcome`` 2) and an agent of the previous release
(``hello`` offering 2 refused, a second TLS connection, ``hello`` offering 1):
what a migration to a host not yet upgraded pays once, before anything freezes.
Both agents run on loopback as processes of their own; the previous release
is this repository's source at ``tests/compat/control-v1.json``'s commit
(``git archive``).  Prints JSON: min/median/max seconds per greeting, over
``--runs`` runs of ``--calls`` greetings each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from migsgx.agent.control import AgentConnection
from migsgx.agent.tls import AgentIdentity, issue_agent_identity
from migsgx.criu.locate import find_criu
from migsgx.sgx.ca import ProvisioningCA
from migsgx.sgx.platform import EmulatedPlatform

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


def _previous_src(out: Path) -> Path:
    commit = json.loads((ROOT / "tests" / "compat" / "control-v1.json").read_text())["commit"]
    archive = out / "previous.tar"
    subprocess.run(
        ["git", "-c", "safe.directory=*", "-C", str(ROOT), "archive", "-o", str(archive),
         commit, "src"],
        check=True,
    )  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(out / "previous", filter="data")
    src = out / "previous" / "src"
    generated = ROOT / "src" / "migsgx" / "criu" / "_generated"
    shutil.copytree(generated, src / "migsgx" / "criu" / "_generated")
    return src


def _agent(
    root: Path, ca: ProvisioningCA, name: str, src: Path
) -> tuple[subprocess.Popen[bytes], int]:
    state = root / name
    EmulatedPlatform.init(state, ca, host_id=name)
    issue_agent_identity(root / "ca", state, name, [LOOPBACK])
    ready = root / f"{name}.ready"
    env = {**os.environ, "PYTHONPATH": str(src), "MIGSGX_CRIU": str(find_criu())}
    with open(root / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "migsgx", "agent", "serve", "--state", str(state),
             "--listen", f"{LOOPBACK}:0", "--ready-file", str(ready)],
            stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"agent {name} did not start: see {root / (name + '.log')}")
        time.sleep(0.05)
    return proc, int(ready.read_text().strip().rpartition(":")[2])


def _greetings(port: int, identity: AgentIdentity, runs: int, calls: int) -> dict[str, object]:
    seconds = []
    versions = set()
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            conn = AgentConnection((LOOPBACK, port), identity, 30.0)
            try:
                versions.add(int(conn.greet("bench")["version"]))
            finally:
                conn.close()
        seconds.append((time.perf_counter() - t0) / calls)
    return {
        "version": sorted(versions),
        "seconds": {
            "min": min(seconds),
            "median": statistics.median(seconds),
            "max": max(seconds),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="migsgx-bench-greeting-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ca = ProvisioningCA.init(root / "ca")
        tool = issue_agent_identity(root / "ca", root / "tool", "tool", [LOOPBACK])
        this, this_port = _agent(root, ca, "this", ROOT / "src")
        procs.append(this)
        old, old_port = _agent(root, ca, "previous", _previous_src(root))
        procs.append(old)
        this_figures = _greetings(this_port, tool, args.runs, args.calls)
        old_figures = _greetings(old_port, tool, args.runs, args.calls)
        this_median = this_figures["seconds"]["median"]  # type: ignore[index]
        old_median = old_figures["seconds"]["median"]  # type: ignore[index]
        result = {
            "runs": args.runs,
            "calls_per_run": args.calls,
            "load_average": os.getloadavg(),
            "this_release_agent": this_figures,
            "previous_release_agent": old_figures,
            "previous_over_this_median": old_median / this_median,
        }
        print(json.dumps(result, indent=1))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
