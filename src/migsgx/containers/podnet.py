"""A container that owns its IP address: the address moves with it, TCP connections too.

CRIU's ``--tcp-established`` restores a connection only where its local
address exists, and the peer only keeps talking to it if that address now
leads to the destination.  So a container keeps its connections when it runs
in a network namespace of its own (a "pod" namespace, as CNI makes one) whose
one interface ``eth0`` sits on a bridge that both hosts share, holding an
address of its own (``10.250.0.100/24``) and a MAC address of its own.

Source, in this order: the pod's ``eth0`` goes down (:func:`lock`; nothing
reaches the container or leaves it any more, ARP included, so no byte it has
not yet taken is acknowledged and the address answers nowhere), the
listeners' accept queues drain (:func:`drain`: CRIU refuses a listener with a
connection the application has not accepted yet), then the freeze and CRIU's
dump.  A rollback brings ``eth0`` up again (:func:`unlock`); after the commit
the namespace is deleted with the container (:func:`give_up`): the address
is gone from the source before anything there could send a reset.

Destination (:func:`take`): a namespace of its own with ``eth0`` (a veth
whose other end joins the host's bridge) holding the same address and MAC;
``arp_notify`` announces it as ``eth0`` comes up, so switches and peers learn
the new port.  Until the commit its firewall drops every IP packet on ``eth0``
and it answers no ARP (:func:`open_taken` lifts both just before the container
runs, and announces the address, :func:`announce`): a client's
packet that arrived before CRIU restored its socket would draw a reset, and
one acknowledged before the commit would be lost if the move were undone.

An agent takes only an address it was configured with (``pod_addresses`` in
``containers.toml``): a peer cannot make it claim another host's address.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import re
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..system.process import in_netns
from .base import ContainerError
from .command import run_engine

__all__ = [
    "PodAddress",
    "announce",
    "drain",
    "give_up",
    "inspect",
    "lock",
    "open_taken",
    "pod_netns_name",
    "take",
    "unlock",
]

IFNAME: Final = "eth0"
NETNS_DIR: Final = Path("/run/netns")
DRAIN_TIMEOUT: Final = 10.0
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class PodAddress:
    """The address a container owns: ``10.250.0.100/24`` and its interface's MAC."""

    address: str
    mac: str

    def to_dict(self) -> dict[str, str]:
        return {"address": self.address, "mac": self.mac}

    @classmethod
    def from_peer(cls, value: object) -> PodAddress:
        """Parse what a source sent; the caller checks the address against its own list."""

        if not isinstance(value, dict) or set(value) != {"address", "mac"}:
            raise ContainerError("a container's network is {'address': ..., 'mac': ...}")
        address, mac = value["address"], value["mac"]
        if not isinstance(address, str) or not isinstance(mac, str):
            raise ContainerError("a container's address and MAC are strings")
        try:
            iface = ipaddress.IPv4Interface(address)
        except ValueError as exc:
            raise ContainerError(f"not an IPv4 address with a prefix: {address!r}") from exc
        mac = mac.lower()
        if not _MAC.match(mac) or int(mac[:2], 16) & 1:
            raise ContainerError(f"not a unicast MAC address: {mac!r}")
        return cls(str(iface), mac)


def _ip(netns: Path | None, *args: str, what: str) -> str:
    prefix = ["nsenter", f"--net={netns}"] if netns is not None else []
    return run_engine([*prefix, "ip", *args], what=what, timeout=30)[1]


#: The destination's lock until the commit, in iptables' words (as CRIU locks a network).
_DROP: Final = (("INPUT", "-i", IFNAME, "-j", "DROP"), ("OUTPUT", "-o", IFNAME, "-j", "DROP"))


def _iptables(netns: Path, *args: str) -> None:
    run_engine(["nsenter", f"--net={netns}", "iptables", "-w", *args], what="iptables")


def inspect(netns: Path) -> PodAddress | None:
    """The address a pod namespace holds on ``eth0``, or None when it has none (or more)."""

    try:
        links = json.loads(_ip(netns, "-j", "addr", "show", "dev", IFNAME, what="ip addr"))
    except (ContainerError, ValueError):
        return None
    if not isinstance(links, list) or len(links) != 1:
        return None
    link: dict[str, Any] = links[0]
    v4 = [a for a in link.get("addr_info") or [] if a.get("family") == "inet"]
    if len(v4) != 1 or not isinstance(link.get("address"), str):
        return None
    return PodAddress(f"{v4[0]['local']}/{v4[0]['prefixlen']}", str(link["address"]))


def allowed(pod: PodAddress, pool: Sequence[str]) -> bool:
    """Whether ``pod``'s address is one of those this host was configured to hold."""

    want = ipaddress.IPv4Interface(pod.address)
    for entry in pool:
        with contextlib.suppress(ValueError):
            if ipaddress.IPv4Interface(entry) == want:
                return True
    return False


#: No new connection while a pod is being locked (its handshakes in flight complete).
_NO_SYN: Final = ("INPUT", "-i", IFNAME, "-p", "tcp", "--syn", "-j", "DROP")


def lock(netns: Path, *, timeout: float = DRAIN_TIMEOUT) -> None:
    """Cut the pod off the network with no connection half made; :func:`unlock` undoes it.

    First new connections are dropped (a client sends its SYN again later) while
    the application still runs: the handshakes under way complete and it accepts
    what its listeners queued (:func:`drain`), since CRIU cannot dump a listener
    holding a connection nobody accepted ("In-flight connection"), and a handshake
    cut in the middle would leave the client with a connection the destination
    never heard of.  Then ``eth0`` goes down: IP and ARP, both ways.
    """

    _iptables(netns, "-I", *_NO_SYN)
    try:
        drain(netns, timeout=timeout)
        _ip(netns, "link", "set", IFNAME, "down", what="lock the container's network")
    except BaseException:
        with contextlib.suppress(ContainerError):
            unlock(netns)
        raise


