"""The ``containerd`` driver: a containerd 1.6 task, dumped by its runc, restored by ``ctr``.

Source: the task's cgroup is frozen first and stays frozen until the commit,
as with runc and podman.  containerd's own checkpoint (``ctr tasks
checkpoint``, ``ctr containers checkpoint``) cannot be used for that: it
pauses the task before the dump and *resumes it afterwards*, so the source
would run between the dump and the commit, and it refuses a task that is
already frozen.  The driver therefore runs the command containerd's shim runs
(``runc checkpoint --leave-running``, on the runc state root containerd keeps
for its namespace) on the frozen task; containerd's records stay as they were,
and rolling back is thawing the cgroup.  The destination gets CRIU's images,
the container's record (image, runtime, specification) and the changes of its
root file system (``ctr snapshots diff``).

Destination: the container's image must be on this host already (imported
locally: a destination never pulls, and ``ctr`` would try a registry for a
missing one).  The specification is localized (:func:`~.oci.localize`: this
host's platform socket, network namespace, cgroup parent and CRIU's
configuration with ``leave-stopped``; then this host's allow list,
:mod:`.admission`), then written with CRIU's images as the
checkpoint image containerd itself would have written
(:func:`~.layout.write_checkpoint_image`), imported, and restored with ``ctr
containers restore --live``: the container and its task exist in containerd,
every task stopped (held).  The checkpoint image is removed again.  An incoming
migration's CRIU pages go once packed, their tar once in the checkpoint image,
and that once imported (:mod:`.spent`).

Each host has its own containerd (socket, namespace, root and state), named
in ``STATE/containers.toml``; ``criu`` on containerd's ``PATH`` must be a
working CRIU (4.2 here), since the shim it starts restores with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Final

from .. import _proc
from ..criu import log_excerpt
from ..errors import MigSGXError, ProtocolError
from . import engine_notes as notes
from . import owner as _owner
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
from .command import bring_lo_up, json_object, run_engine, with_path
from .frozen import dump_frozen, own_netns_path, stop_if_cancelled, write_criu_config
from .image_admission import admit_images, localize_images
from .imagefs import ImageFs, cuttable_images
from .layout import CheckpointParts, write_checkpoint_image
from .oci import Localization, joined_host_netns, load_json, localize
from .settings import ContainerSettings
from .spent import spend

__all__ = [
    "CONTAINERD_RECORD",
    "CONTAINERD_RW",
    "DEFAULT_ADDRESS",
    "RUNTIMES",
    "ContainerdDriver",
    "Ctr",
    "engine_note",
]

log = logging.getLogger("migsgx.containers")

CONTAINERD_RECORD: Final = "migsgx-containerd.json"
CONTAINERD_RW: Final = "migsgx-containerd-rw.tar.gz"
DEFAULT_ADDRESS: Final = Path("/run/containerd/containerd.sock")
DEFAULT_NAMESPACE: Final = "default"
DEFAULT_SNAPSHOTTER: Final = "overlayfs"
#: Runtimes a destination accepts from a peer (a runtime name picks a shim binary to run).
RUNTIMES: Final = frozenset({"io.containerd.runc.v2", "io.containerd.runc.v1"})
MAX_RW_BYTES: Final = 256 << 20
STOP_TIMEOUT: Final = 15.0


class Ctr:
    """``ctr`` for one host's containerd (its socket and namespace)."""

    def __init__(self, settings: ContainerSettings, criu: Path) -> None:
        self.address = settings.containerd_address or DEFAULT_ADDRESS
        self.namespace = settings.containerd_namespace or DEFAULT_NAMESPACE
        self.snapshotter = settings.containerd_snapshotter or DEFAULT_SNAPSHOTTER
        self.env = with_path(criu.parent)

    def argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.address), "--namespace", self.namespace, *args]

    def __call__(self, *args: str, what: str, timeout: float = 120.0, check: bool = True) -> str:
        code, out, _ = run_engine(self.argv(*args), what=what, env=self.env, timeout=timeout,
                                  check=check)  # fmt: skip
        return out if code == 0 else ""

    @property
    def runc_root(self) -> Path:
        """Where containerd's runc shim keeps runc's state for this namespace (its default)."""

        return Path("/run/containerd/runc") / self.namespace

    def info(self, cid: str) -> dict[str, Any] | None:
        out = self("containers", "info", cid, what=f"ctr containers info {cid}", check=False)
        if not out:
            return None
        return json_object(out, f"ctr containers info {cid}")

    def task(self, cid: str) -> tuple[int, str] | None:
        """(pid, status) of the container's task, None when it has none."""

        out = self("tasks", "list", what="ctr tasks list", check=False)
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) == 3 and fields[0] == cid and fields[1].isdigit():
                return int(fields[1]), fields[2]
        return None

    def containers(self) -> list[str]:
        out = self("containers", "list", "--quiet", what="ctr containers list", check=False)
        return out.split()

    def has_image(self, name: str) -> bool:
        out = self("images", "list", "--quiet", what="ctr images list", check=False)
        return name in out.split()

    def import_image(self, archive: Path, *, unpack: bool = True) -> None:
        args = ["images", "import"] + ([] if unpack else ["--no-unpack"])
        self(*args, str(archive), what=f"ctr images import {archive.name}", timeout=300)

    def remove_image(self, name: str) -> None:
        self("images", "remove", name, what=f"ctr images remove {name}", check=False)

    def resume(self, cid: str) -> None:
        """Thaw a paused task (``ctr tasks resume``)."""

        self("tasks", "resume", cid, what=f"ctr tasks resume {cid}")

    def remove(self, cid: str) -> None:
        """Remove container ``cid`` and its task (killed first when it runs).

        Never ``tasks delete --force``: for a task whose restore failed it waits
        for an exit that does not come.  A paused task is thawed first (a frozen
        task takes its SIGKILL only once thawed); a held tree's tasks are stopped
        again by the thaw, so it runs nothing before the kill.
        """

        found = self.task(cid)
        if found is not None:
            pid, status = found
            if status == "PAUSED":
                self.resume(cid)
            if status not in ("STOPPED", "CREATED"):
                self("tasks", "kill", "--signal", "SIGKILL", cid, what=f"ctr tasks kill {cid}",
                     check=False)  # fmt: skip
                deadline = time.monotonic() + STOP_TIMEOUT
                while (now := self.task(cid)) is not None and now[1] not in ("STOPPED",):
                    if time.monotonic() > deadline:
                        raise ContainerError(f"containerd task {cid} (pid {pid}) does not stop")
                    time.sleep(0.05)
            self("tasks", "delete", cid, what=f"ctr tasks delete {cid}", check=False)
        if cid in self.containers():
            self("containers", "delete", cid, what=f"ctr containers delete {cid}")


