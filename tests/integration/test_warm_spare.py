"""``platform serve --warm-spare``: a launch adopts a runtime process started in advance."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from migsgx import _proc
from migsgx.host.client import EnclaveClient
from migsgx.lab.hosts import Deployment, start_service

pytestmark = pytest.mark.integration


def _children(pid: int) -> set[int]:
    """The service's enclave processes.

    Chosen by the runtime's module on the command line, not by leaving out the
    socket keeper (also its child): between its fork and its exec a child still
    carries the service's own command line, so a keeper caught in that window was
    counted as the spare.
    """

    return {c for c in _proc.scanned_children(pid) if b"migsgx.enclave.runtime" in _proc.argv(c)}


def _wait(predicate: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_launch_adopts_the_warm_spare(tmp_path: Path) -> None:
    dep = Deployment.create(tmp_path / "dep", names=["a"])
    image = dep.signed_image("kvstore")
    svc = start_service(dep.hosts[0], extra_args=["--warm-spare"])
    try:
        assert _wait(lambda: len(_children(svc.process.pid)) == 1), "no spare was started"
        (spare,) = _children(svc.process.pid)
        with EnclaveClient.launch(image, socket_path=svc.socket) as kv:
            assert kv.info.pid == spare  # the launch took the process started in advance
            kv.ecall.put("k", b"v")
            assert kv.ecall.get("k") == b"v"
            # ...and a new spare stands ready for the next launch.
            assert _wait(lambda: len(_children(svc.process.pid) - {spare}) == 1)
            (second,) = _children(svc.process.pid) - {spare}
            with EnclaveClient.launch(image, socket_path=svc.socket) as other:
                assert other.info.pid == second
                assert other.ecall.get("k") is None  # a fresh enclave: no state shared
    finally:
        svc.stop()
    assert _wait(lambda: not _children(svc.process.pid))