def unlock(netns: Path) -> None:
    """Undo :func:`lock` (a rollback): the source answers at its address again."""

    _ip(netns, "link", "set", IFNAME, "up", what="unlock the container's network")
    with contextlib.suppress(ContainerError):  # (absent when the lock failed early)
        _iptables(netns, "-D", *_NO_SYN)
    announce(netns)


def announce(netns: Path) -> None:
    """A gratuitous ARP from the pod's ``eth0``: bridges learn the port the address is on.

    A bridge that last saw the address's MAC on another port (the destination's, during
    an attempt that failed) would keep sending its frames there, and a pod that has
    nothing to send would never correct it.
    """

    pod = inspect(netns)
    if pod is None:
        raise ContainerError(f"no address on {IFNAME} in {netns}")
    mac = bytes.fromhex(pod.mac.replace(":", ""))
    ip = ipaddress.IPv4Interface(pod.address).ip.packed
    arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + mac + ip + b"\x00" * 6 + ip  # who-has ip, tell ip
    frame = b"\xff" * 6 + mac + b"\x08\x06" + arp

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind((IFNAME, 0))
            for _ in range(2):
                raw.send(frame)

    try:
        in_netns(netns, send)
    except OSError as exc:
        raise ContainerError(f"cannot announce {pod.address} in {netns}: {exc}") from exc


def _pending(netns: Path) -> int:
    """Connections half made, or made and not accepted yet (listeners' ``ss`` Recv-Q)."""

    enter = ["nsenter", f"--net={netns}", "ss", "-H", "-t", "-n"]
    listeners = run_engine([*enter, "-l"], what="ss", timeout=30)[1]
    queued = sum(int(line.split()[1]) for line in listeners.splitlines() if line.split())
    half = run_engine([*enter, "state", "syn-recv"], what="ss", timeout=30)[1]
    return queued + len(half.splitlines())


def drain(netns: Path, *, timeout: float = DRAIN_TIMEOUT) -> None:
    """Wait, new connections refused, until every pending one is accepted.

    The queues only shrink: no new handshake can start.
    """

    deadline = time.monotonic() + timeout
    while _pending(netns):
        if time.monotonic() > deadline:
            raise ContainerError(
                f"the container did not accept its pending connections within {timeout} s"
            )
        time.sleep(0.005)


def pod_netns_name(prefix: str, cid: str) -> str:
    return f"{prefix}{cid}"


def _host_side(netns_name: str) -> str:
    """The veth end on the host's bridge: 15 characters at most, unique per pod."""

    return "mp" + hashlib.sha256(netns_name.encode()).hexdigest()[:12]


def take(
    netns_name: str, pod: PodAddress, bridge: str, *, host: Path | None = None,
    locked: bool = False,
) -> Path:  # fmt: skip
    """A pod namespace holding ``pod``'s address on a veth into ``bridge``; returns its path.

    ``host``: the network namespace of the bridge (default: this process's).  ``locked``:
    the firewall drops every IP packet on ``eth0`` until :func:`open_taken` (CRIU restores
    the connections first, and a packet that met no socket yet would be answered by a
    reset; a dropped one is sent again).  ``eth0`` is up: CRIU needs a route to put a
    connection back.
    """

    path = NETNS_DIR / netns_name
    if path.exists():
        raise ContainerError(f"a network namespace {netns_name} exists on this host")
    run_engine(["ip", "netns", "add", netns_name], what="ip netns add", timeout=30)
    try:
        host_side = _host_side(netns_name)
        _ip(host, "link", "add", host_side, "type", "veth", "peer", "name", IFNAME,
            "netns", netns_name, what="ip link add")  # fmt: skip
        _ip(host, "link", "set", host_side, "master", bridge, "up", what="ip link set master")
        _ip(path, "link", "set", "lo", "up", what="ip link set lo up")
        _ip(path, "link", "set", IFNAME, "address", pod.mac, what="ip link set address")
        # Announce the address as eth0 comes up: peers and switches learn where it went.
        run_engine(["nsenter", f"--net={path}", "sysctl", "-q", "-w",
                    f"net.ipv4.conf.{IFNAME}.arp_notify=1"], what="sysctl")  # fmt: skip
        _ip(path, "addr", "add", pod.address, "dev", IFNAME, what="ip addr add")
        if locked:
            for rule in _DROP:
                _iptables(path, "-I", *rule)
            # Silent on ARP too: until the commit the source may take the address back.
            _ip(path, "link", "set", IFNAME, "arp", "off", what="ip link set arp off")
        _ip(path, "link", "set", IFNAME, "up", what="ip link set up")
    except BaseException:
        give_up(path)
        raise
    return path


def open_taken(netns: Path) -> None:
    """Lift :func:`take`'s lock: the restored connections carry on from here."""

    for rule in _DROP:
        _iptables(netns, "-D", *rule)
    _ip(netns, "link", "set", IFNAME, "arp", "on", what="ip link set arp on")
    _ip(netns, "neigh", "flush", "dev", IFNAME, what="ip neigh flush")  # none made while off
    announce(netns)


def give_up(netns: Path) -> None:
    """Delete a pod namespace (named under /run/netns) and with it the address and veth."""

    if netns.parent != NETNS_DIR or not netns.exists():
        return
    with contextlib.suppress(ContainerError):
        _ip(netns, "link", "del", IFNAME, what="ip link del")  # the veth pair, at once
    subprocess.run(["ip", "netns", "delete", netns.name], capture_output=True, check=False,
                   timeout=30)  # fmt: skip
