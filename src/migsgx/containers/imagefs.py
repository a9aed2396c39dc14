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
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from .base import DumpPlan

__all__ = ["ImageFs", "cuttable_images"]

log = logging.getLogger("migsgx.containers")

MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_REMOUNT: Final = 0x20
MNT_DETACH: Final = 0x2
#: How often a shrink is tried again when CRIU wrote more between the look and the remount.
SHRINK_TRIES: Final = 50


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


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
        if _libc().mount(b"migsgx-images", os.fsencode(self.path), b"tmpfs",
                         MS_NOSUID | MS_NODEV, b"mode=0700") != 0:  # fmt: skip
            err = ctypes.get_errno()
            raise OSError(err, f"mount tmpfs on {self.path}: {os.strerror(err)}")
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
            if libc.mount(b"migsgx-images", os.fsencode(self.path), b"tmpfs", flags, size) == 0:
                return 1
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # (EINVAL: it grew since the look; again)
                raise OSError(err, f"shrink the tmpfs on {self.path}: {os.strerror(err)}")
        return 0

    def unmount(self) -> None:
        if self.mounted and _libc().umount2(os.fsencode(self.path), MNT_DETACH) == 0:
            self.mounted = False


@contextlib.contextmanager
def cuttable_images(plan: DumpPlan) -> Iterator[ImageFs]:
    """For the engine's dump in this block: a cancel fills its image directory up
    (while :meth:`ImageFs.engine_dumps`).

    Only where it is safe and useful: the plan says the directory is the tool's
    own scratch space (removed after the migration), it is empty, the dump has a
    cancel and no page server, and the process may mount (root).
    """

    fs = ImageFs(plan.images)
    if (
        plan.cancel is not None
        and plan.scratch_images
        and plan.page_server is None
        and not plan.lazy
        and os.geteuid() == 0
        and not any(plan.images.iterdir())
    ):
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
