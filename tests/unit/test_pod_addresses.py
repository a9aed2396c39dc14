"""Containers that own their address: what a peer may ask for, settings, the TCP decision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from migsgx.agent.source import keeps_tcp
from migsgx.containers import ContainerError, ContainerSettings, HostConfig, Source, make_driver
from migsgx.containers.frozen import write_criu_config
from migsgx.containers.podnet import PodAddress, allowed
from migsgx.criu import Criu
from migsgx.errors import ConfigError, ProtocolError

POOL = ("10.250.5.100/24", "10.250.5.101/24")
NET = {"address": "10.250.5.101/24", "mac": "02:aa:bb:cc:dd:ee"}


def runc(**settings: Any) -> Any:
    config = HostConfig(Criu("/bin/true"), ContainerSettings(**settings), None, Path("/x"))
    return make_driver("runc", config)


def test_a_peer_may_move_only_an_address_of_this_hosts_pool() -> None:
    driver = runc(pod_bridge="br0", pod_addresses=POOL)
    assert driver.check_target({"id": "kv", "net": NET}) == {"id": "kv", "net": NET}
    other = {**NET, "address": "10.250.5.1/24"}  # e.g. the destination host's own address
    with pytest.raises(ContainerError, match=r"refused: 10\.250\.5\.1/24 is not one of"):
        driver.check_target({"id": "kv", "net": other})
    with pytest.raises(ContainerError, match="refused"):
        driver.check_target({"id": "kv", "net": {**NET, "address": "10.250.5.101/16"}})
    with pytest.raises(ContainerError, match="no pod_bridge"):
        runc(pod_addresses=POOL).check_target({"id": "kv", "net": NET})
    with pytest.raises(ContainerError, match="refused"):
        runc(pod_bridge="br0").check_target({"id": "kv", "net": NET})  # an empty pool
    with pytest.raises(ProtocolError):
        driver.check_target({"net": NET})


@pytest.mark.parametrize(
    "net",
    [
        {"address": "10.250.5.101/24"},
        {**NET, "extra": 1},
        {**NET, "mac": "01:00:5e:00:00:01"},  # multicast
        {**NET, "mac": "02:aa:bb:cc:dd"},
        {**NET, "address": "10.250.5.101"},  # no prefix: taken as /32, not in the pool
        {**NET, "address": "fe80::1/64"},
        {**NET, "address": 7},
        "10.250.5.101/24",
    ],
)
def test_malformed_addresses_from_a_peer_are_refused(net: Any) -> None:
    with pytest.raises(ContainerError):
        runc(pod_bridge="br0", pod_addresses=POOL).check_target({"id": "kv", "net": net})


def test_the_pool_compares_addresses_with_their_prefix() -> None:
    assert allowed(PodAddress("10.250.5.100/24", "02:00:00:00:00:01"), POOL)
    assert not allowed(PodAddress("10.250.5.102/24", "02:00:00:00:00:01"), POOL)
    assert not allowed(PodAddress("10.250.5.100/24", "02:00:00:00:00:01"), ["junk"])


def test_pod_settings_round_trip(tmp_path: Path) -> None:
    settings = ContainerSettings(pod_bridge="br0", pod_netns_prefix="p-", pod_addresses=POOL)
    settings.save(tmp_path)
    assert ContainerSettings.load(tmp_path) == settings
    (tmp_path / "containers.toml").write_text('pod_addresses = "10.250.5.100/24"\n')
    with pytest.raises(ConfigError, match="must be a list of"):
        ContainerSettings.load(tmp_path)


def test_tcp_connections_are_kept_only_where_the_address_moves() -> None:
    shared = Source(root=1, target={}, label="process 1")
    assert keeps_tcp(None, shared) is False
    assert keeps_tcp(False, shared) is False
    with pytest.raises(ConfigError, match="process 1: it shares its host's network namespace"):
        keeps_tcp(True, shared)
    owner = Source(root=1, target={"id": "kv", "net": NET}, label="runc container kv",
                   no_tcp_keep="")  # fmt: skip
    assert keeps_tcp(None, owner) is True  # the default where it applies
    assert keeps_tcp(True, owner) is True
    assert keeps_tcp(False, owner) is False


def test_restore_configuration_keeps_connections_open(tmp_path: Path) -> None:
    path = tmp_path / "criu.conf"
    write_criu_config(path, tcp_close=False, tcp_established=True)
    assert path.read_text().split() == ["leave-stopped", "file-locks", "tcp-established"]
    write_criu_config(path, tcp_close=True, tcp_established=True)
    assert "tcp-established" not in path.read_text() and "tcp-close" in path.read_text()
