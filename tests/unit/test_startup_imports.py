"""What the tool and the agent import at start: not the emulator, X.509 or numpy.

Every migration starts a tool, and every cell of the suite agents: each fresh
interpreter pays for what its entry point imports (``docs/benchmarks.md``,
"Every process's start").  These modules are imported where they are used; a
new top-level import that pulls them back in fails here, naming the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

#: The entry point's imports of each process, and what it must not load with them.
STARTS = {
    "tool": (
        ["migsgx.cli", "migsgx.agent.postcopy_choice", "migsgx.agent.source", "migsgx.agent.tls",
         "migsgx.containers"],
        ["migsgx.sgx.platform", "migsgx.sgx.service", "migsgx.sgx.ca", "cryptography.x509",
         "numpy"],
    ),
    "agent": (
        ["migsgx.cli", "migsgx.agent.server", "migsgx.agent.tls", "migsgx.containers",
         "migsgx.sgx.listener", "migsgx.sgx.spawn"],
        ["migsgx.sgx.platform", "migsgx.sgx.service", "migsgx.enclave.sdk", "cryptography.x509",
         "numpy"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("process", sorted(STARTS))
def test_a_process_starts_without_what_it_does_not_use(process: str) -> None:
    imports, absent = STARTS[process]
    code = f"import json, sys; import {', '.join(imports)}; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    )
    loaded = set(json.loads(out.stdout))
    assert [m for m in absent if m in loaded] == []
