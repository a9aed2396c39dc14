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
--detach``: the container exists with every task stopped (held).  What becomes
of that bundle later (reclaimed, removed by a restarted agent, discarded) is
:mod:`.runc_bundles`.

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
from .runc_bundles import OWNER_MARK, _HeldBundles, _restored, _same_file
from .runc_cli import Runc
from .runc_lazy import LazyCheckpoint, dump_lazy

__all__ = ["RUNC_CONFIG", "RUNC_ROOTFS", "Runc", "RuncDriver", "engine_note", "own_netns_path"]

log = logging.getLogger("migsgx.containers")

RUNC_CONFIG: Final = "migsgx-runc-config.json"
RUNC_ROOTFS: Final = "migsgx-runc-rootfs.tar"


class RuncDriver(_HeldBundles):
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
