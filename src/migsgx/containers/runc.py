"""The ``runc`` driver: an OCI container run by runc, checkpointed with ``runc checkpoint``.

Source: the container's cgroup is frozen, then ``runc checkpoint
--leave-running`` dumps it (CRIU sees the cgroup frozen and leaves it so), so
the source cannot run between the checkpoint and the commit, and rolling back
is thawing it.  Established TCP connections are dumped (``--tcp-established``)
and restored closed.  Besides CRIU's images the destination gets the bundle's
``config.json`` and the root file system's contents as a tar.  runc's page
server has no TLS, so the pages travel with the other images over the agent's
TLS channel: never unauthenticated.  Post-copy (``DumpPlan.lazy``) is
:mod:`.runc_lazy`: ``runc checkpoint --lazy-pages`` served in CRIU's own TLS,
``runc restore --lazy-pages`` on the destination.

Destination: a bundle under ``STATE/agent/runc/<id>``: the root file system
unpacked, the configuration localized (:func:`~.oci.localize`: this host's
platform socket, network namespace and cgroup parent; CRIU's configuration
file with ``leave-stopped`` and ``tcp-close``; then this host's allow list,
:mod:`.admission`, before the bundle is written), then ``runc restore
--detach``: the container exists with every task stopped (held).

Network: a container that joined its host's network namespace (a ``path``
in its configuration) restores into the destination host's namespace, which
is up and addressed.  A container whose ``path`` names a pod namespace of its
own holding one of the host's ``pod_addresses`` owns that address
(:mod:`.podnet`): the address moves with it (the target's ``net``), and by
default its established TCP connections too (dumped with
``--tcp-established``, restored open): the source locks the pod's network
before the freeze and gives the address up after the commit; the
destination takes it (only if it is one of its own ``pod_addresses``) in a
namespace of its own before CRIU restores into it.  A container with a
network namespace of its own gets a fresh one from CRIU, with ``lo`` down:
the driver brings ``lo`` up before the engine resumes the container.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Final

from ..errors import MigSGXError, ProtocolError
from . import engine_notes as notes
from . import owner as _owner
from . import podnet
from .admission import SpecPolicy
from .base import (
    ContainerError,
    DumpPlan,
    HostConfig,
    Restored,
    RestoreRequest,
    Source,
    check_name,
    thaw_first,
)
from .command import bring_lo_up
from .frozen import dump_frozen, own_netns_path, stop_if_cancelled, write_criu_config
from .image_admission import admit_images, localize_images
from .imagefs import ImageFs, cuttable_images
from .oci import (
    Localization,
    extract_tree,
    joined_host_netns,
    load_json,
    localize,
    same_netns,
    tar_tree,
)
from .runc_cli import Runc
from .runc_lazy import LazyCheckpoint, dump_lazy

__all__ = ["RUNC_CONFIG", "RUNC_ROOTFS", "Runc", "RuncDriver", "engine_note", "own_netns_path"]

log = logging.getLogger("migsgx.containers")

RUNC_CONFIG: Final = "migsgx-runc-config.json"
RUNC_ROOTFS: Final = "migsgx-runc-rootfs.tar"
#: In a bundle restore made: the session it was made for, until the container is resumed.
OWNER_MARK: Final = "migsgx-owner"


class RuncDriver:
    name: ClassVar[str] = "runc"

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        self.runc = Runc(host.settings.runc_root, host.criu.binary)

    def uses_page_server(self, page_tls: bool) -> bool:
        return not page_tls  # runc's page server has no TLS: pages go over the agent channel

    # --- source -------------------------------------------------------------------------
    def locate(self, target: str) -> Source:
        cid = check_name(target, "container id")
        state = self.runc.state(cid)
        if state is None:
            raise ContainerError(f"no runc container {cid}")
        if state.get("status") != "running":
            raise ContainerError(f"runc container {cid} is {state.get('status')}, not running")
        bundle = Path(str(state["bundle"]))
        source = Source(
            root=int(state["pid"]),
            target={"id": cid},
            label=f"runc container {cid}",
            private={"bundle": bundle, "rootfs": Path(str(state["rootfs"]))},
        )
        source.spec = load_json(bundle / "config.json", "runc configuration")
        self._own_address(source, source.spec)
        return source

    def _own_address(self, source: Source, config: Mapping[str, Any]) -> None:
        """Note the address the container owns, if it runs in a pod namespace holding one."""

        path = netns_path(config)
        if path is None:
            source.no_tcp_keep = "it has a network namespace of its own that no address moves with"
            return
        host = self.host.settings.netns
        if same_netns(path) or (host is not None and _same_file(path, host)):
            return  # it joined its host's namespace: the default note says so
        pod = podnet.inspect(path)
        if pod is None or not podnet.allowed(pod, self.host.settings.pod_addresses):
            source.no_tcp_keep = (
                f"its network namespace {path} holds no address of this host's pod_addresses"
            )
            return
        source.private["pod"] = path
        source.target["net"] = pod.to_dict()
        source.no_tcp_keep = ""

    def dump(self, source: Source, plan: DumpPlan, on_dumped: Callable[[], None]) -> None:
        cid = source.target["id"]
        pod: Path | None = source.private.get("pod")
        tcp = plan.tcp_close or plan.tcp_keep

        def copy_files() -> None:
            stop_if_cancelled(plan)
            shutil.copyfile(source.private["bundle"] / "config.json", plan.images / RUNC_CONFIG)
            tar_tree(
                source.private["rootfs"], plan.images / RUNC_ROOTFS,
                stop=lambda: stop_if_cancelled(plan),
            )  # fmt: skip

        images: list[ImageFs] = []

        def checkpoint() -> None:
            with images[0].engine_dumps() if images else contextlib.nullcontext():
                self.runc.checkpoint(
                    cid, plan.images, page_server=plan.page_server, tcp_established=tcp
                )
            copy_files()

        def start_lazy() -> LazyCheckpoint:
            # (the engine names the address and port: runc wants both, not 0)
            assert plan.page_server is not None and all(plan.page_server)
            args = self.runc.checkpoint_args(
                cid, plan.images, page_server=plan.page_server, tcp_established=tcp,
                lazy_pages=True,
            )  # fmt: skip
            return LazyCheckpoint(self.runc.argv(*args), plan.images, tls=plan.page_tls)

        def dump(unlock: Callable[[], object] | None) -> None:
            # Should this tool end before it removes the source (in doubt after the
            # commit), the guardian or ``migsgx recover`` ends it the same way.
            made = self._bundle_made_here(cid)
            plan.note(engine_note(self.runc, cid, source.private["bundle"], made))
            if plan.lazy:
                dump_lazy(source, plan, on_dumped, start=start_lazy, copy_files=copy_files,
                          remove=remove, unlock=unlock)  # fmt: skip
            else:
                # runc's CRIU writes its images here: a failed enclave stream fills the
                # directory up, so that CRIU's own error path ends the dump at once.
                with cuttable_images(plan) as fs:
                    images.append(fs)
                    dump_frozen(source, plan, on_dumped, checkpoint=checkpoint, remove=remove,
                                unlock=unlock)  # fmt: skip

        def remove() -> None:
            made = self._bundle_made_here(cid)
            try:
                self.runc.delete(cid)
            finally:
                if made is not None:
                    # An agent of this host restored it from this bundle; it moved on, and
                    # a bundle left behind would refuse its next arrival here.
                    shutil.rmtree(made, ignore_errors=True)
                if pod is not None:
                    podnet.give_up(pod)  # the address now lives on the destination only

        if pod is None:
            dump(None)
            return
        # The lock comes before the freeze: while the application still runs it accepts
        # what reached its listeners, and nothing new can reach them.
        plan.note(f"netup {pod}")
        podnet.lock(pod)
        try:
            dump(lambda: podnet.unlock(pod))
        except BaseException:
            # (dump_frozen unlocks once frozen; this covers a failure before the freeze)
            if plan.may_resume():
                with contextlib.suppress(MigSGXError):
                    podnet.unlock(pod)
            raise

    # --- destination ----------------------------------------------------------------------
    def check_target(self, target: Mapping[str, Any]) -> dict[str, Any]:
        if "id" not in target or not set(target) <= {"id", "net"}:
            raise ProtocolError("a runc target is {'id': CONTAINER_ID[, 'net': ADDRESS]}")
        checked: dict[str, Any] = {"id": check_name(target["id"], "container id")}
        if "net" in target:
            # The source says the container owns an address: take only one of ours.
            pod = podnet.PodAddress.from_peer(target["net"])
            settings = self.host.settings
            if settings.pod_bridge is None:
                raise ContainerError(
                    f"refused: the container owns {pod.address} but this host has no "
                    "pod_bridge for containers that own their address"
                )
            if not podnet.allowed(pod, settings.pod_addresses):
                raise ContainerError(
                    f"refused: {pod.address} is not one of this host's pod_addresses"
                )
            checked["net"] = pod.to_dict()
        if shutil.which("runc") is None:
            raise ContainerError("runc is not installed on this host")
        return checked

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

    def _localization(self, cid: str, netns: Path | None, criu_config: Path) -> Localization:
        """What this host puts into container ``cid``'s configuration (``netns``: the one
        it joins here, ``None`` for one of its own)."""

        settings = self.host.settings
        return Localization(
            platform_socket=self.host.platform_socket,
            netns=netns,
            cgroups_path=f"{settings.cgroup_parent}/{cid}" if settings.cgroup_parent else None,
            criu_config=criu_config,
            engine_in_netns=netns is not None,  # runc runs there (see restore)
            policy=SpecPolicy.from_settings(settings),
            root_path="rootfs",
        )

    def admit_spec(self, target: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
        cid = str(target["id"])
        settings = self.host.settings
        netns: Path | None = None
        if "net" in target:  # the pod namespace restore makes (an address it owns)
            netns = podnet.NETNS_DIR / podnet.pod_netns_name(settings.pod_netns_prefix, cid)
        elif joined_host_netns(spec):
            netns = settings.netns or own_netns_path()
        localize(spec, self._localization(cid, netns, self.bundles() / cid / "criu-restore.conf"))

    def restore(self, request: RestoreRequest) -> Restored:
        cid = self.check_target(request.target)["id"]
        if self.runc.state(cid) is not None:
            raise ContainerError(f"a runc container {cid} exists on this host")
        config = load_json(request.images / RUNC_CONFIG, "runc configuration")
        bundle = self.bundles() / cid
        self.bundles().mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            bundle.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise ContainerError(f"a bundle for {cid} exists on this host: {bundle}") from exc
        # Which session made this bundle (and the container run from it): a restarted
        # agent removes only what this mark proves its restore made (remove_made).
        # (whole or not at all: a mark cut short by a crash would name no session)
        _owner.write(bundle / OWNER_MARK, request.owner, f"runc container {cid}")
        criu_config = bundle / "criu-restore.conf"
        made = False
        pod: Path | None = None
        try:
            (bundle / "rootfs").mkdir(mode=0o755)
            extract_tree(request.images / RUNC_ROOTFS, bundle / "rootfs")
            write_criu_config(criu_config, tcp_close=request.tcp_close,
                              tcp_established="net" in request.target)  # fmt: skip
            settings = self.host.settings
            joined = joined_host_netns(config)
            netns = (settings.netns or own_netns_path()) if joined else None
            if "net" in request.target:
                assert settings.pod_bridge is not None  # (check_target)
                pod = podnet.take(
                    podnet.pod_netns_name(settings.pod_netns_prefix, cid),
                    podnet.PodAddress.from_peer(request.target["net"]),
                    settings.pod_bridge,
                    locked=True,  # until the commit: see Restored.before_resume
                )
                netns, joined = pod, True
            spec = localize(config, self._localization(cid, netns, criu_config))
            admit_images(request.images, spec)
            localize_images(request.images, spec)
            (bundle / "config.json").write_text(json.dumps(spec, indent=1))
            if request.before is not None:
                request.before(request.images)
            made = True
            # CRIU puts a container whose namespace it saw as its own at the dump into its
            # own namespace at the restore: run it in the one the container must join.
            runc = self.runc
            if netns is not None and not same_netns(netns):
                runc = Runc(runc.root, runc.criu, prefix=["nsenter", f"--net={netns}"])
            runc.restore(cid, bundle, request.images, request.images,
                         lazy_pages=request.lazy_pages)  # fmt: skip
            if request.made is not None:
                request.made()
            state = self.runc.state(cid)
            if state is None:
                raise ContainerError(f"runc restored {cid} but does not know it")
            pid = int(state["pid"])
            if not joined:
                bring_lo_up(pid)
        except BaseException:
            if made:
                with contextlib.suppress(MigSGXError):
                    self.runc.delete(cid)
            shutil.rmtree(bundle, ignore_errors=True)
            if pod is not None:
                podnet.give_up(pod)
            raise
        finally:
            with contextlib.suppress(OSError):
                criu_config.unlink()  # a later checkpoint of this container must not see it
        return _restored(cid, pid, bundle, pod)

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


def engine_note(runc: Runc, cid: str, bundle: Path, made: Path | None) -> str:
    """The guardian's ``runc`` note: which runc record a committed source leaves.

    ``migsgx recover`` (or the guardian) of a migration that ended in doubt
    deletes it once the destination runs (:mod:`.committed`), and the bundle too
    if an agent of this host made it.
    """

    return notes.engine_note("runc", id=cid, root=str(runc.root or ""), bundle=str(bundle),
                             made=str(made or ""))  # fmt: skip


def netns_path(config: Mapping[str, Any]) -> Path | None:
    """The network namespace a container's configuration names by path, if any."""

    for ns in (config.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return Path(ns["path"]) if ns.get("path") else None
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev)
