"""Cutting an engine's own CRIU dump short: its image directory fills up on a cancel.

``runc checkpoint`` runs CRIU itself and writes the images (pages included) to a
local directory: there is no page connection to shut down
(:mod:`migsgx.criu.cancel`), no notification of CRIU's that the tool answers, and
killing CRIU is never safe (its parasite code may be inside the dumped tasks).
What stops CRIU safely is its own error path: a failed write ends the dump, CRIU
cures the tasks and resumes them, and the engine reports the failure.

So the images go to a tmpfs of their own, mounted on the (empty, the tool's own)
image directory for the dump.  When an enclave stream fails meanwhile, the
cancel shrinks that tmpfs to what is written already: CRIU's next write fails
with ``ENOSPC`` at once, whatever step it is in, instead of the dump running to
its end with the container frozen.  The mount goes when the dump is over (the
images were streamed by then).  Without root, or with a directory that holds
files already, nothing is mounted and the dump is cut at its next step as before.

podman's checkpoint command has its CRIU write into the container's directory in
podman's own storage (``.../userdata/checkpoint``) and packs the images into its
export archive before it returns: that directory gets the same tmpfs for the
command (:func:`cuttable_engine_dir`), so the cut reaches podman's CRIU too, and
no copy of the container's memory stays in podman's storage afterwards.

A tool killed while the mount is up leaves it behind (holding the container's
memory as CRIU wrote it, in RAM, until the next boot): the mount's source names
the tool's pid (``migsgx-images-PID``), and :func:`sweep_leftovers` (the
guardian, ``migsgx recover``) unmounts every one whose tool is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Final

from ..system.process import process_state
from .base import DumpPlan

__all__ = [
    "ImageFs",
    "cuttable_engine_dir",
    "cuttable_images",
    "leftover_mounts",
    "sweep_leftovers",
]

log = logging.getLogger("migsgx.containers")

MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_REMOUNT: Final = 0x20
MNT_DETACH: Final = 0x2
#: How often a shrink is tried again when CRIU wrote more between the look and the remount.
SHRINK_TRIES: Final = 50
#: The mount's source: this prefix and the pid of the tool that mounted it.
SOURCE_PREFIX: Final = "migsgx-images-"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _source() -> bytes:
    return f"{SOURCE_PREFIX}{os.getpid()}".encode()


class ImageFs:
    """A private tmpfs on ``path`` that :meth:`fill` makes full while the engine dumps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False
        self._armed = False

    @contextlib.contextmanager
    def engine_dumps(self) -> Iterator[None]:
        """The engine's CRIU writes here during this block: only then a cancel cuts it
        (a cancel after it ends is the next step's, and says so)."""

        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def mount(self) -> None:
        """Mount on the directory ``path`` names itself, never through a symbolic link.

        The callers look at the directory first (empty, not a link); between that
        look and the mount, whoever may write its parent could put a link there
        and have the tmpfs (the container's memory) land where they chose.  So
        the directory is opened without following a link and the mount goes on
        what was opened; once mounted, it cannot be renamed away.
        """

        try:
            fd = os.open(self.path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY)
        except OSError as exc:
            raise OSError(exc.errno, f"mount tmpfs on {self.path}: {exc.strerror}") from exc
        try:
            if _libc().mount(_source(), f"/proc/self/fd/{fd}".encode(), b"tmpfs",
                             MS_NOSUID | MS_NODEV, b"mode=0700") != 0:  # fmt: skip
                err = ctypes.get_errno()
                raise OSError(err, f"mount tmpfs on {self.path}: {os.strerror(err)}")
        finally:
            os.close(fd)
        self.mounted = True

    def fill(self) -> int:
        """Shrink the tmpfs to what it holds: the next write fails.  1 if done, else 0."""

        if not (self.mounted and self._armed):
            return 0
        libc = _libc()
        for _ in range(SHRINK_TRIES):
            st = os.statvfs(self.path)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
            size = f"mode=0700,size={max(used, st.f_frsize) + st.f_frsize}".encode()
            flags = MS_REMOUNT | MS_NOSUID | MS_NODEV
            if libc.mount(_source(), os.fsencode(self.path), b"tmpfs", flags, size) == 0:
                return 1
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # (EINVAL: it grew since the look; again)
                raise OSError(err, f"shrink the tmpfs on {self.path}: {os.strerror(err)}")
        return 0

    def unmount(self) -> None:
        if self.mounted and _libc().umount2(os.fsencode(self.path), MNT_DETACH) == 0:
            self.mounted = False


