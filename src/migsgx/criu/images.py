"""Reading CRIU's image files, just enough to tell what a checkpoint holds.

A CRIU image is a 32-bit magic (two for most images: the common magic, then
the image's own), then entries, each a 32-bit little-endian length and a
protobuf message.  Only a few messages are read here, and only the fields
named below (``images/pstree.proto``, ``images/core.proto`` and
``images/creds.proto`` of CRIU): the process tree (pid, parent, threads), each
task's command name (``migsgx inspect``), and each thread's credentials, which
CRIU gives the restored thread (a destination checks them against what it
grants: ``migsgx.containers.admission``).  The messages are declared at run
time and parsed by the ``protobuf`` library; fields not declared are skipped
by it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ..errors import InspectError

__all__ = [
    "CORE_MAGIC",
    "CREDS_MAGIC",
    "MNTS_MAGIC",
    "PSTREE_MAGIC",
    "Credentials",
    "Mount",
    "command_of",
    "credentials_of",
    "entries",
    "mounts_of",
    "process_tree",
    "undelete_external",
]

IMG_COMMON_MAGIC: Final = 0x54564319
IMG_SERVICE_MAGIC: Final = 0x55105940
PSTREE_MAGIC: Final = 0x50273030
CORE_MAGIC: Final = 0x55053847
CREDS_MAGIC: Final = 0x54023547  # a task's credentials in a file of their own (old format)
MNTS_MAGIC: Final = 0x55563928
#: CRIU's ``fstype`` enumeration (``images/mnt.proto``), the kinds named here.
FSTYPES: Final = {
    0: "unsupported", 1: "proc", 2: "sysfs", 3: "devtmpfs", 4: "binfmt_misc", 5: "tmpfs",
    6: "devpts", 7: "simfs", 8: "pstore", 9: "securityfs", 10: "fusectl", 11: "debugfs",
    12: "cgroup", 13: "aufs", 14: "mqueue", 15: "fuse", 16: "auto", 17: "overlay",
    18: "autofs", 19: "tracefs", 23: "cgroup2",
}  # fmt: skip
MAX_ENTRY: Final = 16 << 20
_U32: Final = struct.Struct("<I")


def _messages() -> dict[str, Any]:
    """The two message classes, declared as CRIU's .proto files declare those fields."""

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="migsgx_criu_subset.proto", package="criu")

    def message(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        m = proto.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name

    opt, rep = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message("pstree_entry", [
        ("pid", 1, f.TYPE_UINT32, opt, ""),
        ("ppid", 2, f.TYPE_UINT32, opt, ""),
        ("pgid", 3, f.TYPE_UINT32, opt, ""),
        ("sid", 4, f.TYPE_UINT32, opt, ""),
        ("threads", 5, f.TYPE_UINT32, rep, ""),
    ])  # fmt: skip
    message("task_core_entry", [("comm", 6, f.TYPE_STRING, opt, "")])
    message("creds_entry", [
        ("uid", 1, f.TYPE_UINT32, opt, ""),
        ("gid", 2, f.TYPE_UINT32, opt, ""),
        ("euid", 3, f.TYPE_UINT32, opt, ""),
        ("cap_inh", 9, f.TYPE_UINT32, rep, ""),
        ("cap_prm", 10, f.TYPE_UINT32, rep, ""),
        ("cap_eff", 11, f.TYPE_UINT32, rep, ""),
        ("cap_bnd", 12, f.TYPE_UINT32, rep, ""),
        ("lsm_profile", 15, f.TYPE_STRING, opt, ""),
        ("lsm_sockcreate", 16, f.TYPE_STRING, opt, ""),
        ("apparmor_data", 17, f.TYPE_BYTES, opt, ""),
        ("cap_amb", 19, f.TYPE_UINT32, rep, ""),
    ])  # fmt: skip
    message("mnt_entry", [
        ("fstype", 1, f.TYPE_UINT32, opt, ""),
        ("mnt_id", 2, f.TYPE_UINT32, opt, ""),
        ("parent_mnt_id", 4, f.TYPE_UINT32, opt, ""),
        ("root", 6, f.TYPE_STRING, opt, ""),
        ("mountpoint", 7, f.TYPE_STRING, opt, ""),
        ("source", 8, f.TYPE_STRING, opt, ""),
        ("ext_mount", 13, f.TYPE_BOOL, opt, ""),
        ("fsname", 14, f.TYPE_STRING, opt, ""),
        ("deleted", 16, f.TYPE_BOOL, opt, ""),
        ("ext_key", 18, f.TYPE_STRING, opt, ""),
    ])  # fmt: skip
    message("thread_core_entry", [("creds", 10, f.TYPE_MESSAGE, opt, ".criu.creds_entry")])
    message("core_entry", [
        ("tc", 3, f.TYPE_MESSAGE, opt, ".criu.task_core_entry"),
        ("thread_core", 5, f.TYPE_MESSAGE, opt, ".criu.thread_core_entry"),
    ])  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"criu.{name}"))
        for name in ("pstree_entry", "core_entry", "creds_entry", "mnt_entry")
    }


_CLASSES: dict[str, Any] = {}


def _cls(name: str) -> Any:
    if not _CLASSES:
        _CLASSES.update(_messages())
    return _CLASSES[name]


