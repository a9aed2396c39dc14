"""The ``podman`` driver: ``podman container checkpoint --export`` / ``restore --import``.

Source: as with runc, the container's cgroup is frozen first and the
checkpoint leaves it running (``--leave-running``), so it stays frozen until
the commit, and rolling back is thawing it.  The exported archive (CRIU's
images, the container's configuration and root file system changes) is all
the destination gets, over the agent's TLS channel; podman has no page
server.  The enclaves are not in it: they moved enclave to enclave before
(the engine's live migration to an ``IncomingEnclave`` on the destination
agent), their state encrypted for the attested destination enclave only.
podman's CRIU writes its images into the container's directory in podman's
storage (``userdata/checkpoint``) before podman packs them: for the command,
that directory is a tmpfs of the tool's (:func:`~.imagefs.cuttable_engine_dir`),
which a failing enclave stream fills up, so CRIU's next write fails and its own
error path resumes the tasks at once; the images go with the mount, so no
copy of the container's memory stays in podman's storage.

Destination: the archive is unpacked, its two configurations (``config.dump``,
the container's, and ``spec.dump``, the OCI runtime's) are localized (this
host's platform socket, network namespace, cgroup parent, and CRIU's
configuration file with ``leave-stopped`` and ``tcp-close`` for a held
restore; podman's own mounts dropped, as podman makes them anew; then this
host's allow list, :mod:`.admission`, for both), packed again and imported:
the container exists with every task stopped.  An incoming migration's
received archive goes once unpacked, the unpacked tree once packed again, and
that archive once podman imported it (:mod:`.spent`): two copies of the images
at most, one through podman's restore.  The container's image must be
on this host already (as it would be pulled from a registry; here ``podman
save | podman load``).

podman runs with ``--runtime runc`` (the only runtime with checkpoints here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

from ..errors import MigSGXError, ProtocolError
from ..limits import MAX_IMAGE_BYTES
from . import engine_notes as notes
from . import owner as _owner
from .admission import SpecPolicy, SpecRefused
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
from .command import run_engine, with_path
from .frozen import dump_frozen, own_netns_path, stop_if_cancelled, write_criu_config
from .image_admission import admit_images, localize_images
from .imagefs import cuttable_engine_dir
from .oci import (
    Localization,
    extract_tree,
    joined_host_netns,
    load_json,
    localize,
    same_netns,
    tar_tree,
)
from .settings import ContainerSettings
from .spent import spend

__all__ = ["PODMAN_ARCHIVE", "Podman", "PodmanDriver", "engine_note"]

log = logging.getLogger("migsgx.containers")

PODMAN_ARCHIVE: Final = "migsgx-podman-export.tar"
#: Where podman's CRIU writes, in the container's directory in podman's storage.
PODMAN_CHECKPOINT: Final = "checkpoint"
#: Files ``podman container checkpoint --export`` writes beside it for the archive.
PODMAN_EXPORT_FILES: Final = ("config.dump", "spec.dump", "stats-dump")
#: Bind mounts podman makes for a container itself, anew at every restore; the
#: exported ``spec.dump`` names the source host's files for them.
PODMAN_MOUNTS: Final = frozenset(
    {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv", "/dev/shm"}
)
#: ``config.dump`` fields that would join other containers' namespaces, run a host
#: directory as the root, mount volumes, or drop the container's confinement.
PODMAN_REFUSED: Final = (
    "privileged", "rootfs", "namedVolumes", "overlayVolumes", "imageVolumes", "devices",
    "netNsCtr", "ipcNsCtr", "pidNsCtr", "utsNsCtr", "userNsCtr", "mountNsCtr", "cgroupNsCtr",
)  # fmt: skip


def _systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


class Podman:
    """podman's command line for one host (its storage and state roots)."""

    def __init__(
        self, settings: ContainerSettings, criu: Path, *, prefix: Sequence[str] = ()
    ) -> None:
        """``prefix``: run podman under it (``nsenter --net=...``)."""

        self.settings = settings
        self.prefix = list(prefix)
        self.env = with_path(criu.parent)
        args = ["--runtime", "runc"]
        root = settings.podman_root
        if root is not None:
            args += ["--root", str(root / "storage"), "--runroot", str(root / "run")]
            args += ["--tmpdir", str(root / "tmp"), "--runtime-flag", f"root={root / 'runc'}"]
        if settings.podman_storage_driver:
            args += ["--storage-driver", settings.podman_storage_driver]
        if not _systemd():
            args += ["--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        self.global_args = args

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, "podman", *self.global_args, *args]

    def __call__(self, *args: str, what: str, timeout: float = 300.0, check: bool = True) -> str:
        code, out, _ = run_engine(self.argv(*args), what=what, env=self.env, timeout=timeout,
                                  check=check)  # fmt: skip
        return out if code == 0 else ""

    def inspect(self, name: str) -> dict[str, Any] | None:
        out = self("container", "inspect", name, what="podman inspect", check=False)
        try:
            items = json.loads(out) if out else []
        except ValueError as exc:
            raise ContainerError(f"podman inspect {name}: not JSON") from exc
        return items[0] if items and isinstance(items[0], dict) else None

    def unpause(self, name: str) -> None:
        """Thaw a paused container (``podman unpause``): its tasks go back to what they
        were when frozen (a held tree's, stopped)."""

        self("unpause", name, what=f"podman unpause {name}")

    def remove(self, name: str) -> None:
        info = self.inspect(name)
        self("rm", "--force", "--time", "0", name, what=f"podman rm {name}")
        cid = str((info or {}).get("Id") or "")
        runtime_root = self.runtime_root
        if runtime_root is not None and cid and (runtime_root / cid).exists():
            # podman's own clean-up runs runc without the runtime root it was given
            # (--runtime-flag): the runc state would stay and block this id here.
            run_engine(["runc", "--root", str(runtime_root), "delete", "--force", cid],
                       what=f"runc delete {cid[:12]}", check=False)  # fmt: skip

    @property
    def runtime_root(self) -> Path | None:
        root = self.settings.podman_root
        return root / "runc" if root is not None else None


