"""What migsgx migrates, behind one seam: process trees, runc, podman and containerd containers.

:data:`DRIVERS` is the one table of drivers, by name; :func:`make_driver` binds
one to a host (:class:`HostConfig`).  The migration engine (``migsgx.agent``)
only ever sees the :class:`Driver` protocol.  See ``docs/containers.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

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
from .containerd import ContainerdDriver
from .pid import PidDriver
from .podman import PodmanDriver
from .runc import RuncDriver
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

DRIVERS: Final[dict[str, Callable[[HostConfig], Driver]]] = {
    PidDriver.name: PidDriver,
    RuncDriver.name: RuncDriver,
    PodmanDriver.name: PodmanDriver,
    ContainerdDriver.name: ContainerdDriver,
}


def make_driver(name: str, host: HostConfig) -> Driver:
    """The driver called ``name``, for ``host``; an unknown name is a :class:`ContainerError`."""

    factory = DRIVERS.get(name)
    if factory is None:
        raise ContainerError(f"no driver {name!r} (known: {', '.join(sorted(DRIVERS))})")
    return factory(host)
