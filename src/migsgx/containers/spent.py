"""An incoming migration's copies of its images, each removed once the next is made.

The container engines do not restore from CRIU's images where they arrived:
podman's restore unpacks the archive it received, fits it to this host and
packs it again for ``podman container restore --import``; containerd's packs
CRIU's images into a tar and that into the checkpoint image ``ctr images
import`` reads.  Kept until the session's directory goes, every copy stays
on the destination through the restore, which allocates the restored tree
beside them: three copies of the images for podman, three for containerd, in
RAM when the agent receives its images there (``agent serve
--images-in-ram``).  When the images are read once (``RestoreRequest.
spend_images``: an incoming migration's, with the agent's ``--spend-images``,
the default; never a checkpoint's, nor with ``--keep-images``), the driver
removes each copy as soon as the one made from it is complete
(:func:`spend`), so that at most two are held at once, and one through the
restore (:data:`migsgx.agent.imageroom.IMAGE_COPIES` counts that).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from .base import RestoreRequest

__all__ = ["spend"]


def spend(request: RestoreRequest, path: Path) -> None:
    """Remove ``path`` (a file or a directory tree) when ``request``'s images are read
    once; keep it otherwise.  A path already gone is no error."""

    if not request.spend_images:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
