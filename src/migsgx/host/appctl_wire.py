"""The messages of the application control (:mod:`.appctl`), as both ends check them.

Its schema (:data:`APPCTL`), frames that carry descriptors (an enclave's
connection rides with ``SCM_RIGHTS`` on a frame's header), and the plain-data
form of what travels with each connection: the enclave's identity and its
image.  The application (:mod:`.appctl`) and the migration tool
(:mod:`migsgx.agent.applink`) both read a peer's message through these checks.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from ..errors import ConnectionClosedError, FrameError, ProtocolError
from ..wire import HEADER, Schema, decode_body, encode, recv_exactly
from .client import EnclaveInfo

__all__ = [
    "APPCTL",
    "APPCTL_FRAME_MAX",
    "MAX_ENCLAVES",
    "check_image_files",
    "close_fds",
    "info_from_wire",
    "info_to_wire",
    "recv_frame_fds",
    "send_frame_fds",
]

APPCTL_FRAME_MAX: Final = 64 << 20  # a prepare answer carries the enclave images
MAX_ENCLAVES: Final = 64

NUMBER = (int, float)

APPCTL = Schema(
    "appctl",
    {
        # migration tool or agent -> application
        "prepare": {"timeout": NUMBER},
        "side": {},  # live migration: a side channel per enclave, ECALLs go on
        "resume": {},
        "attach": {"enclaves": list},  # the destination enclaves' infos, one per descriptor
        "status": {},
        # application -> caller
        "prepared": {"enclaves": list},  # [{"info": {...}, "image_files": {...}}]
        "ok": {"enclaves": int},
        "state": {"pid": int, "enclaves": int, "handed_over": bool},
        "err": {"code": str, "message": str},
    },
)


# --- frames with descriptors ------------------------------------------------------------
def send_frame_fds(
    sock: socket.socket, msg: Mapping[str, Any], fds: Sequence[int] = (), *, max_size: int
) -> None:
    data = encode(msg, max_size=max_size)
    if fds:
        # The descriptors ride on the 4-byte header, in a message of its own.
        socket.send_fds(sock, [data[: HEADER.size]], list(fds))
        sock.sendall(data[HEADER.size :])
    else:
        sock.sendall(data)


def recv_frame_fds(
    sock: socket.socket, schema: Schema, *, max_size: int, max_fds: int = MAX_ENCLAVES
) -> tuple[dict[str, Any], list[int]]:
    """One frame and the descriptors that came with it (the caller owns them)."""

    header = b""
    fds: list[int] = []
    try:
        while len(header) < HEADER.size:
            data, got, flags, _ = socket.recv_fds(sock, HEADER.size - len(header), max_fds)
            fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise FrameError("too many descriptors with one frame")
            if not data:
                if not header:
                    raise ConnectionClosedError("peer closed the connection")
                raise FrameError("connection closed inside a frame header")
            header += data
        (length,) = HEADER.unpack(header)
        if length > max_size:
            raise FrameError(f"frame of {length} bytes exceeds the cap of {max_size}")
        return decode_body(recv_exactly(sock, length), schema), fds
    except BaseException:
        close_fds(fds)
        raise


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


_INFO_FIELDS: Final = (
    ("pid", int),
    ("mr_enclave", bytes),
    ("mr_signer", bytes),
    ("isv_prod_id", int),
    ("isv_svn", int),
    ("debug", bool),
    ("memory_size", int),
    ("thread_slots", int),
)


def info_to_wire(info: EnclaveInfo) -> dict[str, Any]:
    """An :class:`~migsgx.host.client.EnclaveInfo` as plain data."""

    out = {name: getattr(info, name) for name, _ in _INFO_FIELDS}
    out["ecalls"] = list(info.ecalls)
    return out


def info_from_wire(data: Any) -> dict[str, Any]:
    """Check the plain-data form of an enclave info; returns the keyword arguments."""

    if not isinstance(data, dict):
        raise ProtocolError("enclave info is not a map")
    out: dict[str, Any] = {}
    for name, kind in _INFO_FIELDS:
        value = data.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(f"enclave info field {name!r} is missing or has a wrong type")
        out[name] = value
    ecalls = data.get("ecalls")
    if not isinstance(ecalls, list) or not all(isinstance(e, str) for e in ecalls):
        raise ProtocolError("enclave info field 'ecalls' must be a list of names")
    out["ecalls"] = tuple(ecalls)
    if set(data) - {name for name, _ in _INFO_FIELDS} - {"ecalls"}:
        raise ProtocolError("enclave info has unexpected fields")
    return out


def check_image_files(files: Any) -> dict[str, bytes]:
    """An enclave image as ``{file name: bytes}``; refuses anything else."""

    if not isinstance(files, dict) or not files:
        raise ProtocolError("image files must be a non-empty map")
    for name, data in files.items():
        if not isinstance(name, str) or not isinstance(data, bytes):
            raise ProtocolError("image files must map names to bytes")
    return dict(files)
