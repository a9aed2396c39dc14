"""Two emulated hosts on one machine, ready for migrations (tests, benchmark).

Each host is a network namespace (:class:`~migsgx.lab.netns.HostNetwork`) with its
own platform state and platform service, and an agent identity from the
deployment's CA; an agent serves on the destination.  Applications start in
a pid namespace of their own (``unshare --pid --fork``), as a container's
would: on one machine source and destination share the machine's pid space,
and a tree restored while its frozen source still exists needs its pids.

Must run as root.  Everything started is stopped by :meth:`Testbed.close`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _proc
from ..agent.tls import issue_agent_identity
from ..errors import MigSGXError
from ..system.process import process_state, tree_pids
from .hosts import EXAMPLES, Deployment, ServiceProcess, start_service
from .netns import Host, HostNetwork
from .subnets import SubnetClaim, claim_subnet
from .sweep import tag_run

__all__ = ["AgentProcess", "AppProcess", "MigrateRun", "Testbed"]

START_TIMEOUT = 60.0


@dataclass
class AgentProcess:
    host: Host
    proc: subprocess.Popen[bytes]
    address: str
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class AppProcess:
    """An application started in its own pid namespace; ``pid`` is its root there."""

    host: Host
    launcher: subprocess.Popen[bytes]
    pid: int
    port: int
    marker: str
    log: Path


@dataclass
class MigrateRun:
    returncode: int
    stats: dict[str, Any] | None
    stdout: str
    stderr: str
    seconds: float
    #: The tool's pid (``ip netns exec`` execs it: the pid it was started with).
    pid: int = 0


@dataclass
class Testbed:
    __test__ = False  # not a test class, whatever its name

    root: Path
    #: The subnet it would like (``10.250.S.0/24``): it gets the first free one from
    #: there on (:mod:`.subnets`), which ``net.network`` names.
    subnet: int = 0
    names: tuple[str, str] = ("src", "dst")
    #: Hosts hold their address on a bridge: containers can own addresses (lab.netns).
    bridged: bool = False
    deployment: Deployment = field(init=False)
    net: HostNetwork = field(init=False)
    services: dict[str, ServiceProcess] = field(init=False, default_factory=dict)
    agents: list[AgentProcess] = field(init=False, default_factory=list)
    apps: list[AppProcess] = field(init=False, default_factory=list)
    images: dict[str, Path] = field(init=False, default_factory=dict)
    claim: SubnetClaim | None = field(init=False, default=None)
    #: Every ``migsgx migrate`` run so far (what a test checks was left behind).
    tool_runs: list[MigrateRun] = field(init=False, default_factory=list)

    # --- set up and tear down ----------------------------------------------------------------
    def __enter__(self) -> Testbed:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        tag_run()  # what this bed starts, wherever it runs, a later run can sweep
        self.root.mkdir(parents=True, exist_ok=True)
        self.deployment = Deployment.create(self.root / "deployment", names=list(self.names))
        self.claim = claim_subnet(self.subnet)
        try:
            self.net = HostNetwork(list(self.names), subnet=self.claim.subnet, bridged=self.bridged)
            self.net.create()
        except BaseException:
            self.claim.release()
            raise
        try:
            for name in self.names:
                host = self.net[name]
                issue_agent_identity(self.deployment.ca_dir, self.state(name), name, [host.address])
                self.services[name] = start_service(self.state(name), prefix=host.command([]))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for app in self.apps:
            with contextlib.suppress(ProcessLookupError):
                os.kill(app.pid, signal.SIGKILL)
        for agent in self.agents:
            agent.stop()
        for service in self.services.values():
            service.stop()
        with contextlib.suppress(AttributeError):
            self.net.close(raise_errors=False)
        if self.claim is not None:
            self.claim.release()  # (only once its namespaces are gone)

    def state(self, name: str) -> Path:
        return self.deployment.hosts[self.names.index(name)]

    def host(self, name: str) -> Host:
        return self.net[name]

    def image(self, example: str) -> Path:
        if example not in self.images:
            self.images[example] = self.deployment.signed_image(example)
        return self.images[example]

    # --- agents --------------------------------------------------------------------------------
    def start_agent(
        self,
        name: str = "dst",
        *,
        env: Mapping[str, str] | None = None,
        state: Path | None = None,
        platform_socket: Path | None = None,
        args: Sequence[str] = (),
        listen_port: int = 0,
    ) -> AgentProcess:
        """An agent on host ``name``; ``listen_port``: a fixed one (a restart where a journal
        points)."""

        host = self.net[name]
        tag = secrets.token_hex(3)
        ready = self.root / f"agent-{tag}.ready"
        log = self.root / f"agent-{tag}.log"
        argv = [
            sys.executable, "-m", "migsgx", "agent", "serve",
            "--state", str(state or self.state(name)),
            "--listen", f"{host.address}:{listen_port}",
            "--ready-file", str(ready),
            *(["--platform-socket", str(platform_socket)] if platform_socket else []),
            *args,
        ]  # fmt: skip
        with open(log, "ab") as out:  # O_APPEND: CRIU does not pin its size
            proc = host.spawn(argv, stdout=out, stderr=out, env=_env(env))
        _wait_file(ready, proc, log, "the agent")
        address, _, port = ready.read_text().strip().rpartition(":")
        agent = AgentProcess(host, proc, address, int(port), log)
        self.agents.append(agent)
        return agent

    # --- applications ----------------------------------------------------------------------------
    def start_app(
        self,
        example: str,
        args: Sequence[str],
        *,
        name: str = "src",
        timeout: float = START_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> AppProcess:
        """``examples/EXAMPLE/app.py ARGS`` in its own pid namespace on host ``name``.

        ``timeout``: until it says it is ready (an app that first fills gigabytes
        of memory on a busy machine takes longer than the default).  ``env``: added
        to its environment (``MIGSGX_FAULT`` for a fault point of the application,
        ``PYTHONPATH`` for another release's library).
        """

        host = self.net[name]
        marker = secrets.token_hex(4)
        ready = self.root / f"app-{example}-{marker}.ready"
        if "--port" not in args:  # a port of its own, free on every host it may move to
            args = [*args, "--port", str(self.net.app_port())]
        log = self.root / f"app-{example}-{marker}.log"
        argv = [
            "unshare", "--pid", "--fork", "setsid",
            sys.executable, str(EXAMPLES / example / "app.py"),
            "--platform-socket", str(self.services[name].socket),
            "--ready-file", str(ready),
            *args,
        ]  # fmt: skip
        with open(log, "ab") as out:  # O_APPEND: CRIU does not pin its size
            launcher = host.spawn(argv, stdout=out, stderr=out, env=_env(env))
        _wait_file(ready, launcher, log, example, timeout)
        pids = tree_pids(launcher.pid)
        if len(pids) < 2:
            raise MigSGXError(f"the application of {example} is not running; see {log}")
        app = AppProcess(host, launcher, pids[1], int(ready.read_text()), marker, log)
        self.apps.append(app)
        return app

    def ask(self, line: str, port: int, *, at: str, via: str) -> str:
        """Send one request line to the app on host ``at``, from host ``via``."""

        conn = self.net[via].connect(self.net[at].address, port, timeout=30, wait=5)
        with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
            stream.write(line + "\n")
            stream.flush()
            return stream.readline().strip()

    def copies(self, app: AppProcess) -> dict[str, list[tuple[int, str]]]:
        """The app's processes on each host (pid, state), found by the marker in argv."""

        out: dict[str, list[tuple[int, str]]] = {}
        for name in self.names:
            found = []
            for pid in self.net[name].pids():
                cmd = b"\0".join(_proc.argv(pid))
                if app.marker.encode() in cmd and b"app.py" in cmd and b"unshare" not in cmd:
                    found.append((pid, process_state(pid)))
            out[name] = found
        return out

    def runnable_copies(self, app: AppProcess) -> dict[str, int]:
        return {
            name: sum(1 for _, s in procs if s not in ("T", "t", "Z", "X", ""))
            for name, procs in self.copies(app).items()
        }

    # --- migration -------------------------------------------------------------------------------
    def migrate(
        self,
        pid: int | None,
        agent: AgentProcess,
        *,
        name: str = "src",
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        timeout: float = 600.0,
    ) -> MigrateRun:
        """``migsgx migrate PID`` (or, with ``pid=None``, what ``args`` name: ``--runc ID``)."""

        argv = [
            sys.executable, "-m", "migsgx", "migrate",
            *([str(pid)] if pid is not None else []),
            "--to", agent.target, "--state", str(self.state(name)), "--json", *args,
        ]  # fmt: skip
        t0 = time.monotonic()
        with subprocess.Popen(
            self.net[name].command(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(env),
            stdin=subprocess.DEVNULL,
        ) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
        seconds = time.monotonic() - t0
        stats = None
        if proc.returncode == 0:
            with contextlib.suppress(ValueError):
                stats = json.loads(stdout)
        run = MigrateRun(proc.returncode, stats, stdout, stderr, seconds, proc.pid)
        self.tool_runs.append(run)
        return run


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MIGSGX_FAULT", None)
    env.update(extra or {})
    return env


def _wait_file(
    path: Path,
    proc: subprocess.Popen[bytes],
    log: Path,
    what: str,
    timeout: float = START_TIMEOUT,
) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise MigSGXError(f"{what} exited with {proc.returncode}: {tail}")
        if time.monotonic() > deadline:
            raise MigSGXError(f"nothing at {path} after {timeout} s; see {log}")
        time.sleep(0.02)
