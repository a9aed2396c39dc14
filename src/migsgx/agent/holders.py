"""Taking a source enclave's connection back from the enclave itself, after its holders died.

A checkpoint or migration tool gives every source enclave a duplicate of its
own end of the enclave's connection (``__mig_hold``, ``docs/spec/channels.md``
7.1) and records, per enclave, ``[pid, fd, start, nonce]`` (the enclave
process, the duplicate's number there, the process's start time, the hold's
nonce) in its journal.  Should
the tool and its guardian both die, the enclave sees no end of file and keeps
its state; root then takes the duplicate back (``pidfd_getfd``) to abort a
checkpoint and hand the enclave back (``migsgx recover --checkpoint``), or to
deliver a committed migration's state again (``migsgx recover``).

The journal lies in a directory its owner may write, and is no order to root:
a descriptor is taken only from a live process with the recorded start time
that is an enclave runtime process, only if it is a Unix stream socket, and
only if that socket's other end is held by the same enclave process (the
duplicate is the driver's end of the enclave's own connection).  So whatever is
then written into it can reach no other process: not the application (the
enclave's own end of its connection), not the platform service (its platform
channel).  Nothing is written to anything else.

The same checks guard :func:`watch_holders`: before a given-back source tree
continues, each source enclave is told which processes hold its connection
then (``__mig_watch``), a set only root can read (the enclave's own uid and
``hidepid`` keep it from ``/proc``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from .. import _proc
from .._fds import take_descriptor
from ..channel import HOLD_WATCHED
from ..containers.base import ContainerError
from ..containers.cgroups import Freezer
from ..errors import MigSGXError
from .ckpt_journal import start_time
from .enclave_ask import ask, not_answering
from .watch_ask import Ask, tell_all

__all__ = [
    "connection_holders", "dead_holders", "eof_socket", "is_enclave_runtime", "peer_inode",
    "take_held", "watch_holders", "watch_recorded",
]  # fmt: skip

log = logging.getLogger("migsgx.recover")

_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 1
_NLMSG_ERROR: Final = 2
_UDIAG_SHOW_PEER: Final = 0x4
_UNIX_DIAG_PEER: Final = 2
_NO_COOKIE: Final = 0xFFFFFFFF
_SIOCGSKNS: Final = 0x894C  # a socket's network namespace, as a descriptor
_CLONE_NEWNET: Final = 0x40000000
#: How long a named holder may take to show the stop the fence sent it.
FENCE_SETTLE: Final = 1.0


def peer_inode(inode: int) -> int:
    """The inode of the other end of the Unix socket ``inode`` (0 if none or unknown).

    Asked of the kernel (``sock_diag``, ``UDIAG_SHOW_PEER``): the one place that
    knows which socket a connected Unix socket talks to.
    """

    request = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode,
                          _UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE)  # fmt: skip
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(5.0)
            nl.send(header + request)
            reply = nl.recv(65536)
    except OSError:
        return 0
    if len(reply) < 32:
        return 0
    length, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR or kind != _SOCK_DIAG_BY_FAMILY or length > len(reply):
        return 0
    if struct.unpack_from("=I", reply, 20)[0] != inode:
        return 0
    offset = 32  # nlmsghdr (16) + unix_diag_msg (16), then attributes
    while offset + 4 <= length:
        size, attr = struct.unpack_from("=HH", reply, offset)
        if size < 4:
            return 0
        if attr == _UNIX_DIAG_PEER and size >= 8:
            return int(struct.unpack_from("=I", reply, offset + 4)[0])
        offset += (size + 3) & ~3
    return 0


def _peer_of(sock: socket.socket) -> int:
    """The inode of ``sock``'s other end, asked in the network namespace ``sock`` lives in.

    A Unix socket belongs to the namespace it was made in (an enclave runtime has
    one of its own), and ``sock_diag`` sees only its caller's: the question is
    asked from a thread that entered that namespace (``setns`` moves only the
    calling thread, which ends with the answer).
    """

    inode = os.fstat(sock.fileno()).st_ino
    try:
        netns = int(fcntl.ioctl(sock.fileno(), _SIOCGSKNS))
    except OSError:
        return 0
    try:
        if os.fstat(netns).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
            return peer_inode(inode)
        found: list[int] = []

        def ask() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(netns, _CLONE_NEWNET) == 0:
                found.append(peer_inode(inode))

        worker = threading.Thread(target=ask, name="migsgx-peer-inode", daemon=True)
        worker.start()
        worker.join(10.0)
        return found[0] if found else 0
    finally:
        os.close(netns)


def _holds_socket(pid: int, inode: int) -> bool:
    """Whether process ``pid`` has a descriptor of the socket ``inode``."""

    return _proc.holds(pid, f"socket:[{inode}]")


def is_enclave_runtime(pid: int) -> bool:
    """Whether ``pid`` is an enclave runtime process (its command line says so).

    Without this check a forged holder entry would have root write a frame
    into any process's socket.
    """

    return b"migsgx.enclave.runtime" in _proc.argv(pid)


def take_held(holders: object, hung: dict[int, int] | None = None) -> dict[int, socket.socket]:
    """The connections the recorded enclaves hold, by their position in ``holders``.

    ``holders`` is the journal's list of ``[pid, fd, start, nonce]`` (``nonce``:
    hex, the hold's; an older tool's entries have none).  An entry that is
    malformed, names a process that is gone, reused (another start time) or not
    an enclave runtime, or a descriptor that is not a Unix stream socket whose
    other end that process holds, is left out (nothing is written to it).  So
    is one whose enclave says the duplicate it holds now is not the one of that
    nonce (``__mig_held``): its number was let go (the application had its
    connection back) and names a later migration's duplicate, or nothing;
    that is logged, and nothing else is written to it.  One that does not
    answer that question within the bound (:mod:`.enclave_ask`: stopped, or
    busy, its connection open) is left out too, and its position and pid go
    into ``hung``: neither dead nor another hold's, the caller reports it.
    """

    taken: dict[int, socket.socket] = {}
    for index, item in enumerate(holders if isinstance(holders, list) else []):
        if not (isinstance(item, list) and len(item) in (3, 4)):
            continue
        pid, fd, start = item[:3]
        nonce = _nonce(item[3]) if len(item) == 4 else b""
        if not (isinstance(pid, int) and isinstance(fd, int) and isinstance(start, str)):
            continue
        if isinstance(pid, bool) or isinstance(fd, bool) or not 0 < pid < 1 << 31 > fd >= 0:
            continue  # (pidfd_getfd's ints: a bigger number names no process, no descriptor)
        if len(item) == 4 and not nonce:
            continue
        if not start or start_time(pid) != start or not is_enclave_runtime(pid):
            continue
        with contextlib.suppress(OSError):
            sock = take_descriptor(pid, fd)
            if not _is_own_connection(sock, pid):
                sock.close()
                continue
            if nonce and not _is_this_hold(sock, pid, fd, nonce, index, hung):
                sock.close()
                continue
            taken[index] = sock
    return taken


def _nonce(value: object) -> bytes:
    try:
        nonce = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return b""
    return nonce if 0 < len(nonce) <= 64 else b""


def _is_this_hold(
    sock: socket.socket, pid: int, fd: int, nonce: bytes, index: int, hung: dict[int, int] | None
) -> bool:
    """Whether enclave ``pid`` says the duplicate it holds now came with ``nonce``
    (a hung one goes into ``hung``: :func:`take_held`)."""

    asked = ask(sock, "__mig_held", [nonce])
    msg = asked.msg
    if msg is not None and msg["t"] == "ret":
        return True
    if asked.state == "hung":
        log.warning("%s: not taken back", not_answering(index, pid, "__mig_held"))
        if hung is not None:
            hung[index] = pid
        return False
    why = f"{msg.get('code')}: {msg.get('message')}" if msg is not None else "it is gone"
    log.warning("enclave process %d holds no duplicate of the recorded migration at "
                "descriptor %d (%s): left alone", pid, fd, why)  # fmt: skip
    return False


def _is_own_connection(sock: socket.socket, pid: int) -> bool:
    """A Unix stream socket whose other end the enclave process ``pid`` holds itself."""

    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return False
    peer = _peer_of(sock)
    return peer != 0 and _holds_socket(pid, peer)


def dead_holders(holders: list[object]) -> list[int]:
    """Positions of ``holders`` whose enclave process is gone (or its pid reused since).

    For ``migsgx recover`` with the tool and the guardian dead: such an enclave
    cannot be taken back, and its state went with it.  An entry that is
    malformed or names a live enclave is not dead (it is left as it is).
    """

    dead = []
    for index, item in enumerate(holders):
        if not (isinstance(item, list) and len(item) >= 3):
            continue
        pid, start = item[0], item[2]
        if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0):
            continue
        if isinstance(start, str) and start and (start_time(pid) != start or not _proc.alive(pid)):
            dead.append(index)  # (a zombie is dead too)
    return dead


def eof_socket() -> socket.socket:
    """A connection whose other end is closed: what the application gets for a dead
    enclave, so that it sees an end of file there, as in a crash of that enclave."""

    ours, theirs = socket.socketpair()
    theirs.close()
    return ours


def connection_holders(inodes: set[int]) -> dict[int, list[int]]:
    """Every live process that holds a descriptor of one of the sockets ``inodes``, by inode.

    One scan of every process of this pid namespace (root's view, where a child
    whose parent exited is no longer in its application's tree but still holds
    the connection it inherited).  Processes that end meanwhile are passed over.
    """

    links = {f"socket:[{inode}]": inode for inode in inodes}
    found: dict[int, list[int]] = {}
    for pid in _proc.pids():
        for _, link in _proc.fd_links(pid):
            inode = links.get(link)
            if inode is not None and pid not in found.setdefault(inode, []):
                found[inode].append(pid)
    return {inode: [p for p in pids if _proc.alive(p)] for inode, pids in found.items()}


def watch_holders(
    socks: Sequence[socket.socket], holders: object, app_pid: int | None
) -> list[int]:
    """Before a given-back source tree continues: each source enclave is told who holds
    its connection now (``__mig_watch``, ``docs/spec/channels.md`` 7.1); the
    positions of those that took the set.

    ``socks``: the application's ends of the enclaves' connections (the tool's
    own, or taken back from the enclaves), in the order of ``holders`` (the
    journal's ``[pid, fd, start, nonce]``).  Each set: ``app_pid`` first if it
    lives (it takes the connection back with ``resume``), then every other
    process that holds the connection (:func:`connection_holders`) but the
    enclave itself (it holds the duplicate), this process and a guardian (they
    hold it to hand it back), at most :data:`~migsgx.channel.HOLD_WATCHED`.  A
    process forked after the hold that kept the connection is named from now
    on, and one named with the hold that closed it since is not: the enclave
    follows the processes that really hold it.

    Passed over, its hold keeping the set it had: an entry without a nonce (an
    older tool's), a connection whose other end the recorded enclave process
    does not hold (asked of the kernel, ``sock_diag``: nothing is written to
    another process), an empty set (nobody to watch: the caller lets it go),
    and an enclave that refuses (another hold's, committed) or does not answer
    within the bound (said on the log).  Every enclave is asked at once, with
    one deadline for all (:mod:`.watch_ask`), and the fence is looked at once
    for all: a hung enclave costs one bound, not one per enclave.  Never
    raises: the source is given back whatever this finds.
    """

    wanted: dict[int, tuple[int, socket.socket, int, bytes]] = {}
    entries = holders if isinstance(holders, list) else []
    for index, (sock, item) in enumerate(zip(socks, entries, strict=False)):
        if not (isinstance(item, list) and len(item) == 4):
            continue
        pid, nonce = item[0], _nonce(item[3])
        if not nonce or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            continue
        with contextlib.suppress(OSError):
            if _is_own_connection(sock, pid):
                wanted[os.fstat(sock.fileno()).st_ino] = (index, sock, pid, nonce)
    if not wanted:
        return []
    found = connection_holders(set(wanted))
    first = [app_pid] if app_pid is not None and app_pid > 0 and _proc.alive(app_pid) else []
    sets = {
        inode: first + [
            pid for pid in found.get(inode, [])
            if pid not in first and pid not in (enclave, os.getpid()) and not _is_guardian(pid)
        ]
        for inode, (_, _, enclave, _) in wanted.items()
    }  # fmt: skip
    running = set(_running(sorted({p for named in sets.values() for p in named} - set(first))))
    asks: list[Ask] = []
    for inode, (index, sock, enclave, nonce) in wanted.items():
        stuck = [pid for pid in sets[inode] if pid in running]
        if stuck:
            # Its calls share the stream with ours: our frame written into one of its
            # own, half written, would put the connection out of step.  (The
            # application's own process is not asked: its runtime handed the connection
            # over with ``prepare`` and calls nothing on it until ``resume``.)
            log.warning("enclave %d keeps the holders named with its hold (process %d holds "
                        "its connection and is not stopped)", index, stuck[0])  # fmt: skip
            continue
        if sets[inode]:
            asks.append((index, sock, enclave, nonce, sets[inode][:HOLD_WATCHED]))
    return tell_all(asks)


def _running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that can run, given :data:`FENCE_SETTLE` to stop: a stop sent
    a moment ago (the fence's SIGSTOP queued while CRIU still held the tree) shows
    only once the process takes it."""

    deadline = time.monotonic() + FENCE_SETTLE
    while True:
        running = [pid for pid in pids if not _fenced(pid)]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.01)


def _fenced(pid: int) -> bool:
    """Whether ``pid`` cannot run now: gone, stopped (a signal, a tracer) or in a frozen
    cgroup (the containers' freezer, either cgroup version)."""

    if _proc.state(pid) in ("", "T", "t", "Z", "X"):
        return True
    try:
        return Freezer.of_pid(pid).state() == "FROZEN"
    except ContainerError:  # (no freezer, or gone meanwhile)
        return not _proc.alive(pid)


def _is_guardian(pid: int) -> bool:
    return b"migsgx.agent.guardian" in _proc.argv(pid)


def watch_recorded(socks: Sequence[socket.socket], journals: list[str], app_pid: int) -> None:
    """:func:`watch_holders` with the holds the tool's journal records (the guardian's,
    which has the connections and the journal's path, not its fields)."""

    from .journal import Journal  # lazy: the guardian starts fast

    for path in journals[:1]:
        try:
            holders = Journal.load(Path(path)).holders
        except (MigSGXError, OSError, ValueError) as exc:
            log.warning("the holds in %s cannot be read: %s", Path(path).name, exc)
            return
        if socks and _proc.alive(app_pid):
            watch_holders(socks, holders, app_pid)
