"""The lab's applications in containers: started, asked, counted, removed.

For the tests, the demo and the benchmark.  :class:`ContainerLab` runs the
example apps (``examples/EXAMPLE/app.py``) in containers of the engines that
:class:`~.container_hosts.ContainerHosts` sets up on each testbed host, and
finds their copies on every host by a marker in their environment (what a
migration test counts: exactly one runnable copy).

An app with enclaves gets the directory of the host's platform socket
bind-mounted read-only at :data:`PLATFORM_INSIDE`'s directory (a restarted
service's new socket shows in it), and ``MIGSGX_PLATFORM_SOCKET`` naming the
socket; the enclave image is bind-mounted read-only at ``/opt/enclave``.  Its
enclaves run on the host, outside the container, as the platform service
starts them.  An app may instead have a network namespace of its own, or own
an address on a bridged testbed's pod network (runc).
"""

from __future__ import annotations

import secrets
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..containers import podnet
from ..containers.base import ContainerError, check_name
from ..containers.cgroups import Freezer
from ..containers.oci import PLATFORM_ENV
from ..errors import MigSGXError
from .container_hosts import ContainerHosts
from .container_spec import ENCLAVE_INSIDE, PLATFORM_DIR_INSIDE, PLATFORM_INSIDE, python_binds
from .hosts import EXAMPLES

if TYPE_CHECKING:
    from ..criu import Criu
    from .testbed import Testbed

__all__ = ["ContainerApp", "ContainerLab"]

MARKER_ENV: Final = "MIGSGX_LAB_MARKER"
READY_TIMEOUT: Final = 60.0
ENGINES: Final = ("runc", "podman", "containerd")


@dataclass
class ContainerApp:
    engine: str
    name: str
    host: str  # where it was started
    port: int
    marker: str
    extra: dict[str, Any] = field(default_factory=dict)


class ContainerLab(ContainerHosts):
    """The lab's apps in containers on the hosts of a testbed (see the module docstring)."""

    def __init__(self, bed: Testbed, *, criu: Criu | None = None) -> None:
        super().__init__(bed, criu=criu)
        self.apps: list[ContainerApp] = []
        #: How many pod addresses were taken (the next one is the next in the pool).
        self._pods = 0

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
        self.start_container(
            engine, name, at, argv, env, binds, private_net=private_net, netns=pod, patch=patch
        )
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
        self.start_container(engine, name, at, list(argv), env, python_binds())
        app = ContainerApp(engine, name, at, 0, marker)
        self.apps.append(app)
        return app

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

    def remove(self, app: ContainerApp) -> None:
        """Remove the app's container on every host."""

        for host in self.bed.names:
            self.remove_on(app.engine, app.name, host)


def _frozen(pid: int) -> bool:
    try:
        return Freezer.of_pid(pid).state() != "THAWED"
    except MigSGXError:
        return False