class PodmanDriver:
    name: ClassVar[str] = "podman"

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        self.podman = Podman(host.settings, host.criu.binary)

    def uses_page_server(self, page_tls: bool) -> bool:
        return False

    # --- source -------------------------------------------------------------------------
    def locate(self, target: str) -> Source:
        name = check_name(target)
        info = self.podman.inspect(name)
        if info is None:
            raise ContainerError(f"no podman container {name}")
        state = info.get("State") or {}
        if state.get("Status") != "running":
            raise ContainerError(f"podman container {name} is {state.get('Status')}, not running")
        config = info.get("OCIConfigPath")
        return Source(
            root=int(state["Pid"]),
            target={"name": str(info.get("Name") or name)},
            label=f"podman container {name}",
            # (podman keeps the runtime specification it started the container with there)
            spec=load_json(Path(config), "podman runtime configuration") if config else None,
            # (the container's directory in podman's storage: its checkpoint goes there;
            # podman's id of this container, which one made since under its name lacks)
            private={
                "static_dir": str(info.get("StaticDir") or ""),
                "id": str(info.get("Id") or ""),
            },
        )

    def dump(self, source: Source, plan: DumpPlan, on_dumped: Callable[[], None]) -> None:
        name = source.target["name"]
        args = ["container", "checkpoint", "--leave-running", "--compress", "none"]
        args.append("--file-locks")  # held POSIX and flock locks move with the tree
        args += ["--export", str(plan.images / PODMAN_ARCHIVE)]
        if plan.tcp_close:
            args.append("--tcp-established")  # dumped, then restored closed
        static = Path(str(source.private.get("static_dir") or ""))

        def checkpoint() -> None:
            if not static.is_absolute():
                self.podman(*args, name, what=f"podman checkpoint {name}", timeout=600)
                return
            # podman's CRIU writes its images there: a failed enclave stream fills the
            # directory up, so that CRIU's own error path ends the dump at once.
            with cuttable_engine_dir(static / PODMAN_CHECKPOINT, plan) as fs:
                try:
                    with fs.engine_dumps():
                        stop_if_cancelled(plan)  # (cancelled before the fill could act)
                        self.podman(*args, name, what=f"podman checkpoint {name}", timeout=600)
                except ContainerError:
                    drop_export_leftovers(static)
                    raise
            stop_if_cancelled(plan)  # (cut: nothing of the dump is left)

        # Should this tool end before it removes the source (in doubt after the commit),
        # the guardian or ``migsgx recover`` removes it the same way (:mod:`.committed`).
        plan.note(engine_note(self.podman, name, str(source.private.get("id") or "")))
        dump_frozen(
            source, plan, on_dumped, checkpoint=checkpoint, remove=lambda: self.podman.remove(name)
        )

    # --- destination ----------------------------------------------------------------------
    def check_target(self, target: Mapping[str, Any]) -> dict[str, Any]:
        if set(target) != {"name"}:
            raise ProtocolError("a podman target is {'name': CONTAINER_NAME}")
        checked = {"name": check_name(target["name"])}
        if shutil.which("podman") is None:
            raise ContainerError("podman is not installed on this host")
        return checked

    def _conf_dir(self) -> Path:
        return self.host.engine_dir("podman")

    def restore(self, request: RestoreRequest) -> Restored:
        name = self.check_target(request.target)["name"]
        if self.podman.inspect(name) is not None:
            raise ContainerError(f"a podman container {name} exists on this host")
        work = request.images / "podman-import"
        work.mkdir(mode=0o700)
        received = request.images / PODMAN_ARCHIVE
        extract_tree(received, work, limit=MAX_IMAGE_BYTES)
        # First: while it is there no other session restores this name (nor writes its
        # CRIU configuration, nor removes what this restore makes when its own fails).
        mark = _owner.mark_path(self._conf_dir(), name)
        _owner.write(mark, request.owner, f"podman container {name}")
        criu_config = self._conf_dir() / f"{name}.criu.conf"
        archive = request.images / "podman-import.tar"
        made = False
        try:
            # Read once (an incoming migration's): each copy goes once the next is made.
            spend(request, received)
            write_criu_config(criu_config, tcp_close=request.tcp_close)
            self.localize_archive(work, criu_config, engine_in_netns=True)
            if request.before is not None:
                request.before(work / "checkpoint")
            tar_tree(work, archive, limit=MAX_IMAGE_BYTES)
            spend(request, work)
            made = True
            podman = self.podman
            netns = self.host.settings.netns
            if netns is not None and not same_netns(netns):
                # As for runc: CRIU restores into its own namespace what it dumped from there.
                podman = Podman(self.host.settings, self.host.criu.binary,
                                prefix=["nsenter", f"--net={netns}"])  # fmt: skip
            podman("container", "restore", "--file-locks", "--import", str(archive),
                   what=f"podman restore {name}", timeout=600)  # fmt: skip
            if request.made is not None:
                request.made()
            info = self.podman.inspect(name)
            state = (info or {}).get("State") or {}
            if not state.get("Pid"):
                raise ContainerError(f"podman restored {name} but it has no process")
        except BaseException:
            if made:
                with contextlib.suppress(MigSGXError):
                    self.podman.remove(name)
            _owner.clear(mark)
            raise
        finally:
            spend(request, archive)  # (podman unpacked it into its own storage)
            with contextlib.suppress(OSError):
                criu_config.unlink()  # a later checkpoint of this container must not see it
        conmon = int(state.get("ConmonPid") or 0)
        return self._restored(name, int(state["Pid"]), conmon)

    def _localization(
        self,
        runtime: Mapping[str, Any],
        *,
        cgroups_path: str | None,
        criu_config: Path | None,
        engine_in_netns: bool | None,
    ) -> Localization:
        settings = self.host.settings
        netns = (settings.netns or own_netns_path()) if joined_host_netns(runtime) else None
        return Localization(
            platform_socket=self.host.platform_socket,
            netns=netns,
            cgroups_path=cgroups_path,
            criu_config=criu_config,
            engine_in_netns=netns is not None
            and (same_netns(netns) if engine_in_netns is None else engine_in_netns),
            policy=SpecPolicy.from_settings(settings),
            engine_mounts=PODMAN_MOUNTS,
        )

    def admit_spec(self, target: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
        """The runtime specification podman runs the container with (``spec.dump`` later)."""

        here = self._localization(spec, cgroups_path=None, criu_config=None, engine_in_netns=True)
        localize(spec, here)

    def localize_archive(
        self, work: Path, criu_config: Path | None, *, engine_in_netns: bool | None = None
    ) -> None:
        """Fit the unpacked export in ``work`` to this host (see the module docstring).

        ``engine_in_netns``: whether podman will run in the container's network
        namespace (default: whether this process does).
        """

        container = load_json(work / "config.dump", "podman container configuration")
        runtime = load_json(work / "spec.dump", "podman runtime configuration")
        spec = container.get("spec")
        if not isinstance(spec, dict):
            raise ProtocolError("the container configuration has no runtime specification")
        settings = self.host.settings
        parent = settings.cgroup_parent
        cgroupfs = container.get("cgroupManager") == "cgroupfs"
        cid = check_name(container.get("id"), "container id")
        for key in PODMAN_REFUSED:
            if container.get(key):
                raise SpecRefused(
                    f"the container's configuration is refused: config.dump {key}: "
                    "not on this host's allow list",
                    field=f"config.dump {key}",
                )
        image = container.get("rootfsImageID") or container.get("rootfsImageName")
        if not isinstance(image, str) or not image:
            raise ProtocolError("the container configuration names no image")
        # podman would pull a missing image; a destination agent never fetches anything.
        self.podman("image", "exists", image, what=f"the container's image {image[:24]} here")
        here = self._localization(
            runtime,
            cgroups_path=f"{parent}/libpod-{cid}" if parent and cgroupfs else None,
            criu_config=criu_config,
            engine_in_netns=engine_in_netns,
        )
        container["spec"] = localize(spec, here)
        runtime = localize(runtime, here)
        if (work / "checkpoint").is_dir():
            admit_images(work / "checkpoint", runtime)
            localize_images(work / "checkpoint", runtime)
        else:
            raise ProtocolError("the podman archive holds no checkpoint")
        if parent and cgroupfs:
            container["cgroupParent"] = parent
        (work / "config.dump").write_text(json.dumps(container))
        (work / "spec.dump").write_text(json.dumps(runtime))

    def remove_made(self, handle: Mapping[str, Any], owner: str, *, keep_running: bool) -> str:
        if set(handle) != {"name"}:
            raise ContainerError(f"not a podman container's record: {sorted(handle)}")
        name = check_name(handle["name"])
        info = self.podman.inspect(name)
        state = ((info or {}).get("State")) or {}
        pid = int(state.get("Pid") or 0)
        live = state.get("Status") in ("running", "paused") and _owner.alive(pid)
        if info is not None and keep_running and live:
            return f"nothing (podman container {name} is {state.get('Status')}, pid {pid})"
        mark = _owner.mark_path(self._conf_dir(), name)
        _owner.check(mark, owner, f"podman container {name}")
        try:
            if info is not None:
                self.podman.remove(name)
        finally:
            _owner.clear(mark)
        return f"the podman container {name}" if info else f"the mark of {name} (no container)"

    def _restored(self, name: str, pid: int, conmon: int) -> Restored:
        mark = _owner.mark_path(self._conf_dir(), name)
        return Restored(
            pid=pid,
            label=f"podman container {name}",
            handle={"name": name},
            adopt=[conmon] if conmon > 0 else [],
            before_resume=lambda: _owner.clear(mark),
        )

    def reclaim(self, handle: Mapping[str, Any], pid: int) -> Restored:
        if set(handle) != {"name"}:
            raise ContainerError(f"not a podman container's record: {sorted(handle)}")
        name = check_name(handle["name"])
        state = ((self.podman.inspect(name) or {}).get("State")) or {}
        if int(state.get("Pid") or 0) != pid or state.get("Status") not in ("running", "paused"):
            raise ContainerError(
                f"podman container {name} is {state.get('Status')} with pid {state.get('Pid')}, "
                f"not the held tree (pid {pid})"
            )
        conmon = int(state.get("ConmonPid") or 0)
        held = self._restored(name, pid, conmon)
        if state.get("Status") == "paused":
            # Paused while no agent held it: thawed only when a COMMIT resumes it.
            held.before_resume = thaw_first(lambda: self.podman.unpause(name), held.before_resume)
        return held

    def discard(self, restored: Restored) -> None:
        name = str(restored.handle["name"])
        self.podman.remove(name)
        _owner.clear(_owner.mark_path(self._conf_dir(), name))


def engine_note(podman: Podman, name: str, cid: str) -> str:
    """The guardian's ``podman`` note: which podman container a committed source leaves."""

    settings = podman.settings
    return notes.engine_note("podman", name=name, id=cid, root=str(settings.podman_root or ""),
                             storage=settings.podman_storage_driver or "")  # fmt: skip


def drop_export_leftovers(static: Path) -> None:
    """What a failed ``podman container checkpoint --export`` leaves in the container's
    directory: the configurations it wrote for the archive (podman removes them
    after a checkpoint that succeeded, not after one that failed).  CRIU's log
    (``dump.log``) stays: it says why the dump failed."""

    for leftover in PODMAN_EXPORT_FILES:
        with contextlib.suppress(OSError):
            (static / leftover).unlink()
