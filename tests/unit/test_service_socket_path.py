"""The platform service's socket: any path a Unix socket address holds binds, a longer one
is a clear configuration error (not an ``[internal] OSError`` from the kernel)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from platform_fixtures import World

from migsgx.errors import ConfigError
from migsgx.sgx.service import PlatformService


def _dir_for(total: int) -> Path:
    """A fresh directory whose ``enclave.sock`` path is ``total`` bytes long."""

    base = Path(tempfile.mkdtemp(prefix="sock-", dir="/tmp"))
    pad = total - len(os.fsencode(base)) - len("/") - len("/enclave.sock")
    directory = base / ("d" * pad)
    directory.mkdir()
    return directory


@pytest.mark.parametrize("total", [100, 107])
def test_a_socket_path_that_fits_binds_even_with_the_temporary_name(
    world: World, total: int
) -> None:
    path = _dir_for(total) / "enclave.sock"
    assert len(os.fsencode(path)) == total
    service = PlatformService(world.host_a, path, log_dir=path.parent / "logs", sandbox=False)
    service.bind()
    try:
        assert path.is_socket()
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    finally:
        service.shutdown()


def test_a_socket_path_too_long_for_an_address_is_a_config_error(world: World) -> None:
    path = _dir_for(108) / "enclave.sock"
    service = PlatformService(world.host_a, path, log_dir=path.parent / "logs", sandbox=False)
    with pytest.raises(ConfigError, match="longer than a Unix socket address"):
        service.bind()
    assert not path.exists()
