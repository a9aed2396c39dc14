"""The ports an application listens on, and whether they are free where it is restored.

CRIU restores a listening socket by binding it again, after the source was
frozen and its enclaves dumped: a destination where something else holds the
port fails there, with CRIU's "Can't bind inet socket: Address already in
use", and the migration rolls back after the freeze.  So the source announces
what its tree listens on (:func:`listeners`, read from ``/proc/PID/net/*`` of
the tree's network namespace, kept to the sockets the tree's own file
descriptors hold), and the destination binds each of them once in the
namespace the tree will be restored into (:func:`check_bindable`) before
anything on the source freezes: a port taken there is a
:class:`PortInUseError` (code ``port-in-use``), and the source was never
touched.

What counts: TCP sockets in ``LISTEN``, UDP sockets bound and not connected.
A TCP port is tried with ``SO_REUSEADDR`` (as a restarted server binds; a
``TIME_WAIT`` left there is no conflict, a listener or a bound socket is),
a UDP port without it.  An address the destination does not have is tried
with ``IP_FREEBIND``: only the port is in question here.  A dual-stack
listener on ``::`` is tried dual-stack (the kernel's default,
``net.ipv6.bindv6only=0``), so an IPv4 listener on the same port counts.
The check is a snapshot: a port taken between ``begin`` and the restore still
fails the restore, and the migration rolls back as before.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .. import _proc
from ..errors import MigrationError, ProtocolError, register_error
from .process import in_netns

__all__ = [
    "MAX_LISTENERS",
    "Listener",
    "PortInUseError",
    "check_bindable",
    "check_bindable_in",
    "listeners",
]

#: A peer announces at most this many (a tree with more is not refused: the rest are unchecked).
MAX_LISTENERS: Final = 256
TCP_LISTEN: Final = "0A"
UDP_UNCONNECTED: Final = "07"
#: (protocol, /proc/net file, family): where the kernel lists a namespace's sockets.
TABLES: Final = (
    ("tcp", "tcp", socket.AF_INET),
    ("tcp", "tcp6", socket.AF_INET6),
    ("udp", "udp", socket.AF_INET),
    ("udp", "udp6", socket.AF_INET6),
)
IP_FREEBIND: Final = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND: Final = 78  # linux/in6.h (Python's socket module does not name it)


@register_error
class PortInUseError(MigrationError):
    """A port the application listens on is taken where it would be restored."""

    code = "port-in-use"


@dataclass(frozen=True, order=True)
class Listener:
    """One listening socket of the application: protocol, local address, port."""

    proto: str  # "tcp" or "udp"
    address: str  # as ipaddress writes it ("0.0.0.0", "::", "127.0.0.1" ...)
    port: int

    def to_wire(self) -> dict[str, Any]:
        return {"proto": self.proto, "address": self.address, "port": self.port}

    @classmethod
    def from_peer(cls, value: Any) -> Listener:
        """A listener announced by a peer; anything malformed is a :class:`ProtocolError`."""

        if not isinstance(value, Mapping) or set(value) != {"proto", "address", "port"}:
            raise ProtocolError("a listener is {'proto': ..., 'address': ..., 'port': ...}")
        proto, address, port = value["proto"], value["address"], value["port"]
        if proto not in ("tcp", "udp"):
            raise ProtocolError(f"bad listener protocol {proto!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ProtocolError(f"bad listener port {port!r}")
        if not isinstance(address, str) or len(address) > 64:
            raise ProtocolError("bad listener address")
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError as exc:
            raise ProtocolError(f"bad listener address {address!r}") from exc
        return cls(proto, str(parsed), port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.proto} {host}:{self.port}"


def _address(hex_address: str, family: int) -> str:
    """``/proc/net/*``'s address: 32-bit words in the host's byte order, in hex."""

    order = "<" if sys.byteorder == "little" else ">"
    words = [int(hex_address[i : i + 8], 16) for i in range(0, len(hex_address), 8)]
    packed = b"".join(struct.pack(f"{order}I", w) for w in words)
    return str(ipaddress.ip_address(packed if family == socket.AF_INET6 else packed[:4]))


def listeners(root: int, pids: Iterable[int], *, proc: Path = Path("/proc")) -> list[Listener]:
    """What the tree ``pids`` (rooted at ``root``) listens on, in ``root``'s network namespace.

    Only sockets one of the tree's file descriptors holds count: another
    process in the same namespace is not the application's business.
    """

    inodes = _proc.socket_inodes(pids)
    found: set[Listener] = set()
    for proto, name, family in TABLES:
        try:
            lines = (proc / str(root) / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue  # (no IPv6 in that namespace)
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or int(fields[9]) not in inodes:
                continue
            local, remote, state = fields[1], fields[2], fields[3]
            if proto == "tcp" and state != TCP_LISTEN:
                continue
            if proto == "udp" and (state != UDP_UNCONNECTED or not remote.endswith(":0000")):
                continue
            address, _, port = local.partition(":")
            found.add(Listener(proto, _address(address, family), int(port, 16)))
    return sorted(found)[:MAX_LISTENERS]


def _try_bind(listener: Listener) -> None:
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    kind = socket.SOCK_STREAM if listener.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        if listener.proto == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            if listener.address == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((listener.address, listener.port))


def check_bindable(wanted: Iterable[Listener]) -> None:
    """Bind each of ``wanted`` once in this thread's network namespace, then let it go.

    A port that is taken is a :class:`PortInUseError` naming it; any other
    failure (no IPv6 here ...) is left for the restore to report.
    """

    for listener in wanted:
        try:
            _try_bind(listener)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"the application listens on {listener}, and that port is in use "
                    "where it would be restored: free it there, or restore elsewhere",
                    listener=str(listener),
                ) from exc


def check_bindable_in(netns: Path | None, wanted: Iterable[Listener]) -> None:
    """:func:`check_bindable` in the network namespace ``netns`` (None: this thread's).

    A container that joined its host's network namespace is restored into the
    one the destination's configuration names, which need not be the agent's:
    the check then runs on a thread of its own that joined it.
    """

    listed = list(wanted)
    if netns is None or _same_netns(netns):
        check_bindable(listed)
        return
    try:
        in_netns(netns, lambda: check_bindable(listed))
    except (PortInUseError, ProtocolError):
        raise
    except OSError as exc:
        raise ProtocolError(f"the ports cannot be checked in {netns}: {exc}") from exc


def _same_netns(path: Path) -> bool:
    try:
        a, b = os.stat(path), os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net")
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)
