"""A CRIU client loads its RPC module when it is made, not at its first request.

A migration's first CRIU request (the tool's dump, the destination agent's
restore) runs with the application frozen: importing protobuf there would be
downtime.  A fresh interpreter shows it: making the client loads the module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MODULE = "migsgx.criu._generated.rpc_pb2"


def _loaded_after(code: str) -> bool:
    probe = f"import sys; {code}; print({MODULE!r} in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    return out.stdout.strip() == "True"


def test_making_a_client_loads_the_rpc_module() -> None:
    assert not _loaded_after("import migsgx.criu")
    assert _loaded_after("import migsgx.criu; migsgx.criu.Criu('/bin/true')")
