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
can), and the restore that reads them allocates the tree's memory meanwhile.
So the file system's free space and the memory available must both exceed
what the restore holds at its peak (:func:`room_needed`): the images, as
many times over as the driver copies them before its engine reads them
(:data:`IMAGE_COPIES`: podman's archive is unpacked and packed again; with the
images spent, :data:`SPENT_COPIES`: each copy goes once the next is made, so
podman holds two at most, one through its restore), and
the tree restored from them, counted from what the source announced in
``begin`` (``memory_bytes``: the resident anonymous and shared memory of its
tree, and its locked memory once more; untrusted: a lie only moves the images
between RAM and the work directory), plus the memory the destination
enclaves allocate (the ``memory_size`` of each enclave that ``begin``
announces: their runtimes take it on this host while the images sit in RAM),
plus a margin; else the images go to the work directory, and the log says why.

A restore that spends its images (:func:`restore_spends`: a process tree of one
task, restored by CRIU with ``auto_dedup``) holds the tree's memory twice only
for what CRIU's restorer has read and not yet punched out: it reads each
mapping in steps of at most :data:`SPEND_STEP` and punches each step out of the
pages image as soon as it is read, so at its peak the images and the tree
together take the announced memory plus one step.  Two exceptions, both kept
safe: a mapping CRIU maps locked is populated at its ``mmap``, before any of its
pages are read (so the source announces its locked memory once more), and a
private mapping that a task shares with its parent is read by CRIU itself, in
one read per run of pages, before it is punched (so a tree of several tasks
counts its memory twice, as does every restore that cannot spend: another
driver, ``--no-spend-images``, post-copy).  A restore that cannot spend never
starts short of room for both copies.  A tool of control protocol version 1
announces no ``memory_bytes``: with nothing to check the room against, its
images go to the work directory.  With ``--keep-images`` they always do (kept
files belong on the disk).  The session's records (:mod:`.held`) stay in the
work directory in every case: a restarted agent finds them there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

from .dumpdirs import make_dump_dir, scratch_base

__all__ = [
    "IMAGE_COPIES",
    "MARGIN",
    "SPEND_STEP",
    "SPENT_COPIES",
    "fs_type",
    "images_room",
    "memory_available",
    "place_images",
    "resident_bytes",
    "restore_spends",
    "room_needed",
]

log = logging.getLogger("migsgx.agent")

#: Room kept free beyond the announced memory: the other images, and everyone else.
MARGIN: Final = 256 << 20
#: What CRIU's restorer reads of a mapping before it punches that much out of the pages
#: image (``AUTO_DEDUP_OVERHEAD_BYTES``, ``criu/pie/restorer.c``, CRIU 4.2): with the
#: images spent, at most this much of the tree is held twice at a time.
SPEND_STEP: Final = 128 << 20
#: How many copies of the images each driver's restore holds at once in its directory
#: when it keeps them all: runc's and CRIU's restore read them where they are;
#: containerd's packs them into a tar and that into a checkpoint image beside them;
#: podman's unpacks the archive and packs it again.  A driver not named here: the most.
IMAGE_COPIES: Final = {"pid": 1, "runc": 1, "containerd": 3, "podman": 3}
#: The same for a restore that spends its copies (:mod:`migsgx.containers.spent`: each
#: goes once the next is made): (the most held at once before the engine restores,
#: held through its restore).  podman: the archive and its unpacked tree, then the tree
#: and the archive packed again; the latter through ``podman container restore``.
#: containerd: the pages and their tar, then the tar and the checkpoint image, which
#: goes once imported (containerd's content store holds it then, outside the directory).
SPENT_COPIES: Final = {"containerd": (2, 0), "podman": (2, 1)}


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
    driver: str = "",
    spends: bool = False,
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
    copies = IMAGE_COPIES.get(driver, max(IMAGE_COPIES.values()))
    held = None
    if spends and driver in SPENT_COPIES:
        copies, held = SPENT_COPIES[driver]
    need = room_needed(
        memory_bytes, enclave_bytes, copies=copies, held=held, spends=spends and held is None
    )
    room = images_room(base)
    if room < need:
        log.warning(
            "migration %s: the images go to the work directory %s (disk): %s has room for "
            "%d MiB, the restore needs %d MiB (the process announced %d MiB: %d cop%s of "
            "its images and %s, + %d MiB of enclaves, +%d MiB margin)",
            tag, session_dir, base, room >> 20, need >> 20, max(0, memory_bytes) >> 20,
            copies, "y" if copies == 1 else "ies",
            f"{SPEND_STEP >> 20} MiB being spent" if spends and held is None
            else f"the tree beside {held} of them" if held is not None else "the tree",
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
        "migration %s: the images go to %s (RAM): room for %d MiB, the restore needs %d MiB "
        "(the process announced %d MiB, its enclaves %d MiB%s)",
        tag, placed, room >> 20, need >> 20, max(0, memory_bytes) >> 20,
        max(0, enclave_bytes) >> 20, ", the images spent" if spends else "",
    )  # fmt: skip
    return placed


def room_needed(
    memory_bytes: int,
    enclave_bytes: int = 0,
    *,
    copies: int = 1,
    spends: bool = False,
    held: int | None = None,
) -> int:
    """RAM the images may take only if this much is free: the larger of ``copies`` of
    the images (the announced memory each: the most held at once) and ``held`` of them
    (default ``copies``: those held through the restore) with the tree restored from
    them (the announced memory; with ``spends``, what is held twice while it is
    spent: at most :data:`SPEND_STEP`); plus the destination enclaves' memory and
    :data:`MARGIN`.  Negative announcements count 0."""

    memory = max(0, memory_bytes)
    tree = min(memory, SPEND_STEP) if spends else memory
    most = max(1, copies)
    through = most if held is None else max(0, min(held, most))
    return max(most * memory, through * memory + tree) + max(0, enclave_bytes) + MARGIN


def restore_spends(driver: str, tasks: int, *, spend_images: bool, post_copy: bool) -> bool:
    """Whether the restore spends its images as it reads them (see the module): the pid
    driver's CRIU with ``auto_dedup`` (``spend_images``: the agent's setting), not
    post-copy, a tree of one task (``tasks``: the pids ``begin`` lists); or a driver
    of :data:`SPENT_COPIES`, which removes each copy once the next is made."""

    if not spend_images or post_copy:
        return False
    return driver in SPENT_COPIES or (driver == "pid" and tasks == 1)


def resident_bytes(pids: list[int]) -> int:
    """Source side: the resident anonymous and shared memory of ``pids`` (bytes), about
    what CRIU's pages of them will take, and their locked memory once more (CRIU maps a
    locked mapping populated before it reads its pages: the destination holds it twice
    even when the images are spent); a process that is gone counts 0."""

    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(("RssAnon:", "RssShmem:", "VmLck:")):
                try:
                    total += int(line.split()[1]) * 1024
                except (IndexError, ValueError):
                    pass
    return total
