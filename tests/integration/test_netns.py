"""Several hosts on one machine: namespaces, links, processes and cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

import migsgx.lab.netns as netns_mod
from migsgx.lab.netns import (
    NETNS_DIR,
    PREFIX,
    HostNetwork,
    NetnsError,
    cleanup_stale,
    list_namespaces,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

HostsFactory = Callable[..., HostNetwork]

# Accepts connections and answers each with the name of its host.
ECHO_NAME = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(8)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(sys.argv[2].encode())
"""
PORT = 47001


def ours(net: HostNetwork) -> list[str]:
    return [name for name in list_namespaces() if name.startswith(net.name_prefix)]


def hello(net: HostNetwork, source: str, target: str) -> str:
    with net[source].connect(net[target].address, PORT, wait=5) as conn:
        return conn.recv(64).decode()


def serve_names(net: HostNetwork) -> None:
    for host in net:
        host.spawn([sys.executable, "-c", ECHO_NAME, str(PORT), host.name])


def test_two_hosts_are_joined_by_a_veth_pair(require_root: None) -> None:
    with HostNetwork(["a", "b"], subnet=7) as net:
        assert ours(net) == sorted([net["a"].netns, net["b"].netns])
        assert (net["a"].address, net["b"].address) == ("10.250.7.1", "10.250.7.2")
        addrs = net["a"].run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        assert "10.250.7.1/24" in addrs
        serve_names(net)
        assert hello(net, "a", "b") == "b"
        assert hello(net, "b", "a") == "a"
        # The same port is free on every host: each has its own stack.
        with net["a"].connect("127.0.0.1", PORT, wait=5) as conn:
            assert conn.recv(64) == b"a"
        pids = [pid for host in net for pid in host.pids()]
        assert len(pids) == 2
    assert ours(net) == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


def test_three_hosts_share_a_bridge(hosts: HostsFactory) -> None:
    net = hosts("a", "b", "c", subnet=8)
    assert len(ours(net)) == 4  # three hosts and the switch
    serve_names(net)
    assert {hello(net, "a", "c"), hello(net, "c", "b"), hello(net, "b", "a")} == {"a", "b", "c"}


def test_hosts_have_no_route_outside(hosts: HostsFactory) -> None:
    net = hosts("a", "b")
    routes = net["a"].run(["ip", "-4", "route", "show"]).stdout
    assert "default" not in routes
    assert routes.split()[0] == "10.250.0.0/24"
    with pytest.raises(NetnsError, match="neither loopback"):
        net["a"].connect("192.0.2.1", 80)


def test_parallel_networks_do_not_collide(hosts: HostsFactory) -> None:
    first = hosts("a", "b")
    second = hosts("a", "b")
    assert not set(ours(first)) & set(ours(second))
    serve_names(first)
    serve_names(second)
    assert hello(first, "a", "b") == "b"
    assert hello(second, "b", "a") == "a"


def test_failure_inside_the_block_still_cleans_up(require_root: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), HostNetwork(["a", "b"]) as net:
        proc = net["a"].spawn(["sleep", "60"])
        raise RuntimeError("boom")
    assert ours(net) == []
    assert proc.returncode is not None


def test_failure_while_creating_removes_what_was_made(
    require_root: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_ip = netns_mod._ip

    def failing_ip(*args: str) -> str:
        if "addr" in args:
            raise NetnsError("injected failure")
        return real_ip(*args)

    monkeypatch.setattr(netns_mod, "_ip", failing_ip)
    net = HostNetwork(["a", "b", "c"])
    with pytest.raises(NetnsError, match="injected"):
        net.create()
    monkeypatch.undo()
    assert ours(net) == []


def test_cleanup_stale_removes_only_namespaces_of_dead_owners(require_root: None) -> None:
    dead_owner = _dead_pid()
    stale = f"{PREFIX}{dead_owner}-abc123-x"
    live = f"{PREFIX}{os.getpid()}-abc123-x"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = cleanup_stale()
        assert stale in removed
        assert live not in removed
        assert not (NETNS_DIR / stale).exists()
        assert (NETNS_DIR / live).exists()
    finally:
        for name in (stale, live):
            if (NETNS_DIR / name).exists():
                subprocess.run(["ip", "netns", "delete", name], check=True)


def test_bad_host_names_are_refused() -> None:
    with pytest.raises(NetnsError):
        HostNetwork(["a", "a"])
    with pytest.raises(NetnsError):
        HostNetwork(["Bad Name"])


def _dead_pid() -> int:
    """A pid that no process has right now."""

    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not os.path.exists(f"/proc/{proc.pid}")
    return proc.pid
