"""A podman store as test and benchmark hosts use it: emptied, and given an image."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .podman import Podman

__all__ = ["remove_all", "share_image"]


def remove_all(podman: Podman) -> None:
    """Every container and image of this podman's store (test and benchmark hosts)."""

    podman("rm", "--all", "--force", "--time", "0", what="podman rm --all", check=False)
    podman("rmi", "--all", "--force", what="podman rmi --all", check=False)


def share_image(source: Podman, destination: Podman, image: str, scratch: Path) -> None:
    """Copy ``image`` from one host's store to another's, keeping its id (as a registry does)."""

    archive = scratch / "image.tar"
    try:
        source("save", "--output", str(archive), image, what=f"podman save {image}")
        destination("load", "--input", str(archive), what=f"podman load {image}")
    finally:
        with contextlib.suppress(OSError):
            archive.unlink()
