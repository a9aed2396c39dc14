"""CRIU's images from a peer, checked against the container configuration a destination admitted.

At a restore CRIU gives every thread the credentials its ``core-TID.img``
carries and mounts inside the container what its ``mountpoints-ID.img``
lists, whatever the engine's configuration says.  :func:`admit_images` holds
those to what :func:`~.admission.admit` granted (see that module and
``docs/containers.md``); a refusal is the same :class:`~.admission.SpecRefused`,
naming the image.

:func:`localize_images` is the one change a destination makes to them: the
platform socket's bind mount is this host's socket, whatever the source's
was at the dump (its service restarted since the container started: CRIU saw
the mount's source deleted).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..criu.images import credentials_of, mounts_of, undelete_external
from ..errors import InspectError
from .admission_list import ENGINE_FILESYSTEMS, _list, _mapping, _refuse
from .oci import platform_mount

__all__ = ["CAPABILITY_NUMBERS", "admit_images", "localize_images"]

#: Linux capability numbers (``linux/capability.h``), as CRIU's images carry them.
CAPABILITY_NUMBERS: Final[Mapping[str, int]] = {
    f"CAP_{name}": number
    for number, name in enumerate(
        [
            "CHOWN",
            "DAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "LINUX_IMMUTABLE",
            "NET_BIND_SERVICE",
            "NET_BROADCAST",
            "NET_ADMIN",
            "NET_RAW",
            "IPC_LOCK",
            "IPC_OWNER",
            "SYS_MODULE",
            "SYS_RAWIO",
            "SYS_CHROOT",
            "SYS_PTRACE",
            "SYS_PACCT",
            "SYS_ADMIN",
            "SYS_BOOT",
            "SYS_NICE",
            "SYS_RESOURCE",
            "SYS_TIME",
            "SYS_TTY_CONFIG",
            "MKNOD",
            "LEASE",
            "AUDIT_WRITE",
            "AUDIT_CONTROL",
            "SETFCAP",
            "MAC_OVERRIDE",
            "MAC_ADMIN",
            "SYSLOG",
            "WAKE_ALARM",
            "BLOCK_SUSPEND",
            "AUDIT_READ",
            "PERFMON",
            "BPF",
            "CHECKPOINT_RESTORE",
        ]
    )
}
MAX_CORE_IMAGE: Final = 16 << 20


def _read_image(path: Path, where: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CORE_IMAGE + 1)
    except OSError as exc:
        raise _refuse(where, f"unreadable: {exc}") from exc
    if len(data) > MAX_CORE_IMAGE:
        raise _refuse(where, f"larger than {MAX_CORE_IMAGE} bytes")
    return data


def _image_mounts(path: Path, where: str) -> None:
    """Inside the container CRIU mounts again what the image lists; only the engine's kinds.

    The root (the engine's root file system) and external mounts (CRIU binds
    what the engine maps for them: the configuration's bind mounts, checked by
    :func:`admit`) are the engine's; every other mount must be of a kind an
    engine makes itself, never a disk, ``overlay``, ``debugfs`` or a file
    system CRIU would mount by name.
    """

    try:
        mounts = mounts_of(_read_image(path, where), path.name)
    except InspectError as exc:
        raise _refuse(where, f"unreadable: {exc}") from exc
    ids = {m.mnt_id for m in mounts}
    roots = [m for m in mounts if m.parent not in ids]
    if len(roots) != 1:
        raise _refuse(where, f"{len(roots)} root mounts")
    for m in mounts:
        if m is roots[0] or m.external or m.fstype in ENGINE_FILESYSTEMS:
            continue
        kind = f"{m.fstype} ({m.fsname})" if m.fsname else m.fstype
        raise _refuse(f"{where} {m.mountpoint}", f"a {kind} mount of {m.source!r}: not a kind "
                      "an engine mounts itself")  # fmt: skip


def admit_images(images: Path, spec: Mapping[str, Any]) -> None:
    """Refuse CRIU images that would give the container more than the admitted ``spec`` grants.

    At a restore CRIU gives every thread the credentials its ``core-TID.img``
    carries, and mounts inside the container what its ``mountpoints-ID.img``
    lists, whatever the engine's configuration says: a peer that forged them
    would get a capability or a mount the configuration never listed.  Each
    thread's capabilities (every set) must lie within the configuration's
    bounding set; a thread without credentials in its core image (the old
    format, or none at all: CRIU's own would stay) and AppArmor policy data are
    refused; mounts must be the engine's (:func:`_image_mounts`).
    """

    process = _mapping(spec.get("process"), "process")
    caps = _mapping(process.get("capabilities"), "process.capabilities")
    granted = {CAPABILITY_NUMBERS[c] for c in _list(caps.get("bounding"), "bounding")
               if c in CAPABILITY_NUMBERS}  # fmt: skip
    names = {number: name for name, number in CAPABILITY_NUMBERS.items()}
    for path in sorted(images.iterdir()):
        name = path.name
        where = f"images/{name}"
        if name.startswith("creds-"):
            raise _refuse(where, "credentials in an image of their own (an old format)")
        if name.startswith("mountpoints-") and name.endswith(".img"):
            _image_mounts(path, where)
            continue
        if not (name.startswith("core-") and name.endswith(".img")):
            continue
        try:
            creds = credentials_of(_read_image(path, where), name)
        except InspectError as exc:
            raise _refuse(where, f"unreadable: {exc}") from exc
        if creds is None:
            raise _refuse(where, "the thread carries no credentials (CRIU would keep its own)")
        extra = sorted(creds.capabilities - granted)
        if extra:
            listed = ", ".join(names.get(n, f"capability {n}") for n in extra)
            raise _refuse(f"{where} creds", f"{listed} beyond the configuration's bounding set")
        if creds.apparmor_data:
            raise _refuse(f"{where} creds", "AppArmor policy for the kernel")


def localize_images(images: Path, spec: Mapping[str, Any]) -> list[str]:
    """Point the platform socket's bind mount of CRIU's images at this host's live socket.

    The source's platform service may have ended (SIGTERM) and a new one started
    after the container started: it binds a new socket file (a killed service's is
    kept, :mod:`migsgx.sgx.keeper`), and the container's bind mount keeps the old one,
    removed, so CRIU records the mount as deleted.  At the restore CRIU would then
    make a file where this host's socket is (and fail: it exists), and remove it
    afterwards.  The mount is external (runc maps it by its destination to the
    admitted configuration's source, :func:`~.oci.localize`: this host's socket),
    so it is only unmarked.  ``spec``: the admitted configuration.  The images
    changed, by name.
    """

    found = platform_mount(spec)
    if found is None:
        return []
    key = posixpath.normpath(str(found[0].get("destination", "")))
    changed = []
    for path in sorted(images.glob("mountpoints-*.img")):
        where = f"images/{path.name}"
        try:
            data = undelete_external(_read_image(path, where), key, path.name)
        except InspectError as exc:
            raise _refuse(where, f"unreadable: {exc}") from exc
        if data is not None:
            path.write_bytes(data)
            changed.append(path.name)
    return changed
