"""The socket keeper: holds the platform service's listening socket across a restart.

A container that bind-mounts the platform socket *file* (``--volume SOCKET:...``,
as SGX deployments mount aesmd's) holds that inode; a service that binds a new
socket after a restart is out of its reach.  So the socket must outlive the
service, as a systemd socket unit's does (``LISTEN_FDS``; its file descriptor
store for a service's own sockets; s6's fd holder): the service that binds the
socket starts this small process, in a session of its own and no child of
the service (a shell starts it in the background and exits), holding a duplicate
of the listener and nothing else of the service.  Connections made while no
service runs queue on the listener; a restarted service takes the same socket
back and accepts them.

Descriptors (numbers on the command line, so a restarted service finds them):

- ``--listener``: the listening socket; never accepted on here.
- ``--control``: a channel to the service that runs.  The keeper says
  ``HELLO`` and its pid on it once it holds the socket, so that the service
  knows it started (and watches it: :mod:`.keepers` starts a new one when it
  ends).  ``END`` (the service ends for good: SIGTERM, Ctrl-C) closes the
  listener and ends the keeper; end of file (the service died: ``kill -9``, a
  crash) makes it wait for the next one.
- ``--reserve`` / ``--reserve-peer``: both ends of a socket pair, as each
  enclave holds one.  A restarted service (root, or the same user) takes a
  duplicate of the peer end out of this process (``pidfd_getfd``) and sends
  ``TAKE``; the keeper answers ``GIVE`` with the listener (SCM_RIGHTS) and the
  socket file's device and inode, puts a fresh pair at the same numbers for the
  restart after, and the channel becomes its control channel.

Nothing keeps a dead service's socket for ever: without a service the keeper
gives the socket up after ``--keep-for`` seconds, or at once when the socket's
path no longer names the file it held (removed, or replaced).  It then closes
the listener (queued connections are reset) and leaves the file as a crash
does; the next service binds a fresh socket.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import stat
import struct
import time
from typing import Final

MODULE: Final = "migsgx.sgx.keeper"
TAKE: Final = b"T"
GIVE: Final = b"L"
END: Final = b"E"
HELLO: Final = b"K"
#: ``HELLO``, then the keeper's pid (little endian): it started and holds the socket.
HELLO_LAYOUT: Final = struct.Struct("<cI")
#: ``GIVE``, then the socket file's ``st_dev`` and ``st_ino`` (little endian).
GIVE_LAYOUT: Final = struct.Struct("<cQQ")
#: How often a keeper without a service looks at the socket's path.
_POLL: Final = 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--listener", type=int, required=True)
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--reserve", type=int, required=True)
    parser.add_argument("--reserve-peer", type=int, required=True)
    parser.add_argument("--socket-tag", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--keep-for", type=float, required=True)
    args = parser.parse_args(argv)
    try:
        held = _file_of(args.path)
    except OSError:
        return 1
    control: socket.socket | None = socket.socket(fileno=args.control)
    _hello(socket.socket(fileno=os.dup(args.control)))
    while control is not None:
        if _follow(control):
            break  # END: the service ended for good
        control.close()
        control = _wait_for_successor(args, held)
    if control is not None:
        control.close()
    os.close(args.listener)
    return 0


def _hello(control: socket.socket) -> None:
    """Say the service that the socket is held, and by whom (it watches this pid)."""

    with control:
        try:
            control.sendall(HELLO_LAYOUT.pack(HELLO, os.getpid()))
        except OSError:
            pass  # (the service is gone already: keep the socket for the next one)


def _file_of(path: str) -> tuple[int, int]:
    st = os.stat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} is not a socket")
    return st.st_dev, st.st_ino


def _follow(control: socket.socket) -> bool:
    """Block while the service runs: True on ``END``, False once it is gone."""

    while True:
        try:
            got = control.recv(1)
        except InterruptedError:
            continue
        except OSError:
            return False
        if got == END:
            return True
        if not got:
            return False


def _still_held(path: str, held: tuple[int, int]) -> bool:
    try:
        return _file_of(path) == held
    except OSError:
        return False


def _wait_for_successor(args: argparse.Namespace, held: tuple[int, int]) -> socket.socket | None:
    """The control channel of the service that takes the socket back, or None (given up)."""

    deadline = time.monotonic() + args.keep_for
    reserve = socket.socket(fileno=os.dup(args.reserve))
    while time.monotonic() < deadline and _still_held(args.path, held):
        readable, _, _ = select.select([reserve], [], [], _POLL)
        if readable and _give(reserve, args, held):
            return reserve  # now the channel to the service that took the socket
    reserve.close()
    return None


def _give(reserve: socket.socket, args: argparse.Namespace, held: tuple[int, int]) -> bool:
    """Answer a ``TAKE``: the listener, and a fresh reserve pair for the restart after."""

    try:
        if reserve.recv(1) != TAKE:
            return False
        fresh, fresh_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        socket.send_fds(reserve, [GIVE_LAYOUT.pack(GIVE, *held)], [args.listener])
        # The next restart takes the peer end at the same number again.
        os.dup2(fresh.fileno(), args.reserve)
        os.dup2(fresh_peer.fileno(), args.reserve_peer)
    except OSError:
        return False
    finally:
        fresh.close()
        fresh_peer.close()
    return True


if __name__ == "__main__":
    raise SystemExit(main())
