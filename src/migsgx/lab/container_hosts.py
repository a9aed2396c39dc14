"""Container engines on emulated hosts: engine roots, the lab's image, containers run.

For the tests, the demo and the benchmark.  Every host of a
:class:`~migsgx.lab.testbed.Testbed` gets its own runc root, podman store,
cgroup parent and network namespace (``STATE/containers.toml``), because the
hosts share one machine, and allows the host paths the lab's containers
bind-mount (``bind_sources``: a destination refuses any other).  The root
file system needs no registry: a skeleton of directories whose ``/usr`` and
``/etc`` are read-only bind mounts of the machine's, with the Python
installation and this project (its virtual environment and sources)
bind-mounted read-only at the same paths.  podman gets it as an image
(``tar | podman import``) on the source host and copies it to the others with
``podman save | podman load``, as a registry would; each host's containerd
(:mod:`.containerd`) imports it as an OCI archive.

:meth:`ContainerHosts.close` removes every container, image, store, bundle and
cgroup it made; the lab's directory carries its owner's run tag, so that a later
run sweeps all of it should the owner die first (:mod:`.sweep`).

The root file system and each container's OCI configuration are
:mod:`.container_spec`; the applications the lab runs in these containers,
and how they are asked and counted, are :mod:`.containers`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

from ..containers import podnet
from ..containers.base import ContainerError
from ..containers.cgroups import remove_cgroup
from ..containers.command import run_engine
from ..containers.containerd import Ctr
from ..containers.podman import Podman
from ..containers.podman_store import remove_all, share_image
from ..containers.runc import Runc
from ..containers.settings import ContainerSettings
from ..criu import Criu
from ..errors import MigSGXError
from .container_spec import make_skeleton, python_binds, runtime_spec
from .containerd import ContainerdDaemon, lab_settings, run_container
from .sweep import unmount_below, write_owner

if TYPE_CHECKING:
    from .testbed import Testbed

__all__ = ["IMAGE", "POD_HOSTS", "ContainerHosts"]

IMAGE: Final = "localhost/migsgx-lab:1"
#: Host numbers of the addresses containers may own on a bridged testbed (10.250.S.N).
POD_HOSTS: Final = range(100, 120)


class ContainerHosts:
    """Container engines on the hosts of a testbed (see the module docstring)."""

    def __init__(self, bed: Testbed, *, criu: Criu | None = None) -> None:
        self.bed = bed
        self.criu = criu or Criu()
        self.token = secrets.token_hex(3)
        # Short paths: podman's sockets live under its run directory.
        self.base = Path(f"/run/migsgx-lab-{os.getpid()}-{self.token}")
        self.settings: dict[str, ContainerSettings] = {}
        self._image_hosts: set[str] = set()
        self._containerd: dict[str, ContainerdDaemon] = {}
        #: Network namespaces of containers that own their address (made here or by agents).
        self.pod_prefix = f"migsgx-lab-{self.token}-"

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self.base.mkdir(mode=0o700)
        write_owner(self.base)  # a later run sweeps the lab if this process dies first
        make_skeleton(self.base / "rootfs")
        for name in self.bed.names:
            host = self.bed.host(name)
            settings = ContainerSettings(
                pod_bridge=host.bridge,
                pod_netns_prefix=f"{self.pod_prefix}{name}-",
                pod_addresses=tuple(
                    f"{host.network[i]}/{host.network.prefixlen}" for i in POD_HOSTS
                )
                if host.bridge
                else (),
                runc_root=self.base / name / "runc",
                podman_root=self.base / name / "podman",
                podman_storage_driver="vfs",
                cgroup_parent=f"/migsgx-lab-{self.token}-{name}",
                netns=Path("/run/netns") / self.bed.host(name).netns,
                **lab_settings(self.base / name / "ctrd", f"migsgx-lab-{self.token}-{name}"),  # type: ignore[arg-type]
                bind_sources=self.bind_sources(),
            )
            settings.save(self.bed.state(name))
            self.settings[name] = settings

    def bind_sources(self) -> tuple[Path, ...]:
        """What the lab's containers bind-mount: each host allows it (``containers.toml``)."""

        images = self.bed.deployment.root / "images"  # the signed enclave images
        return (*(Path(source) for source, _dest, _ro in python_binds()), images)

    def runc(self, host: str) -> Runc:
        return Runc(self.settings[host].runc_root, self.criu.binary)

    def podman(self, host: str) -> Podman:
        return Podman(self.settings[host], self.criu.binary)

    def import_containerd_image(self, host: str) -> None:
        """The lab's image into the host's containerd store (again), as a pull would."""

        self.ctr(host)
        self._containerd[host].import_image(self.base / "rootfs")

    def ctr(self, host: str) -> Ctr:
        """``ctr`` for the host's containerd (started, with the lab's image, on first use)."""

        daemon = self._containerd.get(host)
        if daemon is None:
            daemon = ContainerdDaemon(self.base / host / "ctrd", self.settings[host], self.criu)
            self._containerd[host] = daemon
            daemon.start()
            daemon.import_image(self.base / "rootfs")
        return daemon.ctr

    # --- images -------------------------------------------------------------------------------
    def podman_image(self, host: str) -> str:
        """The lab's image on ``host`` (made on the first host asked, copied to the others)."""

        if host in self._image_hosts:
            return IMAGE
        if not self._image_hosts:
            tar = subprocess.Popen(
                ["tar", "-C", str(self.base / "rootfs"), "-c", "."], stdout=subprocess.PIPE
            )
            try:
                proc = subprocess.run(
                    self.podman(host).argv("import", "-", IMAGE),
                    stdin=tar.stdout,
                    capture_output=True,
                    env=self.podman(host).env,
                    timeout=120,
                    check=False,
                )
            finally:
                if tar.stdout is not None:
                    tar.stdout.close()
                tar.wait(timeout=60)
            if proc.returncode != 0:
                raise ContainerError(f"podman import failed: {proc.stderr.decode()[-500:]}")
        else:
            first = next(iter(self._image_hosts))
            scratch = self.base / f"image-{host}"
            scratch.mkdir(exist_ok=True)
            share_image(self.podman(first), self.podman(host), IMAGE, scratch)
        self._image_hosts.add(host)
        return IMAGE

    # --- containers ---------------------------------------------------------------------------
    def start_container(
        self,
        engine: str,
        name: str,
        at: str,
        argv: list[str],
        env: list[str],
        binds: list[tuple[str, str, bool]],
        *,
        private_net: bool = False,
        patch: Callable[[dict[str, Any]], None] | None = None,
        netns: Path | None = None,
    ) -> None:
        """``argv`` in a new container ``name`` of ``engine`` on host ``at``.

        ``private_net``, ``patch`` and ``netns`` are runc's (the caller checks).
        """

        if engine == "runc":
            self._run_runc(
                name, at, argv, env, binds, private_net=private_net, netns=netns, patch=patch
            )
        elif engine == "containerd":
            self._run_containerd(name, at, argv, env, binds)
        else:
            self._run_podman(name, at, argv, env, binds)

    def _run_runc(
        self,
        name: str,
        at: str,
        argv: list[str],
        env: list[str],
        binds: list[tuple[str, str, bool]],
        *,
        private_net: bool = False,
        patch: Callable[[dict[str, Any]], None] | None = None,
        netns: Path | None = None,
    ) -> None:
        settings = self.settings[at]
        bundle = self.base / at / "bundles" / name
        bundle.mkdir(parents=True)
        shutil.copytree(self.base / "rootfs", bundle / "rootfs", symlinks=True)
        spec = runtime_spec(
            argv, env, binds,
            netns=None if private_net else (netns or settings.netns),
            cgroups_path=f"{settings.cgroup_parent}/{name}",
            hostname=name,
        )  # fmt: skip
        if patch is not None:
            patch(spec)
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))
        self.runc(at).run(name, bundle)

    def _run_podman(
        self,
        name: str,
        at: str,
        argv: list[str],
        env: list[str],
        binds: list[tuple[str, str, bool]],
    ) -> None:
        settings = self.settings[at]
        for host in (at, *self.bed.names):  # every host has it, as if pulled from a registry
            image = self.podman_image(host)
        args = ["run", "--detach", "--name", name, "--network", f"ns:{settings.netns}"]
        args += ["--cgroup-parent", str(settings.cgroup_parent)]
        args += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
        args += ["--tmpfs", "/tmp"]
        for item in env:
            args += ["--env", item]
        for source, dest, readonly in binds:
            args += ["--volume", f"{source}:{dest}" + (":ro" if readonly else "")]
        self.podman(at)(*args, image, *argv, what=f"podman run {name}")

    def _run_containerd(
        self,
        name: str,
        at: str,
        argv: list[str],
        env: list[str],
        binds: list[tuple[str, str, bool]],
    ) -> None:
        settings = self.settings[at]
        for host in self.bed.names:  # every host has the image, as if pulled from a registry
            ctr = self.ctr(host)
        ctr = self.ctr(at)
        run_container(ctr, name, "localhost/migsgx-lab:1", argv, env, binds,
                      netns=settings.netns, cgroup=f"{settings.cgroup_parent}/{name}")  # fmt: skip

    def containers(self, host: str, engine: str) -> list[str]:
        if engine == "containerd":
            return self.ctr(host).containers()
        if engine == "runc":
            return self.runc(host).list()
        out = self.podman(host)("ps", "--all", "--format", "{{.Names}}", what="podman ps",
                                check=False)  # fmt: skip
        return out.split()

    def remove_on(self, engine: str, name: str, host: str) -> None:
        """Remove container ``name`` of ``engine`` on ``host`` if it is there."""

        if engine == "containerd":
            with contextlib.suppress(MigSGXError):
                self.ctr(host).remove(name)
        elif engine == "runc":
            runc = self.runc(host)
            if runc.state(name) is not None:
                with contextlib.suppress(MigSGXError):
                    runc.delete(name)
            podnet.give_up(Path("/run/netns") / f"{self.settings[host].pod_netns_prefix}{name}")
        else:
            podman = self.podman(host)
            if podman.inspect(name) is not None:
                with contextlib.suppress(MigSGXError):
                    podman.remove(name)

    # --- the end ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every container, image, store, bundle and cgroup of the lab."""

        for daemon in self._containerd.values():
            with contextlib.suppress(MigSGXError):
                daemon.remove_all()
            daemon.stop()
        for host, settings in self.settings.items():
            runc = self.runc(host)
            for name in runc.list():
                with contextlib.suppress(MigSGXError):
                    runc.delete(name)
            if settings.podman_root is not None and settings.podman_root.exists():
                remove_all(self.podman(host))
                run_engine(self.podman(host).argv("system", "reset", "--force"),
                           what="podman system reset", env=self.podman(host).env,
                           check=False)  # fmt: skip
            if settings.cgroup_parent:
                remove_cgroup(settings.cgroup_parent)
            with contextlib.suppress(OSError):
                (self.bed.state(host) / "containers.toml").unlink()
        for entry in sorted(Path("/run/netns").glob(f"{self.pod_prefix}*")):
            podnet.give_up(entry)
        unmount_below(self.base)
        shutil.rmtree(self.base, ignore_errors=True)