@contextlib.contextmanager
def _cut_on_cancel(fs: ImageFs, plan: DumpPlan, mount: bool) -> Iterator[ImageFs]:
    """``fs`` mounted (when ``mount``) for the block, its :meth:`ImageFs.fill` a stop of the
    plan's cancel; unmounted after (its files are gone with it)."""

    if mount and plan.cancel is not None:
        try:
            fs.mount()
        except OSError as exc:
            log.warning("the engine's dump cannot be cut short (%s): it stops later", exc)
        else:
            plan.cancel.add_stop(fs.fill)
    try:
        yield fs
    finally:
        if fs.mounted:
            if plan.cancel is not None:
                plan.cancel.remove_stop(fs.fill)
            fs.unmount()


def _may_cut(plan: DumpPlan) -> bool:
    return plan.cancel is not None and not plan.lazy and os.geteuid() == 0


@contextlib.contextmanager
def cuttable_images(plan: DumpPlan) -> Iterator[ImageFs]:
    """For the engine's dump in this block: a cancel fills its image directory up
    (while :meth:`ImageFs.engine_dumps`).

    Only where it is safe and useful: the plan says the directory is the tool's
    own scratch space (removed after the migration), it is empty, the dump has a
    cancel and no page server, and the process may mount (root).
    """

    mount = (
        _may_cut(plan)
        and plan.scratch_images
        and plan.page_server is None
        and not any(plan.images.iterdir())
    )
    with _cut_on_cancel(ImageFs(plan.images), plan, mount) as fs:
        yield fs


@contextlib.contextmanager
def cuttable_engine_dir(path: Path, plan: DumpPlan) -> Iterator[ImageFs]:
    """For the block: the directory an engine's CRIU writes into inside the engine's own
    storage (podman's ``checkpoint`` beside the container's configuration), a
    tmpfs that a cancel fills up (while :meth:`ImageFs.engine_dumps`).

    The engine reads the images back within its command (podman packs them into
    its export archive), so they go with the mount at the block's end: no copy of
    the container's memory stays in the engine's storage, whether the dump
    succeeded or not.  A directory made here is removed again.  Not over a
    directory that holds files (an earlier checkpoint of someone else's), nor
    over a symbolic link, nor without root: the dump is then cut at its next
    step as before.
    """

    made = False
    mount = _may_cut(plan) and path.parent.is_dir() and not path.parent.is_symlink()
    if mount:
        try:
            path.mkdir(mode=0o700)
            made = True
        except FileExistsError:
            mount = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
        except OSError as exc:
            log.warning("the engine's dump cannot be cut short (%s): it stops later", exc)
            mount = False
    try:
        with _cut_on_cancel(ImageFs(path), plan, mount) as fs:
            yield fs
    finally:
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()


def leftover_mounts(mountinfo: str) -> list[tuple[Path, int]]:
    """(mount point, pid of the tool that mounted it) of each images tmpfs in a
    ``/proc/PID/mountinfo`` text."""

    found: list[tuple[Path, int]] = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 2 or rest[0] != "tmpfs":
            continue
        pid = rest[1].removeprefix(SOURCE_PREFIX)
        if pid == rest[1] or not pid.isdigit():
            continue
        # (the kernel writes a space, tab, newline or backslash in a path as \ooo)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        found.append((Path(point), int(pid)))
    return found


def sweep_leftovers(gone: Collection[int] = ()) -> list[Path]:
    """Unmount the images tmpfs of every tool that is gone (killed mid-dump); their
    directories, empty below the mount (:func:`cuttable_images` mounts only on an
    empty one), go too.  The mount points swept.

    A tool still running (or stopped) keeps its mount: its dump may be under way.
    Except the pids in ``gone``: the caller knows they are past their dump or
    dying (a guardian reads the end of its tool's pipe while the tool exits,
    a moment before the kernel shows it gone).
    """

    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    swept: list[Path] = []
    for point, pid in leftover_mounts(text):
        if pid == os.getpid() or (pid not in gone and process_state(pid) not in ("", "Z", "X")):
            continue
        if _libc().umount2(os.fsencode(point), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            log.warning("cannot unmount a dead tool's images at %s: %s", point, os.strerror(err))
            continue
        with contextlib.suppress(OSError):
            point.rmdir()
        swept.append(point)
    return swept
