"""The bundles the ``runc`` driver (:mod:`.runc`) makes on a destination, and the
containers it holds from them.

A restore makes ``STATE/agent/runc/<id>`` and marks it with the session it
was made for until the container is resumed (:data:`OWNER_MARK`).  From that
mark and the record a held tree leaves, a restarted agent takes a held
container over again (``reclaim``) or removes only what its own restore made
(``remove_made``); a discarded arrival takes its bundle and pod namespace
with it.  The source side asks here too whether the container it moves runs
from a bundle an agent of this host made (then that bundle goes with it).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from . import podnet
from .base import ContainerError, HostConfig, Restored, check_name, thaw_first
from .runc_cli import Runc

__all__ = ["OWNER_MARK"]

#: In a bundle restore made: the session it was made for, until the container is resumed.
OWNER_MARK: Final = "migsgx-owner"


class _HeldBundles:
    """The driver's bundles on this host: where they are, who made them, their end."""

    host: HostConfig
    runc: Runc

    def _bundle_made_here(self, cid: str) -> Path | None:
        """The bundle container ``cid`` runs from, if an agent of this host made it
        (``bundles()/cid``: it arrived by a migration); else ``None``."""

        if self.host.state_dir is None:
            return None
        state = self.runc.state(cid)
        made = self.bundles() / cid
        if state is None or not _same_file(Path(str(state.get("bundle"))), made):
            return None
        return made

    def bundles(self) -> Path:
        if self.host.state_dir is None:
            raise ContainerError("this agent has no state directory for runc bundles")
        return self.host.state_dir / "agent" / "runc"

    def reclaim(self, handle: Mapping[str, Any], pid: int) -> Restored:
        if not set(handle) <= {"id", "bundle", "netns"}:
            raise ContainerError(f"not a runc container's record: {sorted(handle)}")
        cid = check_name(handle.get("id"), "container id")
        bundle = self.bundles() / cid
        pod: Path | None = None
        if handle.get("netns"):
            # (the pod namespace restore took: its name comes from the id, never the record)
            pod = podnet.NETNS_DIR / podnet.pod_netns_name(self.host.settings.pod_netns_prefix, cid)
            if handle["netns"] != str(pod) or not pod.exists():
                raise ContainerError(f"runc container {cid}: its pod namespace {pod} is gone")
        state = self.runc.state(cid)
        if state is None:
            raise ContainerError(f"runc no longer knows container {cid}")
        if int(state.get("pid") or 0) != pid or state.get("status") not in ("running", "paused"):
            raise ContainerError(
                f"runc container {cid} is {state.get('status')} with pid {state.get('pid')}, "
                f"not the held tree (pid {pid})"
            )
        if Path(str(state.get("bundle"))) != bundle or handle.get("bundle") != str(bundle):
            raise ContainerError(f"runc container {cid} is not the one restored from {bundle}")
        held = _restored(cid, pid, bundle, pod)
        if state.get("status") == "paused":
            # Paused while no agent held it: thawed only when a COMMIT resumes it.
            held.before_resume = thaw_first(lambda: self.runc.resume(cid), held.before_resume)
        return held

    def remove_made(self, handle: Mapping[str, Any], owner: str, *, keep_running: bool) -> str:
        cid = self._made_for(check_name(handle.get("id"), "container id"), owner)
        bundle = self.bundles() / cid
        state = self.runc.state(cid)
        if state is not None and keep_running and state.get("status") in ("running", "paused"):
            pid = int(state.get("pid") or 0)
            if pid > 0 and Path(f"/proc/{pid}").exists():
                return f"nothing (runc container {cid} is {state.get('status')}, pid {pid})"
        if not owner or _mark(bundle) != owner:
            raise ContainerError(
                f"runc container {cid}: no bundle {bundle} made for this session and never "
                "resumed: not this agent's to remove"
            )
        if state is not None and Path(str(state.get("bundle"))) != bundle:
            raise ContainerError(f"runc container {cid} runs from another bundle than {bundle}")
        pod = podnet.NETNS_DIR / podnet.pod_netns_name(self.host.settings.pod_netns_prefix, cid)
        removed = [f"the runc container {cid}"] if state is not None else []
        try:
            if state is not None:
                self.runc.delete(cid)
        finally:
            shutil.rmtree(bundle, ignore_errors=True)
            if pod.exists():
                podnet.give_up(pod)  # (its name comes from the id; only restore makes it)
                removed.append(f"its pod namespace {pod.name}")
        return ", ".join([*removed, f"its bundle {bundle}"])

    def _made_for(self, cid: str, owner: str) -> str:
        """``cid``, or else the container whose bundle the mark says a restore made for
        ``owner`` (a record whose name is damaged still finds what its session made)."""

        if not owner or _mark(self.bundles() / cid) == owner:
            return cid
        with contextlib.suppress(OSError):
            for bundle in self.bundles().iterdir():
                if _mark(bundle) == owner:
                    return bundle.name
        return cid

    def discard(self, restored: Restored) -> None:
        cid = str(restored.handle["id"])
        try:
            self.runc.delete(cid)
        finally:
            shutil.rmtree(restored.handle["bundle"], ignore_errors=True)
            if restored.handle.get("netns"):
                podnet.give_up(Path(restored.handle["netns"]))


def _mark(bundle: Path) -> str:
    """The session a bundle was made for while its container is held ("" if none)."""

    try:
        return (bundle / OWNER_MARK).read_text(errors="replace")[:64]
    except OSError:
        return ""


def _restored(cid: str, pid: int, bundle: Path, pod: Path | None) -> Restored:
    """A held runc container; once it is resumed its bundle no longer says who made
    it (a record that names it later, forged or stale, does not remove it)."""

    def before_resume() -> None:
        with contextlib.suppress(OSError):
            (bundle / OWNER_MARK).unlink()
        if pod is not None:
            podnet.open_taken(pod)

    return Restored(
        pid=pid,
        label=f"runc container {cid}",
        handle={"id": cid, "bundle": str(bundle), "netns": str(pod) if pod else ""},
        before_resume=before_resume,
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev)
