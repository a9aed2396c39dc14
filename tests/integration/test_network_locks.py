"""Network locks before a container's freeze, on real namespaces and iptables.

The pod lock of a container that owns its address, and the listener gate of
one that shares its host's network namespace.

A pod namespace on a bridged host (migsgx.containers.podnet), a listener in it
that accepts only when told: a connection the application has not accepted
(which CRIU would refuse to dump) keeps the lock from completing, and the lock
is undone; once accepted, the lock completes and new connections meet silence
(their SYNs are sent again later), never a refusal; unlocking lets them in.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.containers import podnet
from migsgx.containers.base import ContainerError
from migsgx.containers.gate import ListenerGate
from migsgx.lab.netns import HostNetwork

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LISTENER = """
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 7000))
s.listen(8)
print("ready", flush=True)
sys.stdin.readline()
conn, _ = s.accept()
print("accepted", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def pod(require_root: None, _stale_namespaces_removed: None) -> Iterator[tuple[HostNetwork, Path]]:
    with HostNetwork(["a", "b"], subnet=94, bridged=True) as net:
        address = podnet.PodAddress(f"{net.network[100]}/24", "02:00:00:5e:00:64")
        path = podnet.take(
            f"migsgx-podtest-{secrets.token_hex(3)}", address, "br0",
            host=Path("/run/netns") / net["a"].netns,
        )  # fmt: skip
        try:
            yield net, path
        finally:
            podnet.give_up(path)


def _eth0_up(path: Path) -> bool:
    out = subprocess.run(["nsenter", f"--net={path}", "ip", "-j", "link", "show", "eth0"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return "UP" in json.loads(out)[0]["flags"]


def _input_rules(path: Path) -> str:
    return subprocess.run(["nsenter", f"--net={path}", "iptables", "-w", "-S", "INPUT"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def test_lock_waits_for_accepted_connections_and_drops_new_ones(
    pod: tuple[HostNetwork, Path],
) -> None:
    net, path = pod
    address = str(net.network[100])
    listener = subprocess.Popen(
        ["nsenter", f"--net={path}", sys.executable, "-c", LISTENER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert listener.stdin is not None and listener.stdout is not None
    try:
        assert listener.stdout.readline().strip() == "ready"
        pending = net["b"].connect(address, 7000, timeout=5, wait=5)  # queued, not accepted

        with pytest.raises(ContainerError, match="did not accept its pending connections"):
            podnet.lock(path, timeout=0.3)
        assert _eth0_up(path) and "--syn" not in _input_rules(path)  # undone

        listener.stdin.write("go\n")
        listener.stdin.flush()
        assert listener.stdout.readline().strip() == "accepted"
        podnet.lock(path)
        assert not _eth0_up(path)
        late = net["b"].new_socket()
        late.settimeout(0.5)
        with pytest.raises(TimeoutError):  # silence, not a refusal: the client tries again
            late.connect((address, 7000))
        late.close()

        podnet.unlock(path)
        assert _eth0_up(path) and "--syn" not in _input_rules(path)
        again = net["b"].connect(address, 7000, timeout=5, wait=5)
        again.close()
        pending.close()
    finally:
        listener.kill()
        listener.wait(10)


def test_listener_gate_of_a_container_sharing_its_hosts_network(
    require_root: None, _stale_namespaces_removed: None
) -> None:
    with HostNetwork(["a", "b"], subnet=95) as net:
        a, b = net["a"], net["b"]
        listener = subprocess.Popen(
            a.command([sys.executable, "-c", LISTENER]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert listener.stdin is not None and listener.stdout is not None
        try:
            assert listener.stdout.readline().strip() == "ready"
            gate = ListenerGate.of_tree(listener.pid)
            assert gate.ports == [7000] and gate.netns == f"/run/netns/{a.netns}"
            pending = b.connect(a.address, 7000, timeout=5, wait=5)  # queued, not accepted

            with pytest.raises(ContainerError, match="did not accept its pending connections"):
                gate.close(timeout=0.3)
            assert "--dport 7000" not in _input_rules(Path(gate.netns))  # opened again

            listener.stdin.write("go\n")
            listener.stdin.flush()
            assert listener.stdout.readline().strip() == "accepted"
            gate.close()
            late = b.new_socket()
            late.settimeout(0.5)
            with pytest.raises(TimeoutError):  # dropped, not refused
                late.connect((a.address, 7000))
            late.close()
            gate.open()
            assert "--dport 7000" not in _input_rules(Path(gate.netns))
            b.connect(a.address, 7000, timeout=5, wait=5).close()
            pending.close()
        finally:
            listener.kill()
            listener.wait(10)