def entries(data: bytes, magic: int, what: str) -> Iterator[bytes]:
    """The entries of a CRIU image whose own magic is ``magic``."""

    if len(data) < 8:
        raise InspectError(f"{what}: truncated CRIU image ({len(data)} bytes)")
    first, second = _U32.unpack_from(data, 0)[0], _U32.unpack_from(data, 4)[0]
    if first not in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC) or second != magic:
        raise InspectError(f"{what}: not a CRIU image of the expected kind")
    at = 8
    while at < len(data):
        if at + 4 > len(data):
            raise InspectError(f"{what}: truncated entry header at byte {at}")
        (size,) = _U32.unpack_from(data, at)
        at += 4
        if size > MAX_ENTRY or at + size > len(data):
            raise InspectError(f"{what}: entry of {size} bytes at byte {at} runs past the end")
        yield data[at : at + size]
        at += size


def _parse(name: str, raw: bytes, what: str) -> Any:
    msg = _cls(name)()
    try:
        msg.ParseFromString(raw)
    except Exception as exc:  # the library's DecodeError, and nothing of ours
        raise InspectError(f"{what}: undecodable entry: {exc}") from exc
    return msg


def process_tree(data: bytes) -> list[dict[str, Any]]:
    """``pstree.img`` -> [{"pid", "ppid", "threads"}] in CRIU's order (the root first)."""

    out = []
    for raw in entries(data, PSTREE_MAGIC, "pstree.img"):
        msg = _parse("pstree_entry", raw, "pstree.img")
        out.append({"pid": msg.pid, "ppid": msg.ppid, "threads": len(msg.threads) or 1})
    if not out:
        raise InspectError("pstree.img holds no process")
    return out


def command_of(data: bytes, what: str) -> str:
    """The command name (``comm``) in a task's ``core-PID.img``."""

    for raw in entries(data, CORE_MAGIC, what):
        return str(_parse("core_entry", raw, what).tc.comm)
    raise InspectError(f"{what}: no entry")


@dataclass(frozen=True)
class Credentials:
    """What CRIU gives a restored thread: ``capabilities`` by number, every set together."""

    capabilities: frozenset[int]
    lsm_profile: str
    lsm_sockcreate: str
    apparmor_data: bool


def credentials_of(data: bytes, what: str) -> Credentials | None:
    """The credentials in a thread's ``core-TID.img``; ``None`` when it carries none.

    Without them CRIU takes a task's credentials from an image of their own
    (``creds-PID.img``, the old format) or, older still, leaves the thread with
    CRIU's own (root's): a reader that checks them must refuse both.
    """

    for raw in entries(data, CORE_MAGIC, what):
        core = _parse("core_entry", raw, what)
        if not core.HasField("thread_core") or not core.thread_core.HasField("creds"):
            return None
        creds = core.thread_core.creds
        caps: set[int] = set()
        for words in (creds.cap_inh, creds.cap_prm, creds.cap_eff, creds.cap_bnd, creds.cap_amb):
            for i, word in enumerate(words):
                caps.update(32 * i + bit for bit in range(32) if word >> bit & 1)
        return Credentials(
            capabilities=frozenset(caps),
            lsm_profile=str(creds.lsm_profile),
            lsm_sockcreate=str(creds.lsm_sockcreate),
            apparmor_data=bool(creds.apparmor_data),
        )
    raise InspectError(f"{what}: no entry")


@dataclass(frozen=True)
class Mount:
    """One mount of a mount namespace's image, as CRIU will make it again."""

    mnt_id: int
    parent: int
    fstype: str  # FSTYPES' name; "auto": CRIU mounts ``fsname`` from ``source``
    fsname: str
    root: str
    mountpoint: str
    source: str
    external: bool  # CRIU binds what its caller maps for ``ext_key`` (the engine's bind mounts)
    ext_key: str = ""
    #: Its source was gone at the dump (a bind of a file since removed or replaced).
    deleted: bool = False


def mounts_of(data: bytes, what: str) -> list[Mount]:
    """The mounts in a ``mnt-ID.img``, in CRIU's order."""

    out = []
    for raw in entries(data, MNTS_MAGIC, what):
        m = _parse("mnt_entry", raw, what)
        out.append(
            Mount(
                mnt_id=m.mnt_id,
                parent=m.parent_mnt_id,
                fstype=FSTYPES.get(m.fstype, f"fstype {m.fstype}"),
                fsname=str(m.fsname),
                root=str(m.root),
                mountpoint=str(m.mountpoint),
                source=str(m.source),
                external=bool(m.ext_mount or m.ext_key),
                ext_key=str(m.ext_key),
                deleted=bool(m.deleted),
            )
        )
    return out


def undelete_external(data: bytes, key: str, what: str) -> bytes | None:
    """A ``mountpoints-ID.img`` whose external mount ``key`` is no longer marked deleted;
    ``None`` when no such mount is marked (nothing to change).

    CRIU marks a bind mount deleted when its source was gone at the dump, and at
    the restore makes a file where the mount's source is to be (``O_EXCL``), binds
    it and removes it afterwards (``mount-v2.c``).  For an external mount the
    source is what the caller maps for ``key`` on this host, which is there:
    unmarked, CRIU binds it as it is.  Every other field of every entry is kept
    as it came (the protobuf library keeps the fields not declared here).
    """

    head, out, changed = data[:8], [], False
    for raw in entries(data, MNTS_MAGIC, what):
        m = _parse("mnt_entry", raw, what)
        if m.ext_key == key and m.deleted:
            m.ClearField("deleted")
            raw, changed = m.SerializeToString(), True
        out.append(_U32.pack(len(raw)) + raw)
    return head + b"".join(out) if changed else None
