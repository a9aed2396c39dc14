"""Enclave logs are one private file per launch; the service keeps a bounded number of them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from migsgx.sgx.enclave_logs import open_instance_log, prune_logs


def test_old_logs_go_and_live_ones_stay(tmp_path: Path) -> None:
    paths = []
    for i in range(20):
        path = tmp_path / f"enclave-{i:016x}.log"
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
        paths.append(path)
    prune_logs(tmp_path, live={paths[0]}, max_logs=8)  # the oldest belongs to a live enclave
    left = sorted(tmp_path.glob("enclave-*.log"))
    assert len(left) <= 8
    assert paths[0] in left and paths[-1] in left


def test_each_launch_gets_a_fresh_private_file(tmp_path: Path) -> None:
    first, f1 = open_instance_log(tmp_path)
    second, f2 = open_instance_log(tmp_path)
    with f1, f2:
        f1.write(b"one")
    assert first != second and first.read_bytes() == b"one"
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert first.name.startswith("enclave-") and first.suffix == ".log"
