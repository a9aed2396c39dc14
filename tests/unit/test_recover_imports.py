"""``migsgx recover`` imports only what it uses (its start counts toward a source's return).

Not a timing: which heavy libraries a ``recover`` with nothing in doubt loads.
Before, it loaded X.509 (the ``ca`` commands' collateral), numpy (the protocol
core, through the checkpoint half) and protobuf (every container driver), about
three times its start now (``docs/benchmarks.md``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_PROBE = """
import json, os, sys
from migsgx import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(os.environ["HEAVY"].split(",")))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def test_a_recover_with_nothing_in_doubt_loads_no_heavy_library(tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir(mode=0o700)
    heavy = "cryptography,numpy,google,matplotlib,rich,prometheus_client"
    argv = [sys.executable, "-c", _PROBE, "recover", "--state", str(tmp_path), "--json"]
    env = {**os.environ, "HEAVY": heavy}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    found = json.loads(out.stderr.strip().splitlines()[-1])
    assert found["code"] == 0, out
    assert json.loads(out.stdout) == []
    assert found["heavy"] == [], found
