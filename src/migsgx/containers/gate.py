"""No connection half made when a container that shares its host's network is dumped.

CRIU refuses to dump a listener holding a connection the application has not
accepted yet ("In-flight connection"): a client that connects a moment
before the freeze fails the whole migration.  So before the freeze the
container's listening ports are gated (:class:`ListenerGate`): the firewall of
its network namespace drops new SYNs to them (a client sends its SYN again
later), the handshakes under way complete, and the still running application
accepts what is queued; only then is the tree frozen.  The gate opens again
after the commit (the listeners are gone: clients are refused and go to the
destination) or on a rollback (the listeners take them).

A container that owns its address has a stronger lock of its own
(:mod:`.podnet`).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .. import _proc
from ..system.process import tree_pids
from .base import ContainerError
from .command import run_engine

__all__ = ["ListenerGate", "listeners", "open_gate", "parse_ungate"]

DRAIN_TIMEOUT: Final = 10.0
#: The netns a gate's note may name: what :func:`_lasting_netns` gives (nothing that
#: ``nsenter`` could read as an option or that leaves ``/proc`` and ``/run/netns``).
_NETNS: Final = re.compile(
    r"/proc/(?:self|[1-9][0-9]{0,9})/ns/net|/run/netns/(?!\.\.?$)[A-Za-z0-9_.-]{1,64}"
)
_PORT: Final = re.compile(r"[1-9][0-9]{0,4}")
_LISTEN: Final = "0A"
_SYN_RECV: Final = "03"


def _rows(root: int) -> list[list[str]]:
    """The rows of ``/proc/ROOT/net/tcp`` and ``tcp6`` (the tree's namespace)."""

    rows = []
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{root}/net/{name}").read_text().splitlines()[1:]
            rows += [line.split() for line in lines if len(line.split()) >= 10]
    return rows


def _port(field: str) -> int:
    return int(field.rpartition(":")[2], 16)


def listeners(root: int) -> list[int]:
    """The TCP ports the tree under ``root`` listens on."""

    inodes = _proc.socket_inodes(tree_pids(root))
    return sorted({_port(r[1]) for r in _rows(root) if r[3] == _LISTEN and int(r[9]) in inodes})


@dataclass
class ListenerGate:
    root: int
    ports: list[int]
    #: A name of the tree's network namespace that outlives the tree where it can.
    netns: str

    @classmethod
    def of_tree(cls, root: int) -> ListenerGate:
        return cls(root, listeners(root), _lasting_netns(root))

    def note(self) -> str:
        """The guardian's line for opening the gate if the tool dies."""

        return f"ungate {self.netns} " + ",".join(map(str, self.ports))  # (parse_ungate reads it)

    def close(self, *, timeout: float = DRAIN_TIMEOUT) -> None:
        """Drop new connections to the listeners, then wait until none is pending."""

        try:
            for port in self.ports:
                _iptables(self.netns, "-I", port)
            deadline = time.monotonic() + timeout
            while self._pending():
                if time.monotonic() > deadline:
                    raise ContainerError(
                        f"the application did not accept its pending connections within {timeout} s"
                    )
                time.sleep(0.005)
        except BaseException:
            with contextlib.suppress(ContainerError):
                self.open()
            raise

    def _pending(self) -> int:
        """Connections to the gated ports half made, or made and not accepted yet."""

        ports = set(self.ports)
        count = 0
        for row in _rows(self.root):
            if _port(row[1]) not in ports:
                continue
            if row[3] == _LISTEN:
                count += int(row[4].partition(":")[2], 16)  # rx_queue: the accept queue
            elif row[3] == _SYN_RECV:
                count += 1
        return count

    def open(self) -> None:
        """Remove the rules (each once; a missing one is fine)."""

        open_gate(self.netns, self.ports)


def _lasting_netns(root: int) -> str:
    """This process's namespace file if the tree shares it, else a named one, else the tree's."""

    mine = f"/proc/{root}/ns/net"
    try:
        st = os.stat(mine)
    except OSError as exc:
        raise ContainerError(f"no process {root}") from exc
    own = os.stat("/proc/self/ns/net")
    if (st.st_ino, st.st_dev) == (own.st_ino, own.st_dev):
        return "/proc/self/ns/net"  # the guardian shares it too
    with contextlib.suppress(OSError):
        for entry in sorted(Path("/run/netns").iterdir()):
            with contextlib.suppress(OSError):
                other = entry.stat()
                if (other.st_ino, other.st_dev) == (st.st_ino, st.st_dev):
                    return str(entry)
    return mine  # a namespace of the tree's own: its rules end with it


def parse_ungate(note: str) -> tuple[str, list[int]] | None:
    """The netns and ports of an ``ungate NETNS PORT,...`` note (:meth:`ListenerGate.note`),
    or None for any other note or a garbled one.

    The guardian reads it from the tool's pipe and ``migsgx recover`` from the journal,
    both to run ``nsenter``/``iptables`` as root with what it names: one reader, and
    nothing it does not check (a netns that :func:`_lasting_netns` could have given,
    ports 1-65535) reaches a command line.
    """

    parts = note.split()
    if len(parts) != 3 or parts[0] != "ungate" or not _NETNS.fullmatch(parts[1]):
        return None
    fields = parts[2].split(",")
    if not all(_PORT.fullmatch(f) and int(f) <= 65535 for f in fields):
        return None
    return parts[1], [int(f) for f in fields]


def open_gate(netns: str, ports: list[int]) -> None:
    for port in ports:
        with contextlib.suppress(ContainerError):
            _iptables(netns, "-D", port)


def _iptables(netns: str, op: str, port: int) -> None:
    rule = ["INPUT", "-p", "tcp", "--syn", "--dport", str(port), "-j", "DROP"]
    run_engine(["nsenter", f"--net={netns}", "iptables", "-w", op, *rule], what="iptables")
