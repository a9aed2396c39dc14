"""``migsgx recover`` on a destination host: the held trees a dead agent left.

The destination's durable records are its agent's held-tree records
(:mod:`.held`, ``WORK_DIR/<session>/held.json``).  Only an agent's start-up pass
(:mod:`.adoption`) acts on them; while no agent serves the state nobody does:
an undecided held tree (window W2) waits stopped for the state to come again,
and a claimed one (W3) waits stopped while its enclaves hold the only copy.
So ``recover`` lists them, and takes over what needs no agent's session:

* Whether an agent serves the state is told by its work directory's lock
  (:func:`serving_lock`): every agent holds it shared from before its start-up
  pass until it exits (the kernel drops it when the agent dies, ``kill -9``
  included).  ``recover`` asks for it exclusively, without waiting: refused, an
  agent serves the state (or another ``recover`` takes its records over) and
  its records are left to it, reported as such and never in doubt.
* Granted, ``recover`` holds it until it returns: an agent started meanwhile
  waits for it before its own pass, so the two never take one tree over twice.
  A claimed tree (W3) is taken over by the agent's own step
  (:meth:`.Adoption.take_over_claimed`: the enclaves' duplicates taken back,
  the tree continued, the application attached; the session directory goes,
  so that the agent, once back, answers a delivery of it ``resumed`` from the
  claim store and the source's ``recover`` ends the source).  That needs the
  agent's configuration as its own start reads it from the state (identity,
  platform socket, containers); without it, or where the step cannot take
  every duplicate back, the tree is reported in doubt as below.
* Every other record stays for the agent (an undecided tree needs its
  sessions to hear the decision; the rest its start-up pass removes) and is
  reported in doubt with what is held and the step: start the agent on that
  state.  An unreadable record is reported too, never skipped.

Only the default work directory (``STATE/agent/work``) is read: an agent
started with ``--work-dir`` elsewhere keeps its records there.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..errors import ConfigError, MigSGXError
from .held import LOST, HeldRecord, claimed_count, held_records
from .recover_records import Resolution
from .tls import AgentIdentity

if TYPE_CHECKING:
    from .adoption import Adoption
    from .config import AgentConfig

__all__ = ["DestinationResolution", "recover_destination", "serving_lock", "work_dir_of"]

log = logging.getLogger("migsgx.recover")

#: How often a starting agent says that it waits for the lock.
WAIT_SAID: Final = 5.0


@dataclass
class DestinationResolution(Resolution):
    """One destination record: what it holds, and the step that resolves it."""

    #: What is held: the tree (driver, root pid), its enclaves, how many ids are claimed.
    held: dict[str, Any] = field(default_factory=dict)
    #: What to do next (empty once nothing is left to do here).
    step: str = ""


def work_dir_of(state: Path) -> Path:
    """The agent's default work directory under ``state`` (``migsgx agent serve``'s)."""

    return Path(state) / "agent" / "work"


def serving_lock(work_dir: Path) -> int:
    """Take the work directory's lock (``flock`` on the directory) shared, for as long
    as the agent runs; its fd.

    Waits while a ``migsgx recover`` holds it (it takes a dead agent's trees
    over), saying so every few seconds; agents on one work directory share it.
    """

    try:
        fd = _open(work_dir)
    except OSError as exc:
        raise ConfigError(f"the agent's work directory {work_dir}: {exc}") from exc
    said = 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            now = time.monotonic()
            if now - said >= WAIT_SAID:
                said = now
                log.warning("the lock of %s is held by migsgx recover (it takes a former "
                            "agent's trees over): waiting for it before the start-up pass",
                            work_dir)  # fmt: skip
            time.sleep(0.1)


def _open(work_dir: Path) -> int:
    """The work directory itself, opened for its lock (``flock`` on a directory: no
    file to create, so none whose owner could keep an agent of another user out)."""

    return os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@contextlib.contextmanager
def _no_agent(work_dir: Path) -> Iterator[bool]:
    """Whether no agent serves ``work_dir`` (its lock held here meanwhile)."""

    try:
        fd = _open(work_dir)
    except OSError as exc:
        raise MigSGXError(f"the agent's work directory {work_dir}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # (the lock with it)


def recover_destination(
    state: Path, identity: AgentIdentity | None = None
) -> list[DestinationResolution]:
    """Resolve, or report, every destination record under ``state`` (none: [])."""

    work_dir = work_dir_of(state)
    if not held_records(work_dir):
        return []  # (and no lock taken)
    with _no_agent(work_dir) as free:
        if not free:
            log.warning("the held-tree records under %s are left to whoever holds their "
                        "lock (the agent that serves this state, or another migsgx recover "
                        "running now): nothing done here", work_dir)  # fmt: skip
            return []
        records = held_records(work_dir)  # (again: as they are now that no agent may act)
        # (read only for a claimed tree: its configuration is all the take-over needs)
        adoption = functools.cache(lambda: _adoption(Path(state), work_dir, identity))
        return [_one(Path(state), d, r, adoption) for d, r in records]


def _adoption(state: Path, work_dir: Path, identity: AgentIdentity | None) -> Adoption | None:
    """The agent's start-up pass over ``work_dir``, as its own start configures it;
    None if that configuration cannot be read from the state."""

    # (only here: the containers' drivers and the agent's metrics are heavy to import,
    # and a recover with nothing in doubt must not load them, test_recover_imports)
    from ..containers import ContainerSettings
    from ..sgx.listener import default_socket
    from .adoption import Adoption
    from .config import AgentConfig

    try:
        config = AgentConfig(
            state=state, listen=("", 0), platform_socket=default_socket(state),
            identity=identity or AgentIdentity.of_state(state), work_dir=work_dir,
            containers=ContainerSettings.load(state),
        )  # fmt: skip
        host = _Host(config, (identity or config.identity).host_id())
    except (MigSGXError, OSError, ValueError) as exc:
        log.warning("the agent's configuration cannot be read from %s (%s): claimed trees "
                    "are left for the agent", state, exc)  # fmt: skip
        return None
    return Adoption(host)


class _Host:
    """What the start-up pass asks of its agent, for ``recover``: no sessions (it
    takes only claimed trees over, which need none)."""

    def __init__(self, config: AgentConfig, host_id: str) -> None:
        from .metrics import AgentMetrics

        self.config = config
        self.host_id = host_id
        self.metrics = AgentMetrics(host_id)

    def session_dir(self, session_id: bytes) -> Path:
        raise MigSGXError("migsgx recover holds no session")

    def adopt(self, pid: int) -> None:
        return None

    def discard(self, path: Path | None) -> None:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def hold(self, session: Any) -> None:
        raise MigSGXError("migsgx recover holds no session")

    def unhold(self, session: Any) -> None:
        return None

    def find_session(self, mid: bytes, besides: Any = None) -> Any:
        return None

    def in_doubt(self) -> list[bytes]:
        return []

    def live_arrivals(self) -> set[bytes]:
        return set()


#: What each of :data:`.held.WINDOWS` means to an operator.
_WHAT: Final = {
    "post-copy": "a post-copy tree (its page window cannot be opened again): the agent's "
    "start-up pass kills it; the source's decision says what remains",
    "restoring": "a restore that never returned: the agent's start-up pass removes it",
    "gone-or-running": "a recorded tree that is gone or runs: the agent's start-up pass "
    "clears the record",
    "unanswered": "a restored tree never reported held (never decided on): the agent's "
    "start-up pass removes it",
    "no-enclaves": "a held tree without enclaves: the agent's start-up pass finishes it by "
    "its resume marker",
    "held": "a held tree waiting, stopped, for the source's decision (W2): the agent's "
    "start-up pass adopts it, and the source's recover delivers the decision to it",
    "claimed": "a held tree whose enclaves claimed their ids (W3): stopped, its enclaves "
    "hold the only copy of the state",
}


def _one(
    state: Path,
    directory: Path,
    record: HeldRecord | None,
    adoption_of: Callable[[], Adoption | None],
) -> DestinationResolution:
    start = (f"start the agent on this state (migsgx agent serve --state {state} ...): "
             "its start-up pass takes the record over; then run migsgx recover on the "
             "source host")  # fmt: skip
    if record is None:
        return DestinationResolution(
            directory.name[:64], "?", "?", "in-doubt",
            f"an unreadable held-tree record in {directory}: the tree it names (if any) "
            "stays as it is", step=f"check {directory / 'held.json'} by hand",
        )  # fmt: skip
    kind = record.window(state)
    claimed = claimed_count(state, record.arrivals)
    held = {
        "kind": kind, "driver": record.driver, "root": record.root,
        "enclaves": len(record.enclaves), "claimed": claimed, "source": record.peer,
        "directory": str(directory),
    }  # fmt: skip
    mid = record.session_id
    decision = "commit" if claimed else "?"
    adoption = adoption_of() if kind == "claimed" else None
    if adoption is not None:
        try:
            taken = adoption.take_over_claimed(directory, record)
        except (MigSGXError, OSError, ValueError) as exc:
            log.error("migration %s: the claimed tree was not taken over: %s", mid[:8], exc)
            taken = False
        if taken and (directory / LOST).is_file():
            return DestinationResolution(
                mid, "claimed", decision, "lost",
                f"the claimed tree (pid {record.root}) was continued but could not be attached "
                "to its enclaves: the state is lost", held=held,
            )  # fmt: skip
        if taken:
            return DestinationResolution(
                mid, "resumed", decision, "moved",
                f"the claimed tree (pid {record.root}, {record.driver}) was resumed here with "
                f"its {len(record.enclaves)} enclave(s), their duplicates taken back (W3)",
                held=held,
                step="start the agent on this state, then run migsgx recover on the source "
                "host: it hears resumed and ends the stopped source",
            )  # fmt: skip
    return DestinationResolution(
        mid, kind, decision, "in-doubt",
        f"{_WHAT[kind]} (pid {record.root}, {record.driver}, {len(record.enclaves)} "
        "enclave(s)); no agent serves this state", held=held, step=start,
    )  # fmt: skip
