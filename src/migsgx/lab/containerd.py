"""containerd on emulated hosts: one daemon per host, its image imported, no registry.

For the tests, the demo and the benchmark (:class:`~.containers.ContainerLab`
uses it).  Each host gets a containerd of its own (socket, root, state, namespace
under the lab's directory, named in the host's ``containers.toml``), started
on first use with the project's CRIU first on its ``PATH`` (the shim it
starts checkpoints and restores with it).  The lab's root file system becomes
an image (:func:`~migsgx.containers.layout.write_image`) imported into each host's store, as a
registry pull would bring it.  Each daemon runs in its host's network
namespace (as a host's containerd runs in the host's), and containers join it
by path.  (Run from the machine's namespace instead, its shims' CRIU would
take a container that joined its host's namespace for one of its own and lock
that whole namespace with firewall rules during the dump: every connection of
the host, the migration's own data streams included, stalled until CRIU ended.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ..containers.base import ContainerError
from ..containers.command import with_path
from ..containers.containerd import Ctr
from ..containers.layout import write_image
from ..containers.settings import ContainerSettings
from ..criu import Criu
from ..errors import MigSGXError

__all__ = ["CTR_IMAGE", "ContainerdDaemon", "run_container"]

CTR_IMAGE: Final = "localhost/migsgx-lab:1"
START_TIMEOUT: Final = 30.0
#: Plugins a lab daemon does not need (the CRI plugin wants CNI; the rest, other file systems).
DISABLED_PLUGINS: Final = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.internal.v1.opt",
)


def lab_settings(base: Path, namespace: str) -> dict[str, object]:
    """The ``containers.toml`` keys of a lab host's containerd."""

    return {"containerd_address": base / "containerd.sock", "containerd_namespace": namespace}


class ContainerdDaemon:
    """One host's containerd, started and stopped by the lab."""

    def __init__(self, base: Path, settings: ContainerSettings, criu: Criu) -> None:
        self.base = base  # root, state, configuration and log live here
        self.settings = settings
        self.criu = criu
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctr = Ctr(settings, criu.binary)

    def start(self) -> None:
        address = self.settings.containerd_address
        assert address is not None
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        disabled = ", ".join(f'"{p}"' for p in DISABLED_PLUGINS)
        config = self.base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.base / "root"}"\nstate = "{self.base / "state"}"\n'
            f"disabled_plugins = [{disabled}]\n"
            f'[grpc]\n  address = "{address}"\n'
            f'[ttrpc]\n  address = "{address}.ttrpc"\n'
            '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
        )
        with (self.base / "containerd.log").open("ab") as log:
            # In its host's network namespace, as a host's containerd runs in the host's:
            # its shims (and their CRIU) then share it with the containers that joined it.
            netns = self.settings.netns
            prefix = ["nsenter", f"--net={netns}"] if netns is not None else []
            self.proc = subprocess.Popen(
                [*prefix, "containerd", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=with_path(self.criu.binary.parent),
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise ContainerError(f"containerd exited: see {self.base / 'containerd.log'}")
            ok = self.ctr("version", what="ctr version", timeout=10, check=False)
            if ok:
                return
            if time.monotonic() > deadline:
                where = self.base / "containerd.log"
                raise ContainerError(f"containerd did not start: see {where}")
            time.sleep(0.1)

    def import_image(self, rootfs: Path) -> str:
        scratch = self.base / "image"
        scratch.mkdir(exist_ok=True)
        archive = write_image(rootfs, CTR_IMAGE, scratch / "image.tar", scratch)
        try:
            self.ctr.import_image(archive)
        finally:
            for path in scratch.iterdir():
                with contextlib.suppress(OSError):
                    path.unlink()
        return CTR_IMAGE

    def remove_all(self) -> None:
        for cid in self.ctr.containers():
            with contextlib.suppress(MigSGXError):
                self.ctr.remove(cid)
        for name in self.ctr("images", "list", "--quiet", what="ctr images list",
                             check=False).split():  # fmt: skip
            self.ctr.remove_image(name)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run_container(
    ctr: Ctr,
    name: str,
    image: str,
    argv: Sequence[str],
    env: Sequence[str],
    binds: Sequence[tuple[str, str, bool]],
    *,
    netns: Path | None,
    cgroup: str,
) -> None:
    """``ctr run --detach`` with stdio on /dev/null (CRIU can dump it; a file it could not)."""

    args = ["run", "--detach", "--null-io", "--cgroup", cgroup]
    if netns is not None:
        args += ["--with-ns", f"network:{netns}"]
    for item in env:
        args += ["--env", item]
    for source, dest, readonly in binds:
        mode = "ro" if readonly else "rw"
        args += ["--mount", f"type=bind,src={source},dst={dest},options=rbind:{mode}"]
    ctr(*args, image, name, *argv, what=f"ctr run {name}", timeout=120)