class ContainerdDriver:
    name: ClassVar[str] = "containerd"

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        self.ctr = Ctr(host.settings, host.criu.binary)

    def uses_page_server(self, page_tls: bool) -> bool:
        return False  # CRIU's pages travel with the other images over the agent's TLS channel

    # --- source -------------------------------------------------------------------------
    def locate(self, target: str) -> Source:
        cid = check_name(target, "container id")
        info = self.ctr.info(cid)
        if info is None:
            raise ContainerError(f"no containerd container {cid} in namespace {self.ctr.namespace}")
        task = self.ctr.task(cid)
        if task is None or task[1] != "RUNNING":
            status = task[1] if task else "without a task"
            raise ContainerError(f"containerd container {cid} is {status}, not running")
        image = info.get("Image")
        spec = info.get("Spec")
        if not isinstance(image, str) or not image or not isinstance(spec, dict):
            raise ContainerError(f"containerd container {cid} has no image or no specification")
        runtime = (info.get("Runtime") or {}).get("Name")
        return Source(
            root=task[0],
            target={"id": cid},
            label=f"containerd container {cid}",
            spec=spec,
            private={
                "record": {"image": image, "runtime": runtime, "spec": spec},
                "snapshotter": str(info.get("Snapshotter") or self.ctr.snapshotter),
                "snapshot": str(info.get("SnapshotKey") or ""),
                # (one made since under this id was created at another time)
                "created": str(info.get("CreatedAt") or ""),
            },
        )

    def dump(self, source: Source, plan: DumpPlan, on_dumped: Callable[[], None]) -> None:
        cid = source.target["id"]
        # From the shim's network namespace, as the shim itself would: CRIU then records
        # the container's (joined) namespace as external, and a restore joins the one its
        # configuration names.  Dumped from inside it, CRIU would restore into its own.
        shim = _proc.parent(source.root)  # (the task's shim)
        prefix = [] if shim is None else ["nsenter", f"--net=/proc/{shim}/ns/net"]

        images: list[ImageFs] = []

        def checkpoint() -> None:
            with images[0].engine_dumps():
                self._checkpoint(prefix, cid, plan.images, tcp_established=plan.tcp_close)
            stop_if_cancelled(plan)  # (cut: the directory is full, nothing more goes in)
            (plan.images / CONTAINERD_RECORD).write_text(json.dumps(source.private["record"]))
            if source.private["snapshot"]:
                self._rw_diff(source, plan.images / CONTAINERD_RW)

        # Should this tool end before it removes the source (in doubt after the commit),
        # the guardian or ``migsgx recover`` removes it the same way (:mod:`.committed`).
        plan.note(engine_note(self.ctr, cid, source.private["created"]))
        # runc's CRIU writes its images here: a failed enclave stream fills the
        # directory up, so that CRIU's own error path ends the dump at once.
        with cuttable_images(plan) as fs:
            images.append(fs)
            dump_frozen(
                source, plan, on_dumped, checkpoint=checkpoint, remove=lambda: self.ctr.remove(cid)
            )

    def _checkpoint(
        self, prefix: list[str], cid: str, images: Path, *, tcp_established: bool
    ) -> None:
        """``runc checkpoint --leave-running`` on containerd's runc state, as its shim runs it."""

        argv = [*prefix, "runc", "--root", str(self.ctr.runc_root),
                "--criu", str(self.host.criu.binary), "checkpoint", "--leave-running",
                "--file-locks",  # held POSIX and flock locks move with the tree
                "--image-path", str(images), "--work-path", str(images)]  # fmt: skip
        if tcp_established:
            argv.append("--tcp-established")
        try:
            run_engine([*argv, cid], what=f"runc checkpoint {cid}", timeout=600)
        except ContainerError as exc:
            raise ContainerError(f"{exc}\n{log_excerpt(images / 'dump.log')}") from exc

    def _rw_diff(self, source: Source, out: Path) -> None:
        """The changes of the container's root file system, as containerd computes them."""

        argv = self.ctr.argv("snapshots", "--snapshotter", source.private["snapshotter"],
                             "diff", source.private["snapshot"])  # fmt: skip
        try:
            with out.open("wb") as f:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=f,
                                      stderr=subprocess.PIPE, env=self.ctr.env, timeout=300,
                                      check=False)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise ContainerError(f"ctr snapshots diff: {exc}") from exc
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[-300:]
            raise ContainerError(f"ctr snapshots diff failed: {err}")

    # --- destination ----------------------------------------------------------------------
    def check_target(self, target: Mapping[str, Any]) -> dict[str, Any]:
        if set(target) != {"id"}:
            raise ProtocolError("a containerd target is {'id': CONTAINER_ID}")
        checked = {"id": check_name(target["id"], "container id")}
        if shutil.which("ctr") is None:
            raise ContainerError("containerd's ctr is not installed on this host")
        if not self.ctr.address.exists():
            raise ContainerError(f"no containerd listens at {self.ctr.address}")
        return checked

    def _conf_dir(self) -> Path:
        return self.host.engine_dir("containerd")

    def _record(self, images: Path) -> tuple[str, str, dict[str, Any]]:
        record = load_json(images / CONTAINERD_RECORD, "containerd container record")
        image, runtime, spec = record.get("image"), record.get("runtime"), record.get("spec")
        if not isinstance(image, str) or not 0 < len(image) <= 512 or "\0" in image:
            raise ProtocolError("the containerd record names no image")
        if runtime not in RUNTIMES:
            raise ContainerError(f"runtime {runtime!r} is not accepted here (only runc's shims)")
        if not isinstance(spec, dict):
            raise ProtocolError("the containerd record has no runtime specification")
        return image, str(runtime), spec

    def _localization(self, cid: str, spec: Mapping[str, Any], criu_config: Path) -> Localization:
        settings = self.host.settings
        return Localization(
            platform_socket=self.host.platform_socket,
            netns=(settings.netns or own_netns_path()) if joined_host_netns(spec) else None,
            cgroups_path=f"{settings.cgroup_parent}/{cid}" if settings.cgroup_parent else None,
            criu_config=criu_config,
            policy=SpecPolicy.from_settings(settings),
            root_path="rootfs",  # the snapshot containerd mounts in the bundle
        )

    def admit_spec(self, target: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
        cid = str(target["id"])
        # (the CRIU configuration's path, as restore names it; nothing is made here)
        conf = Path(self.host.state_dir or "/") / "agent" / "containerd" / f"{cid}.criu.conf"
        localize(spec, self._localization(cid, spec, conf))

    def restore(self, request: RestoreRequest) -> Restored:
        cid = self.check_target(request.target)["id"]
        if self.ctr.info(cid) is not None:
            raise ContainerError(f"a containerd container {cid} exists on this host")
        image, runtime, spec = self._record(request.images)
        if not self.ctr.has_image(image):
            raise ContainerError(
                f"the container's image {image} is not on this host (import it; "
                "a destination agent never pulls)"
            )
        rw = request.images / CONTAINERD_RW
        if rw.exists() and rw.stat().st_size > MAX_RW_BYTES:
            raise ProtocolError(f"the root file system's changes exceed {MAX_RW_BYTES} bytes")
        joined = joined_host_netns(spec)
        criu_config = self._conf_dir() / f"{cid}.criu.conf"
        here = self._localization(cid, spec, criu_config)
        ref = f"migsgx.local/checkpoint/{cid}:{secrets.token_hex(4)}"
        work = request.images / "containerd-import"
        work.mkdir(mode=0o700)
        # First: while it is there no other session restores this id (nor writes its
        # CRIU configuration, nor removes what this restore makes when its own fails).
        mark = _owner.mark_path(self._conf_dir(), cid)
        _owner.write(mark, request.owner, f"containerd container {cid}")
        made = False
        try:
            write_criu_config(criu_config, tcp_close=request.tcp_close)
            localized = localize(spec, here)
            admit_images(request.images, localized)
            localize_images(request.images, localized)
            parts = CheckpointParts(
                criu_images=request.images,
                spec=localized,
                image=image,
                runtime=runtime,
                snapshotter=self.ctr.snapshotter,
                rw_layer=rw if rw.exists() else None,
                skip=frozenset({CONTAINERD_RECORD, CONTAINERD_RW}),
            )
            if request.before is not None:
                request.before(request.images)
            # Read once (an incoming migration's): each copy goes once the next is made.
            archive = write_checkpoint_image(
                parts, ref, work / "checkpoint.tar", work, spent=lambda p: spend(request, p)
            )
            self.ctr.import_image(archive, unpack=False)
            spend(request, archive)  # (in containerd's content store now)
            made = True
            args = ["containers", "restore", "--live"] + (["--rw"] if rw.exists() else [])
            try:
                self.ctr(*args, cid, ref, what=f"ctr containers restore {cid}", timeout=600)
            except ContainerError as exc:
                # The shim names CRIU's log; it is gone once the task is deleted below.
                found = re.search(r"log file: (/\S+/restore\.log)", str(exc))
                detail = log_excerpt(Path(found.group(1))) if found else ""
                raise ContainerError(f"{exc}\n{detail}".rstrip()) from exc
            if request.made is not None:
                request.made()
            task = self.ctr.task(cid)
            if task is None or task[0] <= 0:
                raise ContainerError(f"containerd restored {cid} but it has no process")
            if not joined:
                bring_lo_up(task[0])
        except BaseException:
            if made:
                with contextlib.suppress(MigSGXError):
                    self.ctr.remove(cid)
            _owner.clear(mark)
            raise
        finally:
            if made:
                self.ctr.remove_image(ref)
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                criu_config.unlink()  # a later checkpoint of this container must not see it
        return self._restored(cid, task[0])

    def remove_made(self, handle: Mapping[str, Any], owner: str, *, keep_running: bool) -> str:
        if set(handle) != {"id"}:
            raise ContainerError(f"not a containerd container's record: {sorted(handle)}")
        cid = check_name(handle["id"], "container id")
        task = self.ctr.task(cid) if self.ctr.info(cid) is not None else None
        live = task is not None and task[1] in ("RUNNING", "PAUSED") and _owner.alive(task[0])
        if task is not None and keep_running and live:
            return f"nothing (containerd container {cid} is {task[1]}, pid {task[0]})"
        mark = _owner.mark_path(self._conf_dir(), cid)
        _owner.check(mark, owner, f"containerd container {cid}")
        known = cid in self.ctr.containers()
        try:
            if known:
                self.ctr.remove(cid)
        finally:
            _owner.clear(mark)
        return f"the containerd container {cid}" if known else f"the mark of {cid} (no container)"

    def _restored(self, cid: str, pid: int) -> Restored:
        mark = _owner.mark_path(self._conf_dir(), cid)
        return Restored(
            pid=pid, label=f"containerd container {cid}", handle={"id": cid},
            before_resume=lambda: _owner.clear(mark),
        )  # fmt: skip

    def reclaim(self, handle: Mapping[str, Any], pid: int) -> Restored:
        if set(handle) != {"id"}:
            raise ContainerError(f"not a containerd container's record: {sorted(handle)}")
        cid = check_name(handle["id"], "container id")
        task = self.ctr.task(cid) if self.ctr.info(cid) is not None else None
        if task is None or task[0] != pid or task[1] not in ("RUNNING", "PAUSED"):
            raise ContainerError(
                f"containerd container {cid} has task {task}, not the held tree (pid {pid})"
            )
        held = self._restored(cid, pid)
        if task[1] == "PAUSED":
            # Paused while no agent held it: thawed only when a COMMIT resumes it.
            held.before_resume = thaw_first(lambda: self.ctr.resume(cid), held.before_resume)
        return held

    def discard(self, restored: Restored) -> None:
        cid = str(restored.handle["id"])
        self.ctr.remove(cid)
        _owner.clear(_owner.mark_path(self._conf_dir(), cid))


def engine_note(ctr: Ctr, cid: str, created: str) -> str:
    """The guardian's ``containerd`` note: which container a committed source leaves."""

    return notes.engine_note("containerd", id=cid, address=str(ctr.address),
                             namespace=ctr.namespace, created=created)  # fmt: skip
