"""Several "hosts" on one machine: network namespaces joined by veth links.

Tests and the demo migrate processes between hosts; here a host is a named
network namespace with ``lo`` up and one interface ``eth0`` holding an address
``10.250.S.N/24`` that exists only inside these namespaces. Two hosts are joined
by a veth pair; one or more than two hang off a bridge that lives in a switch
namespace of its own, so nothing is ever added to the machine's own network
namespace and no route leads outside. Connections made through :class:`Host`
may only target loopback or the network's own subnet.

With ``bridged=True`` each host also has a bridge ``br0`` holding its address,
with ``eth0`` as a port: a container's own network namespace can hang off it
(:mod:`migsgx.containers.podnet`) with an address on the same segment, an
address that can move to another host.

Namespace names are ``migsgx-<pid>.<start>-<token>-<host>``, the owning
process's run tag (pid and start time, :func:`run_tag`) and a random token:
parallel runs never collide, and :func:`cleanup_stale` can tell which ones were
left behind by a process that is gone (a pid reused since does not keep them).
:class:`HostNetwork` always removes what it created, also when creating it failed
halfway.  What outlives one network (names, ownership, entering, ending and
deleting a namespace) is :mod:`.namespaces`, re-exported here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from ..system.process import in_netns
from .namespaces import (
    NETNS_DIR,
    PREFIX,
    NetnsError,
    _ip,
    _kill_inside,
    cleanup_stale,
    delete_namespace,
    list_namespaces,
    owner_alive,
    run_tag,
    terminate,
)

__all__ = [
    "NETNS_DIR",
    "PREFIX",
    "Host",
    "HostNetwork",
    "NetnsError",
    "cleanup_stale",
    "delete_namespace",
    "list_namespaces",
    "owner_alive",
    "run_tag",
    "terminate",
]

#: The range the kernel takes ports from for connections and port-0 listeners in a host.
EPHEMERAL_PORTS: Final = (40000, 60999)
#: Ports handed to applications (``HostNetwork.app_port``): below the ephemeral range.
APP_PORTS: Final = range(20000, 40000)
_HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")


@dataclass
class Host:
    """One network namespace playing a machine."""

    name: str
    netns: str
    address: str
    network: ipaddress.IPv4Network
    bridge: str | None = None  # the bridge holding the address (``bridged`` networks)
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this host.

        Only the network namespace changes (``nsenter --net``): hosts share
        the machine's filesystem and mount namespace, so a descriptor opened
        out here (stdio files, /dev/null) stays resolvable for a CRIU dump.
        """

        return ["nsenter", f"--net={NETNS_DIR / self.netns}", "--", *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command here and return its captured output."""

        try:
            return subprocess.run(
                self.command(argv),
                capture_output=True,
                text=True,
                check=check,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.CalledProcessError as exc:
            raise NetnsError(
                f"{' '.join(argv)} failed in {self.name}: "
                f"{(exc.stderr or '').strip() or exc.returncode}"
            ) from exc

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[Any] | int = subprocess.DEVNULL,
        stderr: IO[Any] | int = subprocess.DEVNULL,
        cwd: Path | str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a detached process here: own session, stdin on /dev/null.

        ``nsenter`` replaces itself with the command, so the returned pid is
        the command's. The process is killed when the network closes.
        """

        proc = subprocess.Popen(
            self.command(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self._children.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process whose network namespace is this host's.

        What ``ip netns pids`` does (each ``/proc/PID/ns/net`` against the named
        namespace's file), read here: no process to start on every poll, and no
        ``ip`` to wait for.
        """

        try:
            ns = os.stat(NETNS_DIR / self.netns)
        except OSError as exc:
            raise NetnsError(f"no network namespace {self.netns}: {exc}") from exc
        found = []
        with os.scandir("/proc") as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                try:
                    st = os.stat(f"/proc/{entry.name}/ns/net")
                except OSError:  # gone meanwhile, or not ours to read
                    continue
                if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
                    found.append(int(entry.name))
        return found

    def new_socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket that lives in this host's network namespace."""

        return in_netns(NETNS_DIR / self.netns, lambda: socket.socket(family, kind))

    def connect(
        self, address: str, port: int, *, timeout: float = 5.0, wait: float = 0.0
    ) -> socket.socket:
        """Connect from this host to ``address:port``, retrying refusals for ``wait`` s.

        Only loopback and this network's own addresses are allowed.
        """

        target = ipaddress.ip_address(address)
        if not (target.is_loopback or target in self.network):
            raise NetnsError(f"{address} is neither loopback nor in {self.network}")
        deadline = time.monotonic() + wait
        while True:
            sock = self.new_socket(
                socket.AF_INET6 if target.version == 6 else socket.AF_INET, socket.SOCK_STREAM
            )
            sock.settimeout(timeout)
            try:
                sock.connect((address, port))
            except (ConnectionRefusedError, ConnectionResetError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
                continue
            except BaseException:
                sock.close()
                raise
            return sock

    def _stop_processes(self) -> None:
        for proc in self._children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._children.clear()
        _kill_inside(self.netns)


class HostNetwork:
    """Hosts ``names`` on subnet ``10.250.<subnet>.0/24``, as a context manager.

    Host ``i`` (in the order given) gets address ``10.250.<subnet>.<i+1>``.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        subnet: int = 0,
        prefix: str = PREFIX,
        bridged: bool = False,
    ) -> None:
        if not names or len(set(names)) != len(names):
            raise NetnsError(f"need distinct host names, got {list(names)!r}")
        for name in names:
            if not _HOST_NAME.fullmatch(name):
                raise NetnsError(f"bad host name {name!r}: [a-z][a-z0-9]{{0,11}}")
        if not 0 <= subnet <= 255 or len(names) > 250:
            raise NetnsError("subnet must be 0..255 and at most 250 hosts")
        self.network = ipaddress.IPv4Network(f"10.250.{subnet}.0/24")
        pid, start = run_tag()
        self.run_id = f"{pid}.{start}-{secrets.token_hex(3)}"
        self.name_prefix = f"{prefix}{self.run_id}-"
        bridge = "br0" if bridged else None
        self.hosts: dict[str, Host] = {
            name: Host(
                name, self.name_prefix + name, str(self.network[i + 1]), self.network, bridge
            )
            for i, name in enumerate(names)
        }
        self._switch = self.name_prefix + "switch" if len(names) != 2 else None
        self._created: list[str] = []
        self._open = False
        self._app_ports = iter(APP_PORTS)

    def app_port(self) -> int:
        """A listening port for an application, never one the kernel hands out itself.

        The hosts' own ephemeral range (``EPHEMERAL_PORTS``) lies above it, so an
        application moved from one host to another never finds its port taken by an
        agent's listener or an outgoing connection there; each port is handed out once.
        """

        try:
            return next(self._app_ports)
        except StopIteration:
            raise NetnsError("every application port of this network was handed out") from None

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    def __enter__(self) -> HostNetwork:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc is None)

    def create(self) -> None:
        if os.geteuid() != 0:
            raise NetnsError("creating network namespaces needs root")
        self._open = True
        try:
            self._build()
        except BaseException:
            self.close(raise_errors=False)
            raise

    def _add_namespace(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._created.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        low, high = EPHEMERAL_PORTS
        _ip("netns", "exec", netns, "sh", "-c",
            f"echo '{low} {high}' > /proc/sys/net/ipv4/ip_local_port_range")  # fmt: skip

    def _build(self) -> None:
        hosts = list(self.hosts.values())
        for host in hosts:
            self._add_namespace(host.netns)
        if self._switch is None:
            a, b = hosts
            _ip("-n", a.netns, "link", "add", "eth0", "type", "veth",
                "peer", "name", "eth0", "netns", b.netns)  # fmt: skip
        else:
            self._add_namespace(self._switch)
            _ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self._switch, "link", "set", "br0", "up")
            for i, host in enumerate(hosts):
                port = f"p{i}"
                _ip("-n", self._switch, "link", "add", port, "type", "veth",
                    "peer", "name", "eth0", "netns", host.netns)  # fmt: skip
                _ip("-n", self._switch, "link", "set", port, "master", "br0")
                _ip("-n", self._switch, "link", "set", port, "up")
        for host in hosts:
            dev = "eth0"
            if host.bridge is not None:
                dev = host.bridge
                # An address of its own, set explicitly: a bridge otherwise takes the
                # lowest of its ports' addresses, so a pod's port joining or leaving
                # (a container restored, removed) changed it, and the other host's ARP
                # entry then pointed at an address nobody answered for (its packets
                # to this host dropped until that entry went stale).
                mac = "02:00:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(
                    host.address).packed[-4:])  # fmt: skip
                _ip("-n", host.netns, "link", "add", dev, "address", mac,
                    "type", "bridge", "forward_delay", "0")  # fmt: skip
                _ip("-n", host.netns, "link", "set", "eth0", "master", dev)
                _ip("-n", host.netns, "link", "set", dev, "up")
            _ip("-n", host.netns, "addr", "add",
                f"{host.address}/{self.network.prefixlen}", "dev", dev)  # fmt: skip
            _ip("-n", host.netns, "link", "set", "eth0", "up")

    def close(self, *, raise_errors: bool = True) -> None:
        """Kill every process in the hosts and delete the namespaces. Idempotent."""

        if not self._open:
            return
        self._open = False
        errors: list[NetnsError] = []
        for host in self.hosts.values():
            host._stop_processes()
        for netns in reversed(self._created):
            try:
                delete_namespace(netns)
            except NetnsError as exc:
                errors.append(exc)
        self._created.clear()
        if errors and raise_errors:
            raise NetnsError(
                "cleanup left namespaces behind: " + "; ".join(map(str, errors))
            ) from errors[0]
