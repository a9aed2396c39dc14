"""Descriptors taken from another process (``pidfd_getfd``), for recovery after a crash.

A process that holds the only other reference to a connection can hand it on
after the holder died: root (``CAP_SYS_PTRACE``) takes a duplicate of its
descriptor.  The platform service does so to serve the enclaves of an earlier
service again; ``migsgx recover --checkpoint`` to reach a source enclave whose
checkpoint tool and guardian both died (the enclave holds a duplicate of its
own driver end for that, ``docs/spec/checkpoint.md``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator
from typing import Final

from . import _proc

__all__ = ["take_descriptor", "tcp_connections"]

_SYS_PIDFD_GETFD: Final = 438  # the same number on every architecture since Linux 5.6


def take_descriptor(pid: int, fd: int) -> socket.socket:
    """A duplicate of descriptor ``fd`` of process ``pid`` (``pidfd_getfd``: root only).

    An :class:`OSError` for numbers out of the kernel's ``int`` range (read from
    a record: no process, no descriptor), never ``OverflowError`` or ctypes'.
    """

    if not 0 < pid < 1 << 31:
        raise OSError(errno.ESRCH, f"no process {pid}")
    if not 0 <= fd < 1 << 31:
        raise OSError(errno.EBADF, f"no descriptor {fd}")
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        got = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(pidfd)
    try:
        return socket.socket(fileno=got)
    except OSError:  # (not a socket)
        os.close(got)
        raise


def tcp_connections(pid: int) -> Iterator[socket.socket]:
    """A duplicate of each connected TCP socket of process ``pid``, one at a time.

    What is done to a duplicate (a shutdown, a socket option) is done to the
    process's own connection; each duplicate is closed once the caller goes on
    (the process's own stays open).  Descriptors closed meanwhile are passed
    over; ``OSError`` when the process's descriptors cannot be listed (it ended).
    """

    for fd, link in _proc.fd_links(pid, gone_ok=False):
        if not link.startswith("socket:"):
            continue
        try:
            sock = take_descriptor(pid, fd)
        except OSError:
            continue  # closed meanwhile
        try:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            try:
                sock.getpeername()  # (a connection, not a listener)
            except OSError:
                continue
            yield sock
        finally:
            sock.close()
