"""Which file a listening Unix socket is bound to, as the kernel knows it (``sock_diag``).

A socket's own answer (``getsockname``) is the address it was bound with, a
string: in another mount namespace, or at a lookalike path, it names another
file than ours.  The kernel's ``NETLINK_SOCK_DIAG`` answers for a socket by its
inode (``unix_diag_req`` with ``UDIAG_SHOW_VFS`` and ``UDIAG_SHOW_NAME``) with the
device and inode of the file it is bound to, which :func:`bound_file` compares
with the file at a path (``st_dev``, ``st_ino``) before the platform service
adopts a listener a keeper gives back (:mod:`.keepers`).

The layouts are those of ``linux/sock_diag.h`` and ``linux/unix_diag.h``: a
netlink header, then ``unix_diag_req`` (family, protocol, pad, states, inode,
show flags, cookie); the answer is ``unix_diag_msg`` and attributes, of which
``UNIX_DIAG_NAME`` (the address) and ``UNIX_DIAG_VFS`` (inode, device) are read.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["BoundFile", "bound_file", "same_file"]

_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 0x1
_NLMSG_ERROR: Final = 2
_UDIAG_SHOW_NAME: Final = 0x1
_UDIAG_SHOW_VFS: Final = 0x2
_UNIX_DIAG_NAME: Final = 0
_UNIX_DIAG_VFS: Final = 1
_NO_COOKIE: Final = 0xFFFFFFFF
_NLMSGHDR: Final = struct.Struct("=IHHII")
_REQ: Final = struct.Struct("=BBHIII2I")
_MSG: Final = struct.Struct("=BBBBI2I")
_ATTR: Final = struct.Struct("=HH")
_VFS: Final = struct.Struct("=II")
_SEQ: Final = 0x6D73


@dataclass(frozen=True)
class BoundFile:
    """The file a Unix socket is bound to: its address, and the kernel's device and inode
    (device as ``st_dev`` has it; inode cut to 32 bits, as ``unix_diag_vfs`` carries it)."""

    name: str
    dev: int
    ino: int


def bound_file(sock: socket.socket) -> BoundFile | None:
    """The file ``sock`` is bound to, by the kernel's word; None if it is bound to none
    (unbound, abstract).  ``OSError`` if the kernel does not answer (no ``unix_diag``)."""

    ino = os.fstat(sock.fileno()).st_ino
    request = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino & 0xFFFFFFFF,
                        _UDIAG_SHOW_NAME | _UDIAG_SHOW_VFS, _NO_COOKIE, _NO_COOKIE)  # fmt: skip
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), _SOCK_DIAG_BY_FAMILY,
                            _NLM_F_REQUEST, _SEQ, 0)  # fmt: skip
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5.0)
        nl.sendto(header + request, (0, 0))
        reply = nl.recv(65536)
    return _parse(reply, ino & 0xFFFFFFFF)


def _parse(reply: bytes, ino: int) -> BoundFile | None:
    if len(reply) < _NLMSGHDR.size:
        raise OSError("sock_diag: a short answer")
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(reply)
    body = reply[_NLMSGHDR.size : length]
    if kind == _NLMSG_ERROR:
        err = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
        raise OSError(err, f"sock_diag: {os.strerror(err) if err else 'error'}")
    if kind != _SOCK_DIAG_BY_FAMILY or len(body) < _MSG.size:
        raise OSError(f"sock_diag: an unexpected answer (type {kind})")
    family, _type, _state, _pad, got_ino, _c0, _c1 = _MSG.unpack_from(body)
    if family != socket.AF_UNIX or got_ino != ino:
        raise OSError("sock_diag: the answer is about another socket")
    name, vfs = None, None
    offset = _MSG.size
    while offset + _ATTR.size <= len(body):
        size, attr = _ATTR.unpack_from(body, offset)
        if size < _ATTR.size:
            break
        value = body[offset + _ATTR.size : offset + size]
        if attr == _UNIX_DIAG_NAME:
            name = os.fsdecode(value.split(b"\0", 1)[0]) if value[:1] != b"\0" else None
        elif attr == _UNIX_DIAG_VFS and len(value) >= _VFS.size:
            vfs = _VFS.unpack_from(value)
        offset += (size + 3) & ~3
    if vfs is None or name is None:
        return None
    vfs_ino, kernel_dev = vfs
    # The kernel's dev_t (major << 20 | minor), as userspace's st_dev encodes it.
    return BoundFile(name, os.makedev(kernel_dev >> 20, kernel_dev & 0xFFFFF), vfs_ino)


def same_file(bound: BoundFile | None, st: os.stat_result) -> bool:
    """Whether ``bound`` is the file ``st`` describes."""

    return bound is not None and (bound.dev, bound.ino) == (st.st_dev, st.st_ino & 0xFFFFFFFF)
