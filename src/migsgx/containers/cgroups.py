"""The cgroup freezer of a container, and removing cgroups a host left behind.

A container is frozen through its cgroup before its engine checkpoints it
with ``--leave-running``: CRIU records that the cgroup was frozen and leaves
it frozen after the dump, so the source cannot run an instruction between the
checkpoint and the commit, whatever happens to the tool.  Rolling back is
thawing it.  Both cgroup versions: v1 (``freezer.state``) and v2
(``cgroup.freeze``).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Final

from ..errors import MigSGXError
from .base import ContainerError

__all__ = ["CGROUP_ROOT", "Freezer", "remove_cgroup", "thaw_file"]

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
FREEZE_TIMEOUT: Final = 10.0


class Freezer:
    """The freezer of the cgroup a process is in."""

    def __init__(self, control: Path) -> None:
        self.control = control  # freezer.state (v1) or cgroup.freeze (v2)
        self.v2 = control.name == "cgroup.freeze"

    @classmethod
    def of_pid(cls, pid: int) -> Freezer:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError as exc:
            raise ContainerError(f"no process {pid}: {exc}") from exc
        unified: str | None = None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "freezer" in controllers.split(","):
                control = CGROUP_ROOT / "freezer" / path.lstrip("/") / "freezer.state"
                if control.exists():
                    return cls(control)
            if controllers == "":
                unified = path
        if unified is not None:
            for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
                control = base / unified.lstrip("/") / "cgroup.freeze"
                if unified != "/" and control.exists():
                    return cls(control)
        raise ContainerError(f"process {pid} is in no cgroup with a freezer")

    def state(self) -> str:
        """``FROZEN``, ``FREEZING`` or ``THAWED``."""

        try:
            if not self.v2:
                return self.control.read_text().strip()
            if self.control.read_text().strip() == "0":
                return "THAWED"
            events = (self.control.parent / "cgroup.events").read_text().split()
            frozen = dict(zip(events[::2], events[1::2], strict=False)).get("frozen")
            return "FROZEN" if frozen == "1" else "FREEZING"
        except OSError as exc:
            raise ContainerError(f"cannot read {self.control}: {exc}") from exc

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        self._write("1" if self.v2 else "FROZEN")
        deadline = time.monotonic() + timeout
        while self.state() != "FROZEN":
            if time.monotonic() > deadline:
                self.thaw()
                raise ContainerError(f"the cgroup of {self.control.parent} did not freeze")
            time.sleep(0.002)

    def thaw(self) -> None:
        self._write("0" if self.v2 else "THAWED")

    def _write(self, value: str) -> None:
        try:
            self.control.write_text(value)
        except OSError as exc:
            raise ContainerError(f"cannot write {value} to {self.control}: {exc}") from exc


def thaw_file(path: str) -> None:
    """Thaw through a freezer control file named by the tool (used by the guardian)."""

    control = Path(path)
    if control.name not in ("freezer.state", "cgroup.freeze") or not control.is_relative_to(
        CGROUP_ROOT
    ):
        raise MigSGXError(f"not a freezer control file: {path}")
    Freezer(control).thaw()


def remove_cgroup(relative: str) -> list[Path]:
    """Remove cgroup ``relative`` and everything below it in every hierarchy.

    Only empty cgroups can go; returns what could not be removed.
    """

    rel = relative.strip("/")
    if not rel or ".." in rel.split("/"):
        raise ContainerError(f"refusing to remove cgroup {relative!r}")
    bases = [CGROUP_ROOT]
    with contextlib.suppress(OSError):
        bases += [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]
    left: list[Path] = []
    for base in bases:
        top = base / rel
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                left.append(Path(dirpath))
    return left
