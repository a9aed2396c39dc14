"""No secret leaves the enclaves: a canary planted in enclave state is found nowhere else.

A random canary goes into a kvstore value and into model weights; both enclaves
migrate through a proxy that records every byte on the wire, both ways.  Then
the recorded bytes, every file of the deployment (platform state, service and
enclave logs) and every file under ``/tmp`` written during the test are searched
for the canary, raw, hex and base64 (at every alignment).  The control at the
end plants the canary in plain files and shows the same search finds it.
"""

from __future__ import annotations

import base64
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.register_assert_rewrite("state_helpers")

from state_helpers import (  # noqa: E402
    D2S,
    S2D,
    World,
    canary_patterns,
    find_patterns,
    migration_pair,
    regular_files,
    scan_file,
    start_transfer,
)

from migsgx.host.client import EnclaveClient  # noqa: E402

pytest_plugins = ["state_helpers"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROWS, COLS = 256, 1024  # 1 MiB of weights


def migrate(world: World, launch: Any, client: EnclaveClient, mode: str) -> tuple[bytes, bytes]:
    """Migrate ``client``'s enclave from host a to b; return the bytes seen each way."""

    with migration_pair(world, proxy={}) as (dest, mitm, addr):
        assert mitm is not None
        run = start_transfer(client, addr, mode=mode)
        assert run.error is None, run.error
        launch.track(dest.pid)
        run.commit()
        dest.join()
        assert dest.active and dest.enclave_sock is not None, dest.error
        client.reattach(dest.enclave_sock)
        dest.enclave_sock = None
        mitm.close()
        assert mitm.chunk_count > 3 and mitm.frames_of(S2D, "commit")
        return bytes(mitm.captured[S2D]), bytes(mitm.captured[D2S])


def weights_with(canary: bytes) -> bytes:
    data = bytearray(np.random.default_rng(5).standard_normal(ROWS * COLS, np.float32).tobytes())
    for at, form in ((4097, canary), (300_001, canary.hex().encode()), (700_002, canary)):
        data[at : at + len(form)] = form
    return bytes(data)


def scan_everything(world: World, since: float, patterns: dict[str, bytes]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    roots = [world.root]
    seen: set[Path] = set()
    for path in regular_files(roots):
        seen.add(path)
        found = scan_file(path, patterns)
        if found:
            hits[str(path)] = found
    tmp_roots = [Path(tempfile.gettempdir())]
    if Path("/dev/shm").is_dir():
        tmp_roots.append(Path("/dev/shm"))
    for path in regular_files(tmp_roots, newer_than=since):
        if path in seen or path.is_relative_to(world.root):
            continue
        found = scan_file(path, patterns)
        if found:
            hits[str(path)] = found
    return hits


def test_canary_never_leaves_the_enclaves(world: World, launch: Any) -> None:
    since = time.time() - 1
    canary = os.urandom(32)
    patterns = canary_patterns(canary)

    kv = launch("kvstore")
    kv.ecall.put("canary", canary)
    kv.ecall.put("canary-hex", canary.hex().encode())
    kv.ecall.put("canary-b64", base64.b64encode(b"~" + canary))
    kv.ecall.put("canary-inside", os.urandom(1001) + canary + os.urandom(77))
    model = launch("model")
    model_digest = model.ecall.load_weights(ROWS, COLS, weights_with(canary))

    wire = [
        *migrate(world, launch, kv, "pipelined"),
        *migrate(world, launch, model, "sequential"),
    ]
    # The canary did travel, inside the enclave state.
    assert kv.ecall.get("canary") == canary
    assert kv.ecall.get("canary-hex") == canary.hex().encode()
    assert model.ecall.digest() == model_digest
    assert sum(len(w) for w in wire) > 49 << 20  # 48 MiB of heap, 1 MiB of weights

    for direction, data in zip(("kv s2d", "kv d2s", "model s2d", "model d2s"), wire, strict=True):
        assert find_patterns(data, patterns) == [], f"canary on the wire ({direction})"

    logs = list(world.root.glob("host-*/logs/*.log")) + list(world.root.glob("host-*/service.log"))
    assert any(p.name.startswith("enclave-") and p.stat().st_size for p in logs)
    assert any(p.name == "service.log" for p in logs)
    assert (world.root / "host-b" / "counters.cbor").stat().st_size > 0
    hits = scan_everything(world, since, patterns)
    assert hits == {}, f"the canary leaked into {hits}"

    # Control: the same search finds the canary once it is where it should not be.
    planted = {
        world.root / "host-b" / "logs" / "planted.log": b"value=" + canary.hex().encode() + b"\n",
        world.root / "planted.bin": os.urandom(10) + canary,
    }
    fd, tmp_name = tempfile.mkstemp(prefix="migsgx-canary-control-")
    os.close(fd)
    planted[Path(tmp_name)] = b"x" + base64.b64encode(b"ab" + canary) + b"\n"
    try:
        for path, content in planted.items():
            path.write_bytes(content)
        hits = scan_everything(world, since, patterns)
        assert set(hits) == {str(p) for p in planted}, hits
        assert find_patterns(wire[0] + canary, patterns) == ["raw"]
    finally:
        for path in planted:
            path.unlink(missing_ok=True)
