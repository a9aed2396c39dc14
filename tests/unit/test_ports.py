"""Listening ports: what a tree announces (``/proc/PID/net/*``) and the destination's bind check.

Real sockets of this test process, in its own network namespace: the
source's reading and the destination's check are the same code the agent and
the tool run (``agent/preflight.py``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migsgx.agent import preflight
from migsgx.containers import HostConfig, Source, make_driver
from migsgx.criu import Criu
from migsgx.errors import ProtocolError
from migsgx.system.ports import (
    Listener,
    PortInUseError,
    _address,
    check_bindable,
    check_bindable_in,
    listeners,
)


@pytest.fixture
def sockets() -> Iterator[dict[str, socket.socket]]:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp6.bind(("::", 0))
    tcp6.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))
    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, not listening
    bound.bind(("127.0.0.1", 0))
    out = {"tcp": tcp, "tcp6": tcp6, "udp": udp, "bound": bound}
    yield out
    for s in out.values():
        s.close()


def port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def test_a_tree_announces_what_it_listens_on(sockets: dict[str, socket.socket]) -> None:
    found = listeners(os.getpid(), [os.getpid()])
    assert Listener("tcp", "127.0.0.1", port(sockets["tcp"])) in found
    assert Listener("tcp", "::", port(sockets["tcp6"])) in found
    assert Listener("udp", "0.0.0.0", port(sockets["udp"])) in found
    assert port(sockets["bound"]) not in {item.port for item in found}  # not a listener
    # Sockets of the namespace that the tree holds no descriptor of are not its own.
    assert listeners(os.getpid(), []) == []


def test_a_taken_port_is_refused_with_its_name(sockets: dict[str, socket.socket]) -> None:
    taken = Listener("tcp", "0.0.0.0", port(sockets["tcp"]))  # a wildcard meets 127.0.0.1's
    with pytest.raises(PortInUseError, match=f"tcp 0.0.0.0:{taken.port}") as refused:
        check_bindable([taken])
    assert refused.value.code == "port-in-use"
    with pytest.raises(PortInUseError):
        check_bindable([Listener("udp", "0.0.0.0", port(sockets["udp"]))])
    with pytest.raises(PortInUseError):  # dual-stack "::" meets the IPv4 listener
        check_bindable([Listener("tcp", "::", port(sockets["tcp"]))])


def _free_port_below_ephemeral() -> int:
    """A port no one holds, below the kernel's ephemeral range.

    A port the kernel chose (bind to 0) may be handed out again as soon as it is
    closed, to any outgoing connection of a parallel test; a port below the
    range is only taken by a process that asks for it by number.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for candidate in range(max(1024, low - 5000), low):
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", candidate))
            except OSError:
                continue
            return candidate
    pytest.fail("no free port below the ephemeral range")


def test_a_free_port_passes_and_stays_free() -> None:
    free = _free_port_below_ephemeral()
    wanted = [
        Listener("tcp", "0.0.0.0", free),
        Listener("udp", "0.0.0.0", free),
        Listener("tcp", "192.0.2.7", free),
    ]  # fmt: skip  (an address not here: freebind)
    check_bindable(wanted)
    check_bindable(wanted)  # nothing was kept bound
    with socket.socket() as again:
        again.bind(("0.0.0.0", free))


@pytest.mark.parametrize(
    "value",
    [
        {"proto": "sctp", "address": "0.0.0.0", "port": 1},
        {"proto": "tcp", "address": "0.0.0.0", "port": 0},
        {"proto": "tcp", "address": "0.0.0.0", "port": 70000},
        {"proto": "tcp", "address": "0.0.0.0", "port": True},
        {"proto": "tcp", "address": "host.example", "port": 80},
        {"proto": "tcp", "address": "0.0.0.0", "port": 80, "extra": 1},
        ["tcp", "0.0.0.0", 80],
    ],
)
def test_a_peers_listener_is_checked(value: Any) -> None:
    with pytest.raises(ProtocolError):
        Listener.from_peer(value)


def test_proc_net_addresses() -> None:
    assert _address("0100007F", socket.AF_INET) == "127.0.0.1"
    assert _address("00000000000000000000000001000000", socket.AF_INET6) == "::1"
    mapped = _address("0000000000000000FFFF00000100007F", socket.AF_INET6)
    assert ipaddress.ip_address(mapped) == ipaddress.ip_address("::ffff:127.0.0.1")


def test_begin_announces_and_the_destination_refuses(sockets: dict[str, socket.socket]) -> None:
    """The pid driver's ``begin``: its ports; the destination binds them where it restores."""

    source = Source(root=os.getpid(), target={}, label="this process")
    fields = preflight.announce("pid", source, [os.getpid()])
    assert "spec" not in fields
    assert {"proto": "tcp", "address": "127.0.0.1", "port": port(sockets["tcp"])} in fields["ports"]
    pid = make_driver("pid", HostConfig(Criu("/bin/true")))
    with pytest.raises(PortInUseError):
        preflight.admit(pid, {}, fields)  # here, the ports are this process's own
    sockets["tcp"].close()
    sockets["tcp6"].close()
    sockets["udp"].close()
    preflight.admit(pid, {}, fields)
    runc = make_driver("runc", HostConfig(Criu("/bin/true")))
    with pytest.raises(ProtocolError, match="only a workload in its host's network namespace"):
        preflight.admit(runc, {"id": "kv"}, {"ports": []})


def _spec(*namespaces: dict[str, str]) -> dict[str, Any]:
    return {"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, *namespaces]}}


@pytest.mark.parametrize(
    ("spec", "target", "shares"),
    [
        (_spec({"type": "network", "path": "/run/netns/blue"}), {"id": "kv"}, True),
        (_spec(), {"id": "kv"}, True),  # no network namespace named: the engine's
        (_spec({"type": "network"}), {"id": "kv"}, False),  # fresh at the destination
        # the pod namespace the restore makes, with the address the container owns
        (_spec({"type": "network", "path": "/run/netns/blue"}), {"id": "kv", "net": {}}, False),
        (None, {}, False),  # a process tree: the pid driver announces by its own rule
    ],
)
def test_a_container_announces_its_ports_only_in_its_hosts_namespace(
    sockets: dict[str, socket.socket], spec: Any, target: dict[str, Any], shares: bool
) -> None:
    assert preflight.shares_host_network(spec, target) is shares
    source = Source(root=os.getpid(), target=target, label="this process", spec=spec)
    fields = preflight.announce("runc", source, [os.getpid()])
    assert ("ports" in fields) is shares
    if shares:
        wanted = {"proto": "tcp", "address": "127.0.0.1", "port": port(sockets["tcp"])}
        assert wanted in fields["ports"]


def test_the_check_runs_in_the_namespace_named(sockets: dict[str, socket.socket]) -> None:
    """This thread's own namespace, named by path or not: the taken port is refused."""

    taken = [Listener("tcp", "127.0.0.1", port(sockets["tcp"]))]
    for netns in (None, Path(f"/proc/{os.getpid()}/ns/net")):
        with pytest.raises(PortInUseError):
            check_bindable_in(netns, taken)
    with pytest.raises(ProtocolError, match="cannot be checked"):
        check_bindable_in(Path("/nonexistent/netns"), taken)
