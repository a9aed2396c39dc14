"""A committed container source whose tool is gone: its engine record, ended as after a success.

The journal keeps the driver's engine note (:mod:`.engine_notes`).  The
guardian or ``migsgx recover`` (:func:`migsgx.agent.source_host.end_committed`)
kills the fenced tree and thaws its cgroup; then each record here that is
still the source's is removed through its engine, as the driver's own
``remove`` after :func:`~.frozen.end_frozen` would: ``runc delete`` (and a
bundle this host's agent made), ``podman rm`` (and podman's runc state),
``ctr`` task and container delete.  A record is the source's only while its
engine names the fenced tree (its root pid, fenced with its start time) or
no live task, *and* it is the same record: runc's from the same bundle,
podman's with the same container id, containerd's created at the same time.
A container of that name made or brought back since is never touched.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ..errors import ProtocolError
from .base import check_name
from .engine_notes import engine_records
from .settings import ContainerSettings

if TYPE_CHECKING:
    from .containerd import Ctr
    from .podman import Podman
    from .runc_cli import Runc

__all__ = ["CommittedRecord", "committed_records"]

#: ``criu`` on PATH: removing a container never runs CRIU.
_CRIU: Final = Path("criu")
#: podman's states of a container without a live task.
_PODMAN_ENDED: Final = frozenset({"exited", "stopped"})


@dataclass(frozen=True)
class CommittedRecord:
    """One engine record a journal names (``kind``: runc, podman, containerd)."""

    kind: str
    fields: dict[str, str]

    @property
    def label(self) -> str:
        return f"{self.kind} container {self.fields.get('name') or self.fields['id']}"

    def ours(self, fenced: Collection[int]) -> bool:
        """Whether the engine still shows this record as the committed source."""

        f = self.fields
        if self.kind == "runc":
            state = self._runc().state(f["id"])
            if state is None or str(state.get("bundle")) != f["bundle"]:
                return False
            return int(state.get("pid") or 0) in fenced or state.get("status") == "stopped"
        if self.kind == "podman":
            info = self._podman().inspect(f["name"])
            if info is None or str(info.get("Id")) != f["id"]:
                return False
            state = info.get("State") or {}
            return int(state.get("Pid") or 0) in fenced or state.get("Status") in _PODMAN_ENDED
        if not Path(f["address"]).exists():
            return False  # no containerd there (ctr would wait 10 s to say so)
        ctr = self._ctr()
        info = ctr.info(f["id"])
        if info is None or str(info.get("CreatedAt")) != f["created"]:
            return False
        task = ctr.task(f["id"])
        return task is None or task[0] in fenced or task[1] == "STOPPED"

    def remove(self) -> None:
        """Remove the record through its engine (the tree is dead or dies of a queued kill)."""

        f = self.fields
        if self.kind == "runc":
            self._runc().delete(f["id"])
            if f["made"]:
                # Restored here by an agent of this host: a bundle left would refuse its return.
                shutil.rmtree(f["made"], ignore_errors=True)
        elif self.kind == "podman":
            self._podman().remove(f["name"])
        else:
            self._ctr().remove(f["id"])

    # (each engine's client is imported when a record of it is met: ``migsgx recover``
    # imports this module, and its start counts, docs/benchmarks.md)
    def _runc(self) -> Runc:
        from .runc_cli import Runc

        return Runc(Path(self.fields["root"]) if self.fields["root"] else None, _CRIU)

    def _podman(self) -> Podman:
        from .podman import Podman

        root, storage = self.fields["root"], self.fields["storage"]
        settings = ContainerSettings(
            podman_root=Path(root) if root else None, podman_storage_driver=storage or None
        )
        return Podman(settings, _CRIU)

    def _ctr(self) -> Ctr:
        from .containerd import Ctr

        settings = ContainerSettings(
            containerd_address=Path(self.fields["address"]),
            containerd_namespace=self.fields["namespace"],
        )
        return Ctr(settings, _CRIU)


def committed_records(notes: Iterable[str]) -> list[CommittedRecord]:
    """The engine records a journal's undo notes name (a damaged note is skipped, and
    one whose container name or id is not one: it goes on an engine's command line)."""

    found = []
    for kind, fields in engine_records(notes):
        try:
            check_name(fields.get("name", fields["id"]))
            check_name(fields["id"], "container id")
        except ProtocolError:
            continue
        found.append(CommittedRecord(kind, fields))
    return found
