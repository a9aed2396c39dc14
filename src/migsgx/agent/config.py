"""An agent's configuration, and what one incoming migration needs of its agent.

Apart from :mod:`.server` so that :mod:`.incoming` (which the server runs) does
not import the server back: it names the agent by :class:`AgentHost`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..containers import ContainerSettings
from ..criu import Criu
from .metrics import AgentMetrics
from .tls import AgentIdentity

__all__ = ["AgentConfig", "AgentHost"]


@dataclass
class AgentConfig:
    state: Path
    listen: tuple[str, int]
    platform_socket: Path
    identity: AgentIdentity
    work_dir: Path
    criu: Criu = field(default_factory=Criu)
    keep_images: bool = False
    #: Incoming images in RAM (``/dev/shm``) when it has room (:mod:`.imageroom`);
    #: False (the default, measured faster here at 4 GiB): in the work directory.
    images_in_ram: bool = False
    #: A process tree's restore frees its pages from the images as it goes
    #: (``--no-spend-images``: they stay whole until the session's directory goes).
    spend_images: bool = True
    #: Destination enclaves back the memory they load with 2 MiB pages where the
    #: kernel gives them (``--enclave-huge-pages``); False (the default, measured
    #: slower on these VMs, whose free 2 MiB blocks go back to the host): 4 KiB pages.
    enclave_huge_pages: bool = False
    #: The oldest control protocol version accepted from a tool (``--min-protocol``):
    #: 1 while any source host runs the previous release (:mod:`.versions`).
    min_protocol: int = 1
    io_timeout: float = 300.0
    commit_grace: float = 5.0
    subreaper: bool = True  # adopt restored trees (see the module docstring)
    containers: ContainerSettings = field(default_factory=ContainerSettings)


class AgentHost(Protocol):
    """What an incoming migration asks of the agent that runs it."""

    config: AgentConfig
    host_id: str
    metrics: AgentMetrics

    def session_dir(self, session_id: bytes) -> Path: ...

    def adopt(self, pid: int) -> None: ...

    def discard(self, path: Path | None) -> None: ...

    # Sessions kept in doubt (a copy past LOADED without its decision), by migration id.
    def hold(self, session: Any) -> None: ...

    def unhold(self, session: Any) -> None: ...

    def find_session(self, mid: bytes, besides: Any = None) -> Any: ...

    def in_doubt(self) -> list[bytes]: ...

    # The migration ids that the enclaves of live or held sessions loaded.
    def live_arrivals(self) -> set[bytes]: ...
