"""Enclave logs are one file per launch; the service keeps a bounded number of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from platform_fixtures import World, shared_world

from migsgx.sgx import service as service_mod
from migsgx.sgx.service import PlatformService


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


def test_old_logs_go_and_live_ones_stay(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_mod, "MAX_LOGS", 8)
    svc = PlatformService(
        world.host_a, tmp_path / "s.sock", log_dir=tmp_path / "logs", sandbox=False
    )
    svc.log_dir.mkdir()
    paths = []
    for i in range(20):
        path = svc.log_dir / f"enclave-{i:016x}.log"
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
        paths.append(path)
    svc._live_logs[12345] = paths[0]
    svc._prune_logs()
    left = sorted(svc.log_dir.glob("enclave-*.log"))
    assert len(left) <= 8
    assert paths[0] in left and paths[-1] in left
