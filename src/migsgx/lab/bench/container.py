"""``migsgx bench container``: a container with an enclave moves; the engine alone for comparison.

One invocation builds two namespaced hosts with container engines
(:class:`~migsgx.lab.containers.ContainerLab`) and, in the same run, with
runc, podman or containerd:

* ``migsgx``: the example ``model`` application, in a container, holding SIZE
  of enclave memory (secret weights its enclave makes), migrates with
  ``migsgx migrate --runc/--podman/--containerd``; the digests of enclave and ordinary
  memory are checked on the destination;
* ``engine_only``: the same container image running a plain process that
  holds SIZE of ordinary memory (no enclaves: the engine alone cannot move
  enclave state) moves with the engine's own checkpoint and restore: runc
  ``checkpoint`` with CRIU's page server on the destination, a copy of the
  other images, ``runc restore``; or podman ``container checkpoint
  --export``, a copy of the archive, ``container restore --import``; or
  containerd's ``ctr tasks checkpoint`` into a directory (the source is
  removed after it), a copy, and ``ctr containers restore --live`` from the
  checkpoint image made of it (containerd 1.6's ``ctr images export`` fails on
  a checkpoint image), its writing and import counted in the restore.

Both move about SIZE bytes.  ``localize`` (podman) is the rewrite of the
archive that two hosts sharing one machine need (its network namespace and
cgroup parent); between machines it is not needed.  Requires root.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from ...containers import HostConfig
from ...containers.admission import SpecPolicy
from ...containers.containerd import Ctr
from ...containers.layout import CheckpointParts, write_checkpoint_image
from ...containers.oci import Localization, extract_tree, load_json, localize, tar_tree
from ...containers.podman import Podman, PodmanDriver
from ...containers.runc import Runc
from ...criu import Criu
from ...errors import ConfigError, MigSGXError
from ..containers import ContainerApp, ContainerLab
from ..testbed import Testbed
from .figures import children_cpu, cpu_seconds, loadavg, machine_state, summarize
from .memwatch import MemoryWatch
from .pages import PageServerOn, copy_images, image_bytes
from .process import MODEL_COLS, enclave_cpu, migration_figures, model_rows
from .settle import settle

__all__ = ["run"]

PORT = 7001

# SIZE MiB of ordinary memory (not zero pages), served as a digest on a port.
PLAIN = """
import os
os.environ["OPENBLAS_NUM_THREADS"] = "1"  # one thread: runc's checkpoint kills the tree
import hashlib, socket, sys
import numpy as np
mib, port = int(sys.argv[1]), int(sys.argv[2])
block = np.random.default_rng(3).integers(0, 256, size=1 << 20, dtype=np.uint8)
memory = np.empty((mib, 1 << 20), dtype=np.uint8)
for i in range(mib):
    memory[i] = block
    memory[i, :8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
digest = hashlib.sha256(memory.data).hexdigest()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", port))
server.listen(8)
while True:
    conn, _ = server.accept()
    with conn:
        conn.recv(64)
        conn.sendall(f"DIGEST {digest}\\n".encode())
"""


def _migsgx(
    bed: Testbed,
    lab: ContainerLab,
    engine: str,
    size: int,
    args: tuple[str, ...] = (),
    ordinary: int = 0,
    agent_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    rows = model_rows(size)
    agent = bed.start_agent(args=agent_args)
    app = lab.start_app(engine, "model", ["--rows", str(rows), "--cols", str(MODEL_COLS),
                                          "--ordinary-mib", str(ordinary >> 20)])  # fmt: skip
    before = lab.ask(app, "DIGEST", at="src")
    agent_cpu = cpu_seconds(agent.proc.pid, children=True)
    tool_cpu = children_cpu()
    settled = settle(bed.root)  # (outside the timed part)
    with MemoryWatch() as watch:
        run = bed.migrate(None, agent, args=[f"--{engine}", app.name, *args])
    tool_cpu = children_cpu() - tool_cpu
    agent_cpu = cpu_seconds(agent.proc.pid, children=True) - agent_cpu
    if run.returncode != 0 or run.stats is None:
        raise MigSGXError(f"migsgx migrate failed ({run.returncode}): {run.stderr[-2000:]}")
    after = lab.ask(app, "DIGEST", at="dst")
    if after != before:
        raise MigSGXError(f"state differs after the migration: {before!r} != {after!r}")
    lab.remove(app)
    agent.stop()
    figures = migration_figures(run.stats, rows, run.seconds)
    if run.stats.get("post_copy_window") is not None:
        figures["post_copy_window_seconds"] = float(run.stats["post_copy_window"])
    # Each with its children: CRIU and the container engine's commands.
    figures["cpu_by_process"] = {"tool": tool_cpu, "agent": agent_cpu, **enclave_cpu(run.stats)}
    details = run.stats["details"]
    figures["images_fs"] = str(details.get("destination_images_fs", ""))
    figures["settle"] = settled
    spans = (run.stats.get("timeline") or {}).get("spans", {})
    figures["memory_watch"] = watch.figures(spans.get("tool"))
    # Whether the destination enclaves faulted their memory in before the freeze, and how much.
    figures["prefault_ahead"] = bool(details.get("prefault_ahead"))
    figures["prefaulted_bytes"] = sum(
        int(e.get("prefaulted_bytes", 0)) for e in details.get("enclave_destination_stats", [])
    )
    return figures


def _plain(lab: ContainerLab, engine: str, size: int) -> tuple[ContainerApp, str]:
    code = [sys.executable, "-c", PLAIN, str(max(1, size >> 20)), str(PORT)]
    app = lab.start_command(engine, code)
    app.port = PORT
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(OSError):
            reply = lab.ask(app, "DIGEST", at="src")
            if reply.startswith("DIGEST"):
                return app, reply
        if time.monotonic() > deadline:
            raise MigSGXError("the plain container did not start")
        time.sleep(0.1)


@contextlib.contextmanager
def _restored(lab: ContainerLab, app: ContainerApp, digest: str, *scratch: Path) -> Iterator[None]:
    """The plain container's memory is the same on the destination (else an error); after
    the block, whatever happens, the container and the ``scratch`` directories go."""

    try:
        if lab.ask(app, "DIGEST", at="dst") != digest:
            raise MigSGXError("the plain container's memory differs after the restore")
        yield
    finally:
        lab.remove(app)
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)


def _runc_only(bed: Testbed, lab: ContainerLab, size: int, criu: Criu) -> dict[str, Any]:
    app, digest = _plain(lab, "runc", size)
    dst = bed.host("dst")
    src_runc = Runc(lab.settings["src"].runc_root, criu.binary, prefix=bed.host("src").command([]))
    dst_runc = Runc(lab.settings["dst"].runc_root, criu.binary, prefix=dst.command([]))
    dump_dir = Path(tempfile.mkdtemp(prefix="migsgx-bench-runc-", dir="/dev/shm"))
    images = bed.root / "runc-only-images"
    images.mkdir()
    (lab.base / "dst").mkdir(parents=True, exist_ok=True)
    bundle = Path(tempfile.mkdtemp(prefix="bench-bundle-", dir=lab.base / "dst"))
    try:
        source_bundle = lab.base / "src" / "bundles" / app.name
        cpu0 = children_cpu()
        with PageServerOn(dst, criu.binary, images) as pages:
            t0 = time.monotonic()
            src_runc.checkpoint(
                app.name, dump_dir, page_server=pages.address, tcp_established=False,
                leave_running=False,
            )  # fmt: skip
            t_dump = time.monotonic()
            pages.wait(120)
        copy_images(dump_dir, images)
        shutil.copytree(source_bundle / "rootfs", bundle / "rootfs", symlinks=True)
        settings = lab.settings["dst"]
        policy = SpecPolicy.from_settings(settings)
        here = Localization(
            None, settings.netns, f"{settings.cgroup_parent}/{app.name}", None, policy=policy
        )
        spec = localize(load_json(source_bundle / "config.json", "configuration"), here)
        (bundle / "config.json").write_text(json.dumps(spec))
        t_copy = time.monotonic()
        dst_runc.restore(app.name, bundle, images, images)
        t_end = time.monotonic()
        cpu = children_cpu() - cpu0
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)
    with _restored(lab, app, digest, images, bundle):
        page_bytes, other = image_bytes(images)
    return {
        "total_seconds": t_end - t0,
        "downtime_seconds": t_end - t0,
        "bytes": page_bytes + other,
        "phases": {"dump": t_dump - t0, "transfer": t_copy - t_dump, "restore": t_end - t_copy},
        "cpu_by_process": {"runc": cpu},  # checkpoint, page server, restore: all children
        "timeline": _spans("runc", t0, t_dump, t_copy, t_copy, t_end),
    }


def _podman_only(bed: Testbed, lab: ContainerLab, size: int, criu: Criu) -> dict[str, Any]:
    app, digest = _plain(lab, "podman", size)
    # Each engine in its host's network namespace, as the agents and the tool run.
    src = Podman(lab.settings["src"], criu.binary, prefix=bed.host("src").command([]))
    dst = Podman(lab.settings["dst"], criu.binary, prefix=bed.host("dst").command([]))
    scratch = Path(tempfile.mkdtemp(prefix="migsgx-bench-podman-", dir="/dev/shm"))
    moved = bed.root / "podman-only"
    moved.mkdir()
    try:
        cpu0 = children_cpu()
        t0 = time.monotonic()
        archive = scratch / "export.tar"
        src("container", "checkpoint", "--export", str(archive), "--compress", "none", app.name,
            what="podman checkpoint", timeout=600)  # fmt: skip
        t_dump = time.monotonic()
        copy = moved / "export.tar"
        shutil.copyfile(archive, copy)
        t_copy = time.monotonic()
        work = moved / "work"
        work.mkdir()
        extract_tree(copy, work, limit=8 << 30)
        driver = PodmanDriver(HostConfig(criu, lab.settings["dst"], None, bed.state("dst")))
        driver.localize_archive(work, None, engine_in_netns=True)
        local = moved / "local.tar"
        tar_tree(work, local, limit=8 << 30)
        t_local = time.monotonic()
        dst("container", "restore", "--import", str(local), what="podman restore", timeout=600)
        t_end = time.monotonic()
        cpu = children_cpu() - cpu0
        nbytes = copy.stat().st_size
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with _restored(lab, app, digest, moved):
        pass  # (nothing more to take from the destination)
    return {
        "total_seconds": t_end - t0 - (t_local - t_copy),
        "downtime_seconds": t_end - t0 - (t_local - t_copy),
        "bytes": nbytes,
        "phases": {"dump": t_dump - t0, "transfer": t_copy - t_dump, "restore": t_end - t_local},
        "localize_seconds": t_local - t_copy,
        "cpu_by_process": {"podman": cpu},  # with the archive's rewrite, here in this process
        "timeline": _spans("podman", t0, t_dump, t_copy, t_local, t_end),
    }


def _spans(
    name: str, t0: float, t_dump: float, t_copy: float, t_local: float, t_end: float
) -> dict[str, dict[str, list[float]]]:
    """Dump, transfer, restore from the first; the local rewrite (podman) left out."""

    shift = t_local - t_copy
    return {
        name: {
            "dump": [0.0, t_dump - t0],
            "transfer": [t_dump - t0, t_copy - t0],
            "restore": [t_local - t0 - shift, t_end - t0 - shift],
        }
    }


#: ``--live`` runs: the same app with SIZE of ordinary memory too, moved live with its
#: memory frozen (``--no-post-copy``) and by post-copy.
LIVE_KINDS: Final = ("live_frozen_memory", "live_post_copy")
#: ``--ab-NAME``: each run also migsgx with these tool and agent arguments (``migsgx_NAME``).
AB_ARMS: Final = {
    "prefault": (("--prefault-ahead",), ()),
    "no_prefault": (("--no-prefault-ahead",), ()),
    "images_ram": ((), ("--images-in-ram",)),
    # Every copy of the images kept through the restore (podman's, containerd's).
    "whole_images": ((), ("--no-spend-images",)),
    "whole_images_ram": ((), ("--no-spend-images", "--images-in-ram")),
}


def one_run(
    bed: Testbed,
    lab: ContainerLab,
    engine: str,
    size: int,
    criu: Criu,
    live: bool = False,
    ab: tuple[str, ...] = (),
    flip: bool = False,
) -> dict[str, Any]:
    """migsgx and the engine alone back to back (the engine first with ``flip``), paired.

    With ``live`` also ``migrate --live`` with and without post-copy, paired.
    For each NAME of ``ab`` (:data:`AB_ARMS`), also migsgx with that arm's
    arguments, after the default one, before it with ``flip``: ``migsgx_NAME``,
    ``NAME_ran_first`` and the paired ``NAME_total_speedup`` and
    ``NAME_downtime_speedup`` (default / arm: above 1, the arm was faster).
    """

    def arm(name: str) -> dict[str, Any]:
        tool_args, agent_args = AB_ARMS[name]
        return _migsgx(bed, lab, engine, size, tool_args, agent_args=agent_args)

    plain_first = ENGINE_ONLY[engine](bed, lab, size, criu) if flip else None
    first = {name: arm(name) for name in ab} if flip else {}
    migsgx = _migsgx(bed, lab, engine, size)
    arms = {name: first.get(name) or arm(name) for name in ab}
    plain = plain_first or ENGINE_ONLY[engine](bed, lab, size, criu)
    pair: dict[str, Any] = {
        "migsgx": migsgx,
        "engine_only": plain,
        "engine_only_ran_first": flip,
        # >= 1: migsgx is at least as fast as the engine alone moving as many bytes.
        "engine_over_migsgx_total": plain["total_seconds"] / migsgx["total_seconds"],
        "downtime_over_engine": migsgx["downtime_seconds"] / plain["total_seconds"],
    }
    for name, other in arms.items():
        pair.update({
            f"migsgx_{name}": other,
            f"{name}_ran_first": flip,
            f"{name}_total_speedup": migsgx["total_seconds"] / other["total_seconds"],
            f"{name}_downtime_speedup": migsgx["downtime_seconds"] / other["downtime_seconds"],
        })  # fmt: skip
    if live:
        frozen = _migsgx(bed, lab, engine, size, ("--live", "--no-post-copy"), ordinary=size)
        lazy = _migsgx(bed, lab, engine, size, ("--live", "--post-copy"), ordinary=size)
        pair.update(
            live_frozen_memory=frozen,
            live_post_copy=lazy,
            post_copy_over_frozen_downtime=lazy["downtime_seconds"] / frozen["downtime_seconds"],
        )
    pair["loadavg"] = loadavg()
    return pair


def _containerd_only(bed: Testbed, lab: ContainerLab, size: int, criu: Criu) -> dict[str, Any]:
    app, digest = _plain(lab, "containerd", size)
    src, dst = lab.ctr("src"), lab.ctr("dst")
    info = src.info(app.name) or {}
    settings = lab.settings["dst"]
    dump_dir = Path(tempfile.mkdtemp(prefix="migsgx-bench-containerd-", dir="/dev/shm"))
    moved = bed.root / "containerd-only"
    moved.mkdir()
    images = moved / "images"
    ref = f"migsgx.local/bench/{app.name}:1"
    try:
        cpu0 = children_cpu()
        t0 = time.monotonic()
        # Without --exit: CRIU would keep the source host's network locked for a restore there.
        src("tasks", "checkpoint", "--image-path", str(dump_dir), "--work-path",
            str(moved / "work"), app.name, what="ctr tasks checkpoint", timeout=600)  # fmt: skip
        t_dump = time.monotonic()
        src.remove(app.name)  # not counted: a source host does this after the fact
        t_removed = time.monotonic()
        shutil.copytree(dump_dir, images)
        t_copy = time.monotonic()
        here = Localization(None, settings.netns, f"{settings.cgroup_parent}/{app.name}", None,
                            policy=SpecPolicy.from_settings(settings))  # fmt: skip
        parts = CheckpointParts(
            criu_images=images,
            spec=localize(info["Spec"], here),
            image=str(info["Image"]),
            runtime=str(info["Runtime"]["Name"]),
            snapshotter=dst.snapshotter,
        )
        archive = write_checkpoint_image(parts, ref, moved / "checkpoint.tar", moved)
        dst.import_image(archive, unpack=False)
        dst("containers", "restore", "--live", app.name, ref, what="ctr containers restore",
            timeout=600)  # fmt: skip
        t_end = time.monotonic()
        cpu = children_cpu() - cpu0
        nbytes = sum(p.stat().st_size for p in images.iterdir())
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)
        _quiet_remove_image(dst, ref)
    with _restored(lab, app, digest, moved):
        pass  # (nothing more to take from the destination)
    removal = t_removed - t_dump
    return {
        "total_seconds": t_end - t0 - removal,
        "downtime_seconds": t_end - t0 - removal,
        "bytes": nbytes,
        "phases": {"dump": t_dump - t0, "transfer": t_copy - t_removed, "restore": t_end - t_copy},
        "source_removal_seconds": removal,
        "cpu_by_process": {"ctr": cpu},  # checkpoint, restore (with the source's removal)
        "timeline": {
            "ctr": {
                "dump": [0.0, t_dump - t0],
                "transfer": [t_dump - t0, t_copy - t0 - removal],
                "restore": [t_copy - t0 - removal, t_end - t0 - removal],
            }
        },
    }


def _quiet_remove_image(ctr: Ctr, ref: str) -> None:
    with contextlib.suppress(MigSGXError):
        ctr.remove_image(ref)


ENGINE_ONLY = {"runc": _runc_only, "podman": _podman_only, "containerd": _containerd_only}


def run(
    engine: str,
    size: int,
    *,
    subnet: int = 202,
    keep: Path | None = None,
    repeat: int = 3,
    live: bool = False,
    ab: tuple[str, ...] = (),
) -> dict[str, Any]:
    if engine not in ENGINE_ONLY:
        raise ConfigError("--engine is runc, podman or containerd")
    if unknown := set(ab) - set(AB_ARMS):
        raise ConfigError(f"no A/B arm {sorted(unknown)}")
    if live and engine != "runc":
        raise ConfigError("--live compares post-copy, which only runc containers have")
    if size < (1 << 20):
        raise ConfigError("--enclave-size must be at least 1 MiB")
    if repeat < 1:
        raise ConfigError("--repeat must be at least 1")
    before = loadavg()
    criu = Criu()
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="migsgx-bench-container-"))
    runs = []
    try:
        with Testbed(root, subnet=subnet) as bed, ContainerLab(bed, criu=criu) as lab:
            for i in range(repeat):
                runs.append(one_run(bed, lab, engine, size, criu, live, ab, flip=i % 2 == 1))
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    result = summarize(runs)
    result.update(engine=engine, enclave_size=size, repeat=repeat, machine=machine_state(before))
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Timelines of the median migsgx run and the median engine-alone run."""

    from .plot import median_panels, plot_timelines

    labels = [("migsgx", "migsgx migrate"), ("engine_only", f"{result['engine']} alone")]
    labels += [(f"migsgx_{name}", f"migsgx migrate, --ab-{name.replace('_', '-')}")
               for name in AB_ARMS if f"migsgx_{name}" in result["runs"][0]]  # fmt: skip
    plot_timelines(median_panels(result, labels), path)
