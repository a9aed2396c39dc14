"""Where an incoming migration's CRIU images go on the destination: the work directory,
or RAM (``agent serve --images-in-ram``) when it has room.

The agent receives CRIU's images of the process (its pages: as much as the
process's memory) and restores from them a moment later.  By default they go
to the session's directory in the work directory (the disk's file system):
there the kernel may write them back and drop them under memory pressure.
With ``--images-in-ram`` they go to ``/dev/shm``, in a directory named as the
tool's are (``migsgx-dump-PID-START-XXXXXXXX``, PID the agent's), so that
whoever outlives a killed agent removes it by the same sweep
(:func:`~.dumpdirs.sweep_dump_dirs`: every tool at its start, ``migsgx
recover``, the agent at its own start).  Measured (docs/benchmarks.md, "The
destination's images: removed after the answer; RAM or disk"): no faster at
1 GiB, slower at 4 GiB, where the tmpfs pinned the images while the restore
allocated as much again and the kernel reclaimed directly; hence not the
default.

RAM only with room: a tmpfs holds its pages until the files go (there is no
swap to push them to, and they cannot be written back as a disk's dirty pages
can), and the restore that reads them allocates as much again for the tree.
So the file system's free space and the memory available must both exceed
twice what the source announced in ``begin`` (``memory_bytes``: the resident
anonymous and shared memory of its tree, about its pages; untrusted: a lie
only moves the images between RAM and the work directory), plus the memory
the destination enclaves allocate (the ``memory_size`` of each enclave that
``begin`` announces: their runtimes take it on this host while the images
sit in RAM), plus a margin; else the images go to the work directory, and
the log says why.  A tool of control protocol version 1 announces no
``memory_bytes``: with nothing to check the room against, its images go to
the work directory.  With
``--keep-images`` they always do (kept files belong on the disk).  The
session's records (:mod:`.held`) stay in the work directory in every case: a
restarted agent finds them there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

from .dumpdirs import make_dump_dir, scratch_base

__all__ = [
    "MARGIN",
    "fs_type",
    "images_room",
    "memory_available",
    "place_images",
    "resident_bytes",
    "room_needed",
]

log = logging.getLogger("migsgx.agent")

#: Room kept free beyond the announced memory: the other images, and everyone else.
MARGIN: Final = 256 << 20


def memory_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The kernel's estimate of memory available without swapping (bytes; 0 if unknown)."""

    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def images_room(base: Path) -> int:
    """Bytes the images may take in ``base``: its free space, bounded by available memory
    (a tmpfs is RAM); 0 when ``base`` is not a tmpfs (then it is no RAM to prefer)."""

    if not _is_tmpfs(base):
        return 0
    try:
        st = os.statvfs(base)
    except OSError:
        return 0
    return min(st.f_bavail * st.f_frsize, memory_available())


def fs_type(path: Path) -> str:
    """The type of the file system that holds ``path`` ("tmpfs", "ext4"; "" if unknown)."""

    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return ""
    # The longest mount point that holds ``path`` decides; its type follows " - ".
    best, kind = "", ""
    target = os.path.realpath(path)
    for fields in mounts:
        if "-" not in fields or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best) and fields.index("-") + 1 < len(fields):
            best, kind = point, fields[fields.index("-") + 1]
    return kind


def _is_tmpfs(path: Path) -> bool:
    return fs_type(path) == "tmpfs"


def place_images(
    session_dir: Path,
    memory_bytes: int | None,
    *,
    enclave_bytes: int = 0,
    in_ram: bool,
    tag: str,
) -> Path:
    """The directory for one incoming migration's images (see the module).

    ``session_dir``: the session's own directory in the work directory (the
    fallback); ``memory_bytes``: what the source announced (None: nothing, a
    tool of protocol version 1); ``enclave_bytes``: the memory the destination
    enclaves allocate.
    """

    if not in_ram:
        return session_dir
    if memory_bytes is None:
        log.warning(
            "migration %s: the images go to the work directory %s (disk): the tool "
            "announced no memory size (control protocol version 1), no room to check",
            tag, session_dir,
        )  # fmt: skip
        return session_dir
    base = scratch_base()
    need = room_needed(memory_bytes, enclave_bytes)
    room = images_room(base)
    if room < need:
        log.warning(
            "migration %s: the images go to the work directory %s (disk): %s has room for "
            "%d MiB, the process announced %d MiB (twice that, + %d MiB of enclaves, "
            "+%d MiB margin)",
            tag, session_dir, base, room >> 20, max(0, memory_bytes) >> 20,
            max(0, enclave_bytes) >> 20, MARGIN >> 20,
        )  # fmt: skip
        return session_dir
    try:
        placed = make_dump_dir()
    except OSError as exc:
        log.warning(
            "migration %s: the images go to the work directory %s: %s: %s",
            tag, session_dir, base, exc,
        )  # fmt: skip
        return session_dir
    log.info(
        "migration %s: the images go to %s (RAM): room for %d MiB, the process announced "
        "%d MiB, its enclaves %d MiB",
        tag, placed, room >> 20, max(0, memory_bytes) >> 20, max(0, enclave_bytes) >> 20,
    )  # fmt: skip
    return placed


def room_needed(memory_bytes: int, enclave_bytes: int = 0) -> int:
    """RAM the images may take only if this much is free: the images and the tree
    restored from them (twice the announced memory), the destination enclaves'
    memory, and :data:`MARGIN`.  Negative announcements count 0."""

    return 2 * max(0, memory_bytes) + max(0, enclave_bytes) + MARGIN


def resident_bytes(pids: list[int]) -> int:
    """Source side: the resident anonymous and shared memory of ``pids`` (bytes), about
    what CRIU's pages of them will take; a process that is gone counts 0."""

    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(("RssAnon:", "RssShmem:")):
                try:
                    total += int(line.split()[1]) * 1024
                except (IndexError, ValueError):
                    pass
    return total
