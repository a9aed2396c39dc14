"""What migsgx migrates, behind one seam: process trees, runc, podman and containerd containers.

:data:`DRIVERS` is the one table of drivers, by name; :func:`make_driver` binds
one to a host (:class:`HostConfig`).  The migration engine (``migsgx.agent``)
only ever sees the :class:`Driver` protocol.  See ``docs/containers.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import (
    ContainerError,
    Driver,
    DumpPlan,
    HostConfig,
    Restored,
    RestoreRequest,
    Source,
    check_name,
)
from .settings import ContainerSettings

__all__ = [
    "DRIVERS",
    "ContainerError",
    "ContainerSettings",
    "Driver",
    "DumpPlan",
    "HostConfig",
    "RestoreRequest",
    "Restored",
    "Source",
    "check_name",
    "make_driver",
]

if TYPE_CHECKING:
    DRIVERS: dict[str, Callable[[HostConfig], Driver]]


def _drivers() -> dict[str, Callable[[HostConfig], Driver]]:
    """The table, its drivers imported on first use: what only reads this package's
    light modules (``migsgx recover``: cgroups, gates, engine notes) never pays for
    every engine's client and CRIU's image schema (docs/benchmarks.md)."""

    from .containerd import ContainerdDriver
    from .pid import PidDriver
    from .podman import PodmanDriver
    from .runc import RuncDriver

    return {
        PidDriver.name: PidDriver,
        RuncDriver.name: RuncDriver,
        PodmanDriver.name: PodmanDriver,
        ContainerdDriver.name: ContainerdDriver,
    }


def __getattr__(name: str) -> object:
    if name == "DRIVERS":
        table = _drivers()
        globals()["DRIVERS"] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_driver(name: str, host: HostConfig) -> Driver:
    """The driver called ``name``, for ``host``; an unknown name is a :class:`ContainerError`."""

    factory = _drivers().get(name)
    if factory is None:
        raise ContainerError(f"no driver {name!r} (known: {', '.join(sorted(_drivers()))})")
    return factory(host)
