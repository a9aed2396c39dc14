"""Containers on emulated hosts: engine roots, a root file system, the example apps.

For the tests, the demo and the benchmark.  Every host of a
:class:`~migsgx.lab.testbed.Testbed` gets its own runc root, podman store,
cgroup parent and network namespace (``STATE/containers.toml``), because the
hosts share one machine, and allows the host paths the lab's containers
bind-mount (``bind_sources``: a destination refuses any other).  The root
file system needs no registry: a skeleton
of directories whose ``/usr`` and ``/etc`` are read-only bind mounts of the
machine's, with the Python installation and this project (its virtual
environment and sources) bind-mounted read-only at the same paths.  podman
gets it as an image (``tar | podman import``) on the source host and copies
it to the others with ``podman save | podman load``, as a registry would;
each host's containerd (:mod:`.lab_containerd`) imports it as an OCI archive.

An app with enclaves gets the directory of the host's platform socket
bind-mounted read-only at :data:`PLATFORM_INSIDE`'s directory (a restarted
service's new socket shows in it), and ``MIGSGX_PLATFORM_SOCKET`` naming the
socket; the enclave
image is bind-mounted read-only at ``/opt/enclave``.  Its enclaves run on the
host, outside the container, as the platform service starts them.

:meth:`ContainerLab.close` removes every container, image, store, bundle and
cgroup it made; the lab's directory carries its owner's run tag, so that a later
run sweeps all of it should the owner die first (:mod:`.sweep`).

The root file system and each container's OCI configuration are
:mod:`.container_spec`; this module runs the engines with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..containers import podnet
from ..containers.base import ContainerError, check_name
from ..containers.cgroups import Freezer, remove_cgroup
from ..containers.command import run_engine
from ..containers.containerd import Ctr
from ..containers.oci import PLATFORM_ENV
from ..containers.podman import Podman, remove_all, share_image
from ..containers.runc import Runc
from ..containers.settings import ContainerSettings
from ..criu import Criu
from ..errors import MigSGXError
from .container_spec import (
    ENCLAVE_INSIDE,
    PLATFORM_DIR_INSIDE,
    PLATFORM_INSIDE,
    make_skeleton,
    python_binds,
    runtime_spec,
)
from .containerd import ContainerdDaemon, lab_settings, run_container
from .hosts import EXAMPLES
from .sweep import unmount_below, write_owner

if TYPE_CHECKING:
    from .testbed import Testbed

__all__ = ["ContainerApp", "ContainerLab"]

MARKER_ENV: Final = "MIGSGX_LAB_MARKER"
IMAGE: Final = "localhost/migsgx-lab:1"
READY_TIMEOUT: Final = 60.0
#: Host numbers of the addresses containers may own on a bridged testbed (10.250.S.N).
POD_HOSTS: Final = range(100, 120)
ENGINES: Final = ("runc", "podman", "containerd")


@dataclass
class ContainerApp:
    engine: str
    name: str
    host: str  # where it was started
    port: int
    marker: str
    extra: dict[str, Any] = field(default_factory=dict)


class ContainerLab:
    """Container engines on the hosts of a testbed (see the module docstring)."""

    def __init__(self, bed: Testbed, *, criu: Criu | None = None) -> None:
        self.bed = bed
        self.criu = criu or Criu()
        self.token = secrets.token_hex(3)
        # Short paths: podman's sockets live under its run directory.
        self.base = Path(f"/run/migsgx-lab-{os.getpid()}-{self.token}")
        self.settings: dict[str, ContainerSettings] = {}
        self.apps: list[ContainerApp] = []
        self._image_hosts: set[str] = set()
        self._containerd: dict[str, ContainerdDaemon] = {}
        #: Network namespaces of containers that own their address (made here or by agents).
        self.pod_prefix = f"migsgx-lab-{self.token}-"
        self._pods = 0

    def __enter__(self) -> ContainerLab:
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

    # --- applications -------------------------------------------------------------------------
    def start_app(
        self,
        engine: str,
        example: str,
        args: Sequence[str] = (),
        *,
        name: str | None = None,
        at: str = "src",
        enclaves: bool = True,
        port: int = 7000,
        wait: bool = True,
        private_net: bool = False,
        patch: Callable[[dict[str, Any]], None] | None = None,
        own_address: bool = False,
        platform_file: bool = False,
    ) -> ContainerApp:
        """``examples/EXAMPLE/app.py`` in a container of ``engine`` on host ``at``.

        The container joins the host's network namespace, unless ``private_net``
        (runc only): then it has one of its own, reachable only from inside; or
        ``own_address`` (runc, a bridged testbed): a pod namespace of its own on
        the host's bridge with an address that moves with it (``extra["address"]``).
        ``patch`` (runc only) changes its configuration before it starts: what a
        peer's operator may do to a container a destination then receives.
        ``platform_file``: the socket file itself is bind-mounted, not its directory
        (live across a killed service, whose socket is kept; stale after one that ended).
        """

        if engine not in ENGINES:
            raise ContainerError(f"no engine {engine!r}")
        marker = secrets.token_hex(4)
        name = check_name(name or f"{example}-{marker}")
        argv = [sys.executable, str(EXAMPLES / example / "app.py"), "--port", str(port)]
        env = [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "PYTHONUNBUFFERED=1",
            "PYTHONDONTWRITEBYTECODE=1",
            f"{MARKER_ENV}={marker}",
        ]
        binds = python_binds()
        if enclaves:
            argv += ["--image", ENCLAVE_INSIDE, "--platform-socket", PLATFORM_INSIDE]
            env.append(f"{PLATFORM_ENV}={PLATFORM_INSIDE}")
            image = self.bed.image(example)
            binds += [
                (str(image), ENCLAVE_INSIDE, True),
                (str(self.bed.services[at].socket), PLATFORM_INSIDE, False)
                if platform_file
                else (str(self.bed.services[at].socket.parent), PLATFORM_DIR_INSIDE, True),
            ]
        argv += list(args)
        if private_net and engine != "runc":
            raise ContainerError("a network namespace of its own: runc containers only")
        if patch is not None and engine != "runc":
            raise ContainerError("a patched configuration: runc containers only")
        extra: dict[str, Any] = {"private_net": private_net}
        pod: Path | None = None
        if own_address:
            if engine != "runc":
                raise ContainerError("an address of its own: runc containers only")
            pod, extra["address"] = self._pod_netns(name, at)
        if engine == "runc":
            self._run_runc(
                name, at, argv, env, binds, private_net=private_net, netns=pod, patch=patch
            )
        elif engine == "containerd":
            self._run_containerd(name, at, argv, env, binds)
        else:
            self._run_podman(name, at, argv, env, binds)
        app = ContainerApp(engine, name, at, port, marker, extra)
        self.apps.append(app)
        if wait:
            self.wait_ready(app, at)
        return app

    def _pod_netns(self, name: str, at: str) -> tuple[Path, str]:
        """A pod namespace on host ``at``'s bridge, as CNI would make it; (path, address)."""

        settings = self.settings[at]
        if settings.pod_bridge is None:
            raise ContainerError("containers own addresses only on a bridged testbed")
        address = settings.pod_addresses[self._pods % len(settings.pod_addresses)]
        self._pods += 1
        mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
        host = Path("/run/netns") / self.bed.host(at).netns
        path = podnet.take(f"{settings.pod_netns_prefix}{name}", podnet.PodAddress(address, mac),
                           settings.pod_bridge, host=host)  # fmt: skip
        return path, address.partition("/")[0]

    def connect(self, app: ContainerApp, *, via: str, timeout: float = 30.0) -> socket.socket:
        """A TCP connection from host ``via`` to an app that owns its address."""

        return self.bed.net[via].connect(app.extra["address"], app.port, timeout=timeout, wait=5)

    def ask(self, app: ContainerApp, line: str, *, at: str) -> str:
        """One request to the app running on host ``at``, from the other host.

        An app in a network namespace of its own is asked from inside it, on loopback;
        one that owns its address, at that address.
        """

        if app.extra.get("address"):
            via = next(n for n in self.bed.names if n != at)
            conn = self.connect(app, via=via)
            with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
                stream.write(line + "\n")
                stream.flush()
                return stream.readline().strip()
        if not app.extra.get("private_net"):
            via = next(n for n in self.bed.names if n != at)
            return self.bed.ask(line, app.port, at=at, via=via)
        from ..system.process import socket_in_netns

        pid = self.root_pid(app, at)
        if pid is None:
            raise ConnectionRefusedError(f"no container {app.name} on {at}")
        sock = socket_in_netns(pid, socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(30)
            sock.connect(("127.0.0.1", app.port))
            with sock.makefile("rw", encoding="utf-8", newline="\n") as stream:
                stream.write(line + "\n")
                stream.flush()
                return stream.readline().strip()

    def start_command(self, engine: str, argv: Sequence[str], *, at: str = "src") -> ContainerApp:
        """Any command in a container (no enclaves, no port)."""

        marker = secrets.token_hex(4)
        name = f"cmd-{marker}"
        env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE=1",
               f"{MARKER_ENV}={marker}"]  # fmt: skip
        if engine == "runc":
            self._run_runc(name, at, list(argv), env, python_binds())
        elif engine == "containerd":
            self._run_containerd(name, at, list(argv), env, python_binds())
        else:
            self._run_podman(name, at, list(argv), env, python_binds())
        app = ContainerApp(engine, name, at, 0, marker)
        self.apps.append(app)
        return app

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

    def wait_ready(self, app: ContainerApp, at: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ask(app, "PING", at=at) == "PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ContainerError(f"{app.engine} container {app.name} did not answer on {at}")
            time.sleep(0.1)

    # --- looking at containers ------------------------------------------------------------------
    def root_pid(self, app: ContainerApp, at: str) -> int | None:
        if app.engine == "containerd":
            task = self.ctr(at).task(app.name)
            return task[0] if task and task[0] > 0 else None
        if app.engine == "runc":
            state = self.runc(at).state(app.name)
            return int(state["pid"]) if state and state.get("pid") else None
        info = self.podman(at).inspect(app.name)
        pid = int(((info or {}).get("State") or {}).get("Pid") or 0)
        return pid or None

    def copies(self, app: ContainerApp) -> dict[str, list[tuple[int, str]]]:
        """The app's processes on each host (pid, state), found by its marker."""

        from ..system.process import process_state, tree_pids

        needle = f"{MARKER_ENV}={app.marker}".encode()
        out: dict[str, list[tuple[int, str]]] = {}
        for name in self.bed.names:
            found = []
            # In the host's network namespace, or (a namespace of its own) its engine's.
            root = self.root_pid(app, name)
            pids = set(self.bed.net[name].pids()) | set(tree_pids(root) if root else [])
            for pid in sorted(pids):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if needle in environ.split(b"\0"):
                    found.append((pid, process_state(pid)))
            out[name] = found
        return out

    def runnable_copies(self, app: ContainerApp) -> dict[str, int]:
        """Processes of the app per host that can run: neither stopped nor frozen."""

        return {
            name: sum(
                1 for pid, s in procs if s not in ("T", "t", "Z", "X", "") and not _frozen(pid)
            )
            for name, procs in self.copies(app).items()
        }

    def containers(self, host: str, engine: str) -> list[str]:
        if engine == "containerd":
            return self.ctr(host).containers()
        if engine == "runc":
            return self.runc(host).list()
        out = self.podman(host)("ps", "--all", "--format", "{{.Names}}", what="podman ps",
                                check=False)  # fmt: skip
        return out.split()

    def remove(self, app: ContainerApp) -> None:
        """Remove the app's container on every host."""

        for host in self.bed.names:
            self.remove_on(app.engine, app.name, host)

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


def _frozen(pid: int) -> bool:
    try:
        return Freezer.of_pid(pid).state() != "THAWED"
    except MigSGXError:
        return False
