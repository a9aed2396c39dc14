"""What a storm migrates: the kvstore example as a plain process, or in a container
(runc, podman or containerd).

One interface over both (:class:`Target`), so that the storm's migrations,
checks and clean-ups do not care which: where its copies are and whether they
can run, which pid a guardian and a journal name, what ``migsgx migrate`` is
told, and how a copy that lost its state is removed.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Protocol

from ..system.process import kill_tree
from .containers import ContainerApp, ContainerLab
from .testbed import AppProcess, Testbed

__all__ = ["ContainerTarget", "ProcessTarget", "Target"]

_NOT_RUNNABLE = ("T", "t", "Z", "X", "")


class Target(Protocol):
    """The application a storm moves, whatever runs it."""

    engine: str
    port: int

    def copies(self) -> dict[str, list[tuple[int, str]]]: ...

    def runnable(self) -> dict[str, int]: ...

    def root_pid(self, host: str) -> int: ...

    def migrate_args(self, pid: int) -> tuple[int | None, list[str]]: ...

    def moved(self, host: str) -> None: ...

    def remove(self) -> None: ...

    def stray(self) -> list[str]: ...


class ProcessTarget:
    """The kvstore as a plain process in a pid namespace of its own (driver ``pid``)."""

    engine = "pid"

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.app: AppProcess = bed.start_app("kvstore", ["--image", str(bed.image("kvstore"))])
        self.port = self.app.port

    def copies(self) -> dict[str, list[tuple[int, str]]]:
        return self.bed.copies(self.app)

    def runnable(self) -> dict[str, int]:
        return self.bed.runnable_copies(self.app)

    def root_pid(self, host: str) -> int:
        running = [p for p, s in self.copies()[host] if s not in _NOT_RUNNABLE]
        if len(running) != 1:
            raise RuntimeError(f"expected one running copy on {host}, found {running}")
        return running[0]

    def migrate_args(self, pid: int) -> tuple[int | None, list[str]]:
        return pid, []

    def moved(self, host: str) -> None:
        self.app = replace(self.app, pid=self.root_pid(host), host=self.bed.host(host))

    def remove(self) -> None:
        for procs in self.copies().values():
            for pid, _ in procs:
                kill_tree(pid)

    def stray(self) -> list[str]:
        return []


class ContainerTarget:
    """The kvstore in a container sharing its host's network namespace (driver ``runc``,
    ``podman`` or ``containerd``: the lab's engine of that name)."""

    def __init__(self, lab: ContainerLab, engine: str = "runc") -> None:
        self.lab, self.engine = lab, engine
        self.at = "src"
        self.app: ContainerApp = lab.start_app(engine, "kvstore", port=lab.bed.net.app_port())
        self.port = self.app.port

    def copies(self) -> dict[str, list[tuple[int, str]]]:
        return self.lab.copies(self.app)

    def runnable(self) -> dict[str, int]:
        return self.lab.runnable_copies(self.app)

    def root_pid(self, host: str) -> int:
        pid = self.lab.root_pid(self.app, host)
        if pid is None:
            raise RuntimeError(f"no container {self.app.name} on {host}")
        return pid

    def migrate_args(self, pid: int) -> tuple[int | None, list[str]]:
        return None, [f"--{self.engine}", self.app.name]

    def moved(self, host: str) -> None:
        self.at = host

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.lab.remove(self.app)
        for procs in self.copies().values():
            for pid, _ in procs:
                kill_tree(pid)

    def stray(self) -> list[str]:
        """The container known to an engine where its copy does not run (a record left)."""

        return [
            f"{self.engine} container {self.app.name} on {host}"
            for host in self.lab.bed.names
            if host != self.at and self.app.name in self.lab.containers(host, self.engine)
        ]
