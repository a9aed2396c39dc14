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

The gate's note (for the guardian and ``migsgx recover``, which open it when
the tool died) names the namespace by a path *and* its inode: a path alone
(``/proc/self/ns/net`` for a tree that shares the tool's namespace, a tree
process's pid) means another namespace to a reader that runs elsewhere or
after the pid was reused.  The reader opens the gate only in a namespace it
reaches whose inode is the noted one, or says clearly that it cannot; and it
changes the rules in the namespace of the very descriptor whose inode it
checked (:func:`open_netns`), never through the path again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .. import _proc
from ..system.process import tree_pids
from .base import ContainerError

__all__ = [
    "ListenerGate", "listeners", "manual_command", "open_gate", "open_netns", "parse_ungate",
    "reach_netns",
]  # fmt: skip

log = logging.getLogger("migsgx.containers")

DRAIN_TIMEOUT: Final = 10.0
#: The netns a gate's note may name: what :func:`_lasting_netns` gives (nothing that
#: ``nsenter`` could read as an option or that leaves ``/proc`` and ``/run/netns``).
_NETNS: Final = re.compile(
    r"/proc/(?:self|[1-9][0-9]{0,9})/ns/net|/run/netns/(?!\.\.?$)[A-Za-z0-9_.-]{1,64}"
)
_PORT: Final = re.compile(r"[1-9][0-9]{0,4}")
_INODE: Final = re.compile(r"[1-9][0-9]{0,19}")
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
    #: That namespace's inode: what a reader checks before it uses the name (0: unknown).
    netns_inode: int = 0

    @classmethod
    def of_tree(cls, root: int) -> ListenerGate:
        return cls(root, listeners(root), *_lasting_netns(root))

    def note(self) -> str:
        """The guardian's line for opening the gate if the tool dies."""

        ports = ",".join(map(str, self.ports))
        inode = f" {self.netns_inode}" if self.netns_inode > 0 else ""
        return f"ungate {self.netns} {ports}{inode}"  # (parse_ungate reads it)

    def close(self, *, timeout: float = DRAIN_TIMEOUT) -> None:
        """Drop new connections to the listeners, then wait until none is pending."""

        try:
            netns = open_netns(self.netns, self.netns_inode)
            try:
                for port in self.ports:
                    _iptables(netns, "-I", port)
            finally:
                os.close(netns)
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

        open_gate(self.netns, self.ports, self.netns_inode)


def _lasting_netns(root: int) -> tuple[str, int]:
    """A named namespace file of the tree's network namespace if there is one, else the
    tree's own (``/proc/ROOT/ns/net``); with that namespace's inode.

    A tree that shares the tool's namespace is named by its root's pid too, never
    by ``/proc/self/ns/net``: the guardian shares it, but ``migsgx recover`` may run
    in another namespace, where that path names its own.  Whatever the name, the
    inode decides where the gate opens (:func:`reach_netns`: here, in the host's
    first process's namespace, or a named one, once the tree is gone).
    """

    mine = f"/proc/{root}/ns/net"
    try:
        st = os.stat(mine)
    except OSError as exc:
        raise ContainerError(f"no process {root}") from exc
    for entry in _named():
        with contextlib.suppress(OSError):
            other = entry.stat()
            if (other.st_ino, other.st_dev) == (st.st_ino, st.st_dev):
                return str(entry), st.st_ino
    return mine, st.st_ino  # (a namespace of the tree's own: its rules end with it)


def _named() -> list[Path]:
    with contextlib.suppress(OSError):
        return sorted(p for p in Path("/run/netns").iterdir() if _NETNS.fullmatch(str(p)))
    return []


def _candidates(netns: str, inode: int) -> list[str]:
    """Where the namespace ``inode`` may be reached from here, in the order tried."""

    if inode <= 0:
        return [netns]
    return [netns, "/proc/self/ns/net", "/proc/1/ns/net", *map(str, _named())]


def _unreachable(netns: str, inode: int) -> ContainerError:
    return ContainerError(
        f"the network namespace the gate was closed in (inode {inode}, noted as {netns}) is "
        "not reachable from here, or gone: its rule stays; open it where that namespace is "
        "reachable (run migsgx recover there), or remove it by hand: "
        f"{manual_command(netns, [])}"
    )


def reach_netns(netns: str, inode: int) -> str:
    """A namespace file, reachable from here, of the network namespace ``inode``.

    The noted name first, then this process's namespace, the first process's (the
    host's, when the tool shared it), then every named one.  ``inode`` 0 (a note of
    an older tool): the name as it is.  :class:`ContainerError` if none is that
    namespace: the reader runs where it cannot reach it (or it is gone, and its
    rules with it).  A name only: what enters the namespace uses
    :func:`open_netns`, whose descriptor is the namespace checked.
    """

    for candidate in _candidates(netns, inode):
        with contextlib.suppress(OSError):
            if inode <= 0 or os.stat(candidate).st_ino == inode:
                return candidate
    raise _unreachable(netns, inode)


def open_netns(netns: str, inode: int) -> int:
    """An open descriptor of the network namespace ``inode`` (tried as :func:`reach_netns`).

    The file is opened once and its *descriptor's* inode is checked, and the
    rules are then changed in the namespace of that descriptor
    (``nsenter --net=/proc/self/fd/N``): a path checked and then resolved again
    by ``nsenter`` could name another namespace by then (a ``/proc/PID`` whose
    pid was reused in between, a ``/run/netns`` name mounted over), whose gate
    would open instead.  The caller closes it.
    """

    for candidate in _candidates(netns, inode):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if inode <= 0 or os.fstat(fd).st_ino == inode:
                return fd
        except OSError:
            pass
        os.close(fd)
    raise _unreachable(netns, inode)


def manual_command(netns: str, ports: list[int]) -> str:
    """What an operator runs to open the gate by hand, in the namespace it was closed in."""

    port = ",".join(map(str, ports)) if ports else "PORT"
    rule = f"iptables -D INPUT -p tcp --syn --dport {port} -j DROP"
    return f"nsenter --net=NETNS {rule} (NETNS: that namespace's file; {netns} when noted)"


def parse_ungate(note: str) -> tuple[str, list[int], int] | None:
    """The netns, ports and netns inode of an ``ungate NETNS PORT,... [INODE]`` note
    (:meth:`ListenerGate.note`; an older tool's has no inode: 0), or None for any
    other note or a garbled one.

    The guardian reads it from the tool's pipe and ``migsgx recover`` from the journal,
    both to run ``nsenter``/``iptables`` as root with what it names: one reader, and
    nothing it does not check (a netns that :func:`_lasting_netns` could have given,
    ports 1-65535) reaches a command line.
    """

    parts = note.split()
    if len(parts) not in (3, 4) or parts[0] != "ungate" or not _NETNS.fullmatch(parts[1]):
        return None
    fields = parts[2].split(",")
    if not all(_PORT.fullmatch(f) and int(f) <= 65535 for f in fields):
        return None
    inode = parts[3] if len(parts) == 4 else "0"
    if inode != "0" and not (_INODE.fullmatch(inode) and int(inode) < 1 << 64):
        return None
    return parts[1], [int(f) for f in fields], int(inode)


def open_gate(netns: str, ports: list[int], inode: int = 0) -> bool:
    """Remove the gate's rules in the namespace it was closed in; False (said on the
    log) if that namespace is not reachable from here (:func:`open_netns`), or a rule
    is still there afterwards (its removal failed)."""

    try:
        fd = open_netns(netns, inode)
    except ContainerError as exc:
        log.warning("the gate on ports %s stays closed: %s",
                    ",".join(map(str, ports)), exc)  # fmt: skip
        return False
    try:
        left = []
        for port in ports:
            try:
                _iptables(fd, "-D", port)
            except ContainerError:
                # (a rule already gone is fine; one that stays is not)
                if _iptables_has(fd, port):
                    left.append(port)
    finally:
        os.close(fd)
    if left:
        log.warning("the gate on ports %s stays closed: its rule could not be removed; by "
                    "hand: %s", ",".join(map(str, left)), manual_command(netns, left))  # fmt: skip
    return not left


def _rule(op: str, port: int) -> list[str]:
    return ["iptables", "-w", op, "INPUT", "-p", "tcp", "--syn", "--dport", str(port), "-j", "DROP"]


def _iptables(netns: int, op: str, port: int) -> None:
    """``iptables OP`` of the gate's rule for ``port``, in the namespace of the open
    descriptor ``netns`` (the one checked: :func:`open_netns`)."""

    argv = ["nsenter", f"--net=/proc/self/fd/{netns}", *_rule(op, port)]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120, pass_fds=(netns,), check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ContainerError(f"iptables: {exc}") from exc
    if proc.returncode != 0:
        raise ContainerError(f"iptables {op} failed: {proc.stderr.strip()[-500:]}")


def _iptables_has(netns: int, port: int) -> bool:
    """Whether the gate's rule for ``port`` is in the namespace of ``netns`` (``-C``);
    True where that cannot be told (the rule may stay)."""

    try:
        _iptables(netns, "-C", port)
    except ContainerError as exc:
        return "does a matching rule exist" not in str(exc) and "Bad rule" not in str(exc)
    return True
