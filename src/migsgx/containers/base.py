"""The seam between the migration engine and what it migrates.

The engine (``migsgx.agent.source`` on the source host, ``migsgx.agent.incoming``
on the destination) moves enclaves, streams files and decides when to commit; a
:class:`Driver` knows one kind of workload: a process tree (``pid``), a runc
container (``runc``), a podman container (``podman``).  Drivers are chosen by
name from one table (:data:`migsgx.containers.DRIVERS`) and bound to one host's
settings (:class:`HostConfig`).

The contract, source side:

* :meth:`Driver.locate` finds the workload: the root pid of its process tree
  (where the application's migration control is found, and what the fence
  stops) and a small description for the destination (``begin``'s ``target``).
* :meth:`Driver.dump` checkpoints it into ``plan.images`` (and, when the
  driver uses one, CRIU's pages to the destination's page server).  With the
  source frozen and every file complete, it calls ``on_dumped()`` exactly once.
  If that raises, the driver makes the source run again exactly as before
  (unless ``plan.may_resume()`` says the commit point was passed: then it
  leaves the source as it is, frozen and fenced) and re-raises; if it returns,
  the migration committed and the driver removes the source.  Every file left
  in ``plan.images`` travels to the destination.

Destination side:

* :meth:`Driver.admit_spec` checks, at ``begin`` and before anything on the
  source freezes, the OCI runtime specification the source announced
  (:attr:`Source.spec`) against this host's allow list: a refusal then costs
  the source nothing.  :meth:`Driver.restore` checks what actually arrived
  again (the announcement binds nothing).
* :meth:`Driver.restore` makes the workload from the received files and
  leaves every task of it stopped ("held"): nothing of it has run when it
  returns.  A failure cleans up what it made.
* :meth:`Driver.discard` removes a held workload that must not run (abort).
* :meth:`Driver.reclaim` takes over a held workload that an agent, now dead,
  restored (its ``Restored.handle`` and root pid from the agent's held-tree
  record): only if the engine still knows it as that workload, held; the
  result then resumes or is discarded exactly as a fresh restore's.

Everything else (holding, fencing, committing, resuming, attaching enclaves)
is the engine's and the same for every driver.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from ..errors import MigrationError, ProtocolError, register_error
from .settings import ContainerSettings

if TYPE_CHECKING:  # (annotations only: what reads this seam need not load CRIU's RPC)
    from ..criu import Criu, DumpCancel

__all__ = [
    "NAME_PATTERN",
    "ContainerError",
    "Driver",
    "DumpPlan",
    "HostConfig",
    "RestoreRequest",
    "Restored",
    "Source",
    "check_name",
]

#: Container ids and names as runc and podman accept them (and safe as file names).
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@register_error
class ContainerError(MigrationError):
    """A container engine (runc, podman) refused or failed a step."""

    code = "container"


def check_name(value: Any, what: str = "container name") -> str:
    """A container id or name; anything else is a :class:`ProtocolError`."""

    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ProtocolError(f"bad {what} {value!r}")
    return value


@dataclass(frozen=True)
class HostConfig:
    """What a driver needs to know about the host it runs on."""

    criu: Criu
    settings: ContainerSettings = field(default_factory=ContainerSettings)
    #: The host's platform service (destination: what restored containers must reach).
    platform_socket: Path | None = None
    #: Where drivers keep what restored workloads need while they run (runc bundles).
    state_dir: Path | None = None

    def engine_dir(self, engine: str) -> Path:
        """``STATE/agent/<engine>`` (made, private): where an engine's driver keeps
        its CRIU configurations and the marks of what its restores made."""

        if self.state_dir is None:
            raise ContainerError("this agent has no state directory")
        path = self.state_dir / "agent" / engine
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path


@dataclass
class Source:
    """A workload found on the source host."""

    root: int  # the host pid of the root of its process tree
    target: dict[str, Any]  # what the destination's driver needs (``begin``'s ``target``)
    label: str  # for messages
    private: dict[str, Any] = field(default_factory=dict)  # the driver's own notes
    #: Why its established TCP connections cannot be kept ("" when they can: it owns
    #: an address that moves with it, :mod:`.podnet`).
    no_tcp_keep: str = "it shares its host's network namespace: its address cannot move"
    #: The OCI runtime specification it runs with, announced in ``begin`` (containers).
    spec: dict[str, Any] | None = None


@dataclass
class DumpPlan:
    """How :meth:`Driver.dump` must checkpoint, decided by the engine."""

    images: Path  # every file left here is streamed to the destination
    page_server: tuple[str, int] | None  # CRIU's pages go there (drivers that use one)
    page_tls: tuple[Path, Path, Path] | None  # (CA, certificate, key) for the page stream
    tcp_close: bool  # established connections are closed on the destination
    shell_job: bool = False
    #: Established connections move and stay open (the workload's address moves too).
    tcp_keep: bool = False
    #: Post-copy (drivers that can): CRIU serves private memory lazily on a port
    #: of its own after ``on_dumped`` and leaves the tree stopped, never killed;
    #: the engine kills it once committed (``page_server`` is unused).
    lazy: bool = False
    #: Tells the guardian how to undo a step if the tool dies (``thaw PATH``).
    note: Callable[[str], None] = field(default=lambda _line: None)
    #: Whether the source may still run again (False once past the commit point).
    may_resume: Callable[[], bool] = field(default=lambda: True)
    #: Triggered (from another thread) when the migration failed before the commit
    #: point: a driver that can stops its dump early, so the source runs again at once.
    cancel: DumpCancel | None = None
    #: The images directory is the tool's own scratch space (empty, removed after the
    #: migration): a driver may mount over it for the dump (:mod:`.imagefs`).
    scratch_images: bool = False
    #: Post-copy, set by a driver whose source outlives its dump (runc: frozen until
    #: decided) once ``on_dumped`` may run: the engine calls it once, True after the
    #: commit (the source goes), False before it (the source runs again).
    settle: Callable[[bool], None] | None = None
    #: CRIU's end of a local socket pair to the engine's sealed page relay
    #: (:mod:`migsgx.datapath.pagerelay`): a driver that can (pid) has CRIU speak
    #: plain on it, and ignores ``page_server`` and ``page_tls``.
    page_fd: int | None = None
    #: Post-copy, set with ``settle``: the processes that serve the pages (for the
    #: guardian, and to end the serving on an abort); default: the engine's CRIU.
    lazy_pids: Callable[[], list[int]] | None = None
    #: Called once CRIU froze the tree, before it dumps anything of it, where the
    #: driver runs CRIU itself (``query-ext-files``): fault injection (``tool.in-dump``).
    frozen: Callable[[], None] | None = None


@dataclass
class RestoreRequest:
    images: Path  # every file the source streamed, and CRIU's pages
    target: Mapping[str, Any]
    tcp_close: bool
    #: Called with the directory of CRIU's images just before the restore (fault injection).
    before: Callable[[Path], None] | None = None
    #: Post-copy: restore with CRIU lazy pages (a ``criu lazy-pages`` daemon serves
    #: the missing memory from the images directory's socket).
    lazy_pages: bool = False
    #: The session the restore is for (hex): a driver that can marks what it makes
    #: with it, so that :meth:`Driver.remove_made` removes only what it made.
    owner: str = ""
    #: Called once the engine made the workload, before the driver checks it
    #: (fault injection: the agent's death inside the restore).
    made: Callable[[], None] | None = None
    #: A process tree: called with its root's pid once CRIU restored every task
    #: and before CRIU lets them go (its ``post-restore`` notification, answered
    #: only when this returns): from then on a dead agent's CRIU completes the
    #: restore, so the agent records the tree before it answers.
    made_tree: Callable[[int], None] | None = None
    #: The images are read once (an incoming migration's, not a checkpoint's): a
    #: driver that can has CRIU free each block of pages from them as it restores it
    #: (CRIU's ``auto_dedup``), so their page cache goes back to the host during the
    #: restore, where the restored memory takes it, not after it.
    spend_images: bool = False


@dataclass
class Restored:
    """A held workload on the destination."""

    pid: int  # root of its process tree, every task stopped
    label: str
    handle: dict[str, Any] = field(default_factory=dict)
    #: Further processes the agent should reap when they end (a container's monitor).
    adopt: list[int] = field(default_factory=list)
    #: Called once past the commit point, just before the tree runs (a container's
    #: address comes up only then: before, a client's packet would meet no socket).
    before_resume: Callable[[], None] | None = None


def thaw_first(thaw: Callable[[], None], then: Callable[[], None] | None) -> Callable[[], None]:
    """A held container's ``before_resume`` when it was paused while no agent held it.

    Its tasks were frozen inside their job-control stop (:func:`migsgx.agent.held.
    frozen_stopped`): thawed, they are stopped again, and the tree's SIGCONT that
    follows runs them.  Thawed only past the commit point, never on adoption.
    """

    def before_resume() -> None:
        thaw()
        if then is not None:
            then()

    return before_resume


class Driver(Protocol):
    """One kind of workload; see the module docstring for the contract."""

    name: ClassVar[str]

    def uses_page_server(self, page_tls: bool) -> bool:
        """Whether :meth:`dump` sends CRIU's pages to the destination's page server."""
        ...

    def locate(self, target: str) -> Source: ...

    def dump(self, source: Source, plan: DumpPlan, on_dumped: Callable[[], None]) -> None: ...

    def check_target(self, target: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``begin``'s ``target`` on the destination (a :class:`ProtocolError`)."""
        ...

    def admit_spec(self, target: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
        """Refuse, before the source freezes, what :meth:`restore` would refuse of ``spec``.

        ``target`` was checked by :meth:`check_target`; a refusal is a
        :class:`~.admission.SpecRefused` naming the field, and nothing is written.
        """
        ...

    def restore(self, request: RestoreRequest) -> Restored: ...

    def discard(self, restored: Restored) -> None: ...

    def remove_made(self, handle: Mapping[str, Any], owner: str, *, keep_running: bool) -> str:
        """Remove what a restore for session ``owner`` made of the workload ``handle``
        names (engine entry, bundle, pod namespace); what was removed, for the log.

        For a dead agent's record, which may be damaged or forged: nothing is
        removed unless the driver's own mark proves that a restore for
        ``owner`` made it and the agent never resumed it; else a
        :class:`ContainerError`, and nothing is changed.  ``keep_running``:
        leave a workload whose tree the engine still reports live.
        """
        ...

    def reclaim(self, handle: Mapping[str, Any], pid: int) -> Restored:
        """The held workload a dead agent restored, recorded as ``handle`` with root ``pid``.

        Nothing in ``handle`` is trusted as a path: names are checked and every
        path is derived again from this host's settings.  The engine must know
        the workload, with ``pid`` its root and not ended; anything else is a
        :class:`ContainerError`, and nothing is changed.
        """
        ...
