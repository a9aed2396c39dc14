"""The platform service's socket: any path a Unix socket address holds binds, a longer one
is a clear configuration error (not an ``[internal] OSError`` from the kernel); its
directory is made for it alone (containers bind-mount the directory)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from platform_fixtures import World

from migsgx.errors import ConfigError
from migsgx.sgx.service import PlatformService, default_socket, make_socket_dir


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
    service = PlatformService(
        world.host_a, path, log_dir=path.parent / "logs", sandbox=False, keep_socket=0
    )
    service.bind()
    try:
        assert path.is_socket()
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    finally:
        service.shutdown()


def test_a_socket_path_too_long_for_an_address_is_a_config_error(world: World) -> None:
    path = _dir_for(108) / "enclave.sock"
    service = PlatformService(
        world.host_a, path, log_dir=path.parent / "logs", sandbox=False, keep_socket=0
    )
    with pytest.raises(ConfigError, match="longer than a Unix socket address"):
        service.bind()
    assert not path.exists()


def test_the_default_socket_is_alone_in_a_directory_of_the_state() -> None:
    assert default_socket(Path("host-a")) == Path("host-a/run/enclave.sock")


@pytest.mark.parametrize("group", [None, 4242])
def test_the_socket_directory_is_made_for_it_alone(world: World, group: int | None) -> None:
    """Made when missing, 0700 (0750 and the group with ``--socket-group``): a container
    that bind-mounts it sees the socket and nothing else, whatever the umask."""

    path = Path(tempfile.mkdtemp(prefix="sock-", dir="/tmp")) / "run" / "enclave.sock"
    old = os.umask(0)
    try:
        service = PlatformService(world.host_a, path, log_dir=path.parent.parent / "logs",
                                  sandbox=False, socket_group=group, keep_socket=0)  # fmt: skip
        service.bind()
    finally:
        os.umask(old)
    try:
        st = path.parent.stat()
        assert stat.S_IMODE(st.st_mode) == (0o700 if group is None else 0o750)
        assert group is None or st.st_gid == group
        assert [p.name for p in path.parent.iterdir()] == ["enclave.sock"]
    finally:
        service.shutdown()
    assert list(path.parent.iterdir()) == []


def test_an_existing_socket_directory_is_left_as_it_is(tmp_path: Path) -> None:
    directory = tmp_path / "sockets"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    make_socket_dir(directory, 4242)
    st = directory.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_gid != 4242


def test_a_socket_under_a_missing_directory_is_a_config_error_naming_it(tmp_path: Path) -> None:
    """The parents' modes decide who reaches the socket: they are the operator's to make,
    and the error names the first one missing, before anything is made."""

    directory = tmp_path / "absent" / "deeper" / "run"
    with pytest.raises(ConfigError, match=f"{tmp_path / 'absent'} does not exist"):
        make_socket_dir(directory, None)
    assert list(tmp_path.iterdir()) == []


def test_a_service_whose_socket_directory_has_no_parent_does_not_bind(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "absent" / "run" / "enclave.sock"
    service = PlatformService(
        world.host_a, path, log_dir=tmp_path / "logs", sandbox=False, keep_socket=0
    )
    with pytest.raises(ConfigError, match="cannot be made"):
        service.bind()
    assert not (tmp_path / "absent").exists()
