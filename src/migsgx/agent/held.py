"""The destination's durable record of a held tree: what a restarted agent adopts.

Window W2 (``docs/spec/commit.md``): after ``restored`` the tree waits, stopped,
for the source's decision, and its enclaves' loaded copies live only in the
agent's connections.  If the agent dies, those copies end with it, but the
tree does not: it stays stopped and nobody owns it.  The source may have
committed; its frozen enclaves can then deliver their state again, but only
to a session that holds the tree.  So the agent writes ``held.json`` into the
session's work directory when it answers ``restored``, and removes it when the
session ends.  A restarted agent reads every such record: a tree that is still
the one recorded (same pid, same start time, stopped) is adopted into a session
held in doubt, waiting for the state again.  A container's tree is adopted
only if its engine still knows the container as that tree (the driver's
``reclaim``; ``handle`` names the container, and its bundle and pod namespace
are derived again from the id, never taken from the record as paths); it is
then resumed or discarded by its engine as after a fresh restore.  Any other
recorded tree is removed (a container's by its engine) and the log says
exactly what remained.  For a container, a first record (``restoring``: the
engine and the container's name, no tree yet) is written before the engine is
asked to restore it: an agent that dies inside the restore leaves a container
or a bundle that a restarted agent removes through the engine, but only what
the driver's mark proves this agent's restore made for that session and never
resumed (a forged record naming another container removes nothing).  A
process tree gets the same first record, and CRIU's ``post-restore``
notification names its root in it (pid, start time) before CRIU lets the
tasks go: from then on a dead agent's CRIU completes the restore, and a
restarted agent kills exactly that tree (before then CRIU ends the restore
itself, killing what it made).  The
record is written again as soon as the tree is
restored (``answered`` false) and again right before the agent answers
``restored``: a tree restored by an agent that died before that answer was
never decided on (the source commits only after it) and is removed, so that
nothing is left to block a later migration of the same container.  A tree whose
enclaves had already claimed their migration ids (window W3) is not waiting
for anything: each enclave kept a duplicate of the agent's end of its
connection from right before its claim (``holders``), so a restarted agent
takes them back and resumes the tree with them (:mod:`.adoption`); only where
one cannot be taken back (its enclave died, the state with it) is the tree
killed and a ``lost.json`` left in its place, so that a delivery for that
session is answered ``lost-after-commit``, not ``resumed``.  A tree without enclaves is
recorded too, but waits for nothing: its commit point is the resume, and the
restarted agent finishes it by the resume marker (:mod:`.resumed`).

A post-copy tree (its page window open: a ``criu lazy-pages`` daemon holds its
missing pages, connected to the source's CRIU) is recorded too, with that
daemon.  Another agent cannot open the window again (the tree's userfaultfds
live only in the daemon, and its page connection in the source's CRIU), so
the tree can never run: a restarted agent kills it (while it is stopped: it
never reads a missing page) and then the daemon, and removes a container by
its engine.  The source decides what remains: before its decision it runs on;
after a COMMIT the state is lost (``recover`` says so), never run twice.

Nothing in the record is secret: the session id, pids, the enclaves' public
infos (the session's data key is new after a restart and lives in memory only).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Final

from .._fs import write_private
from .._proc import start_time
from .._records import hex_text, json_record, non_negative_int, own_record
from ..errors import RecordDamagedError
from ..sgx.counters import COUNTERS, CounterStore

__all__ = [
    "LOST",
    "RECORD",
    "WINDOWS",
    "HeldRecord",
    "claimed_count",
    "frozen_stopped",
    "held_records",
    "lost_detail",
    "mark_lost",
    "start_time",
]

RECORD: Final = "held.json"
#: What :meth:`HeldRecord.window` tells apart.
WINDOWS: Final = (
    "post-copy", "restoring", "gone-or-running", "unanswered", "no-enclaves", "claimed", "held",
)  # fmt: skip
LOST: Final = "lost.json"


@dataclass
class HeldRecord:
    session_id: str  # hex
    root: int
    start: int
    driver: str
    peer: str  # the source host's address (the only one that may deliver again)
    local: str  # this agent's address (data listeners bind to it)
    enclaves: list[str]  # each enclave's info as begin carried it, hex CBOR
    #: Each loaded copy's migration id (hex; "" if unknown): claimed ones ran (W3).
    arrivals: list[str] = field(default_factory=list)
    #: The driver's handle of the restored workload (``Restored.handle``: a
    #: container's engine id or name, bundle, pod namespace); {} for a process tree.
    handle: dict[str, str] = field(default_factory=dict)
    #: Each loaded copy's enclave process as [pid, start time], for a restarted
    #: agent's log: a copy whose process still runs did not end with the agent.
    enclave_procs: list[list[int]] = field(default_factory=list)
    #: False from the restore until the agent answers ``restored``: before that
    #: answer the source cannot have decided, so a restarted agent removes the
    #: tree (a container by its engine) instead of adopting it.
    answered: bool = True
    #: True from before the engine is asked to restore a container until it
    #: returned (``root`` and ``start`` 0, ``handle`` the target's name): a
    #: restarted agent removes through the engine whatever the restore made,
    #: if the driver's mark proves this agent made it (``remove_made``).
    restoring: bool = False
    #: Post-copy: the ``criu lazy-pages`` daemon that holds the tree's missing
    #: pages, as [pid, start time] ([] otherwise).  Its page window cannot be
    #: opened again by another agent: such a tree is never adopted, only killed.
    lazy_pages: list[int] = field(default_factory=list)
    #: Each enclave's duplicate of the agent's end of its connection, given right
    #: before its claim (``__mig_hold``), as ``[pid, fd, start, nonce]`` (the
    #: enclave process, the duplicate's number there, the process's start time as
    #: text, the hold's nonce in hex; :func:`~.holders.take_held`): a tree whose
    #: ids were claimed is resumed with them by a restarted agent (W3).
    holders: list[list[object]] = field(default_factory=list)
    #: Each claimed enclave's own info (hex CBOR), in the order of ``holders``:
    #: what the application is attached with.
    holder_infos: list[str] = field(default_factory=list)

    def write(self, directory: Path) -> None:
        """Atomically; fsync'd only once ``answered`` (before, it guards against the
        agent's death alone: a host that goes down takes the tree with it, and the
        write stays off the restore's share of the downtime)."""

        data = json.dumps(asdict(self), sort_keys=True).encode()
        write_private(directory / RECORD, data, sync=self.answered)

    @classmethod
    def load(cls, path: Path) -> HeldRecord:
        """The record in ``path``; :class:`RecordDamagedError` unless every field is usable."""

        return cls.parse(path.read_bytes(), path)

    @classmethod
    def parse(cls, raw: bytes, path: Path) -> HeldRecord:
        """The record in ``raw`` (read from ``path``); as :meth:`load`."""

        data = json_record(raw, f"held-tree record {path}")
        texts = ("session_id", "driver", "peer", "local")
        if (
            set(data) - set(_FIELDS)
            or any(k not in data for k in _REQUIRED)
            or not all(isinstance(data[k], str) for k in texts)
            or not non_negative_int(data["root"], 1 << 31)
            or not non_negative_int(data["start"])
            or not isinstance(data["enclaves"], list)
            or not isinstance(data.get("arrivals", []), list)
            or not data["session_id"]
            or not all(hex_text(i) for i in (data["session_id"], *data["enclaves"]))
            or not all(hex_text(i) for i in data.get("arrivals", []))
            or not _handle(data.get("handle", {}))
            or not _procs(data.get("enclave_procs", []))
            or not isinstance(data.get("answered", True), bool)
            or not isinstance(data.get("restoring", False), bool)
            or not _procs([data["lazy_pages"]] if data.get("lazy_pages") else [])
            or not _holders(data.get("holders", []))
            or not isinstance(data.get("holder_infos", []), list)
            or not all(hex_text(i) for i in data.get("holder_infos", []))
        ):
            raise RecordDamagedError(f"{path} is not a held-tree record")
        return cls(**data)

    def window(self, state: Path) -> str:
        """Which window the record's tree is in, one of :data:`WINDOWS`, in the order a
        restarted agent's start-up pass tells them apart (:mod:`.adoption`, which acts
        on it, and ``migsgx recover`` on this host, which reports it): a post-copy
        tree; a restore that never returned; a tree gone or running; a tree never
        reported held; a held tree without enclaves; held with some enclave id
        claimed in this host's claim store under ``state`` (W3); held, undecided (W2)."""

        if self.lazy_pages:
            return "post-copy"
        if self.restoring:
            return "restoring"
        if not self.still_held():
            return "gone-or-running"
        if not self.answered:
            return "unanswered"
        if not self.enclaves:
            return "no-enclaves"
        return "claimed" if claimed_count(state, self.arrivals) else "held"

    def still_held(self) -> bool:
        """Whether the recorded tree is still there, the same process, stopped
        (or a container's, frozen while stopped: :func:`frozen_stopped`)."""

        from ..system.process import process_state

        if self.restoring or self.root <= 0 or start_time(self.root) != self.start:
            return False
        return process_state(self.root) in ("T", "t") or self.frozen()

    def frozen(self) -> bool:
        """Whether the recorded container's tree is paused (its cgroup frozen) with every
        task frozen inside its job-control stop, so that a thaw gives a stopped tree back."""

        from ..system.process import tree_pids

        if self.driver == "pid" or self.root <= 0 or start_time(self.root) != self.start:
            return False
        pids = tree_pids(self.root)
        return bool(pids) and all(frozen_stopped(pid) for pid in pids)

    def kill(self) -> None:
        """Kill the recorded tree; a frozen one is thawed only after its SIGKILL (a
        frozen task dies only once thawed, and a pending SIGKILL comes before any
        of its code)."""

        from ..containers.base import ContainerError
        from ..containers.cgroups import Freezer
        from ..containers.frozen import kill_frozen
        from ..system.process import kill_tree

        if self.frozen():
            with contextlib.suppress(ContainerError):
                kill_frozen(self.root, Freezer.of_pid(self.root))
                return
        kill_tree(self.root)

    def end_lazy_pages(self) -> bool:
        """SIGKILL the recorded lazy-pages daemon if it is still that process; whether it was."""

        if len(self.lazy_pages) != 2:
            return False
        pid, start = self.lazy_pages
        if pid <= 0 or start_time(pid) != start:
            return False
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        return True

    def enclaves_running(self) -> list[int]:
        """The recorded enclave processes that still run (same pid, same start time)."""

        return [pid for pid, start in self.enclave_procs if pid > 0 and start_time(pid) == start]


def frozen_stopped(pid: int) -> bool:
    """Whether ``pid`` was stopped when its cgroup froze (``runc pause``, ``podman pause``).

    A frozen task does not read as stopped (cgroup v1: ``D``), but one frozen in
    its job-control stop still waits in ``do_signal_stop`` and is stopped again
    when thawed: it never ran.  A task that ran when the freeze came waits
    anywhere else, and such a tree is not the held one.  (Under cgroup v2 a
    stopped task reads ``T`` frozen or not.)
    """

    from ..containers.base import ContainerError
    from ..containers.cgroups import Freezer
    from ..system.process import process_state

    state = process_state(pid)
    if state in ("T", "t"):
        return True
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
        in_stop = state == "D" and wchan == "do_signal_stop"
        return in_stop and Freezer.of_pid(pid).state() == "FROZEN"
    except (OSError, ContainerError):
        return False


_FIELDS: Final = tuple(f.name for f in dataclass_fields(HeldRecord))
#: (a record an older agent wrote has none of these)
_OPTIONAL: Final = (
    "arrivals", "handle", "enclave_procs", "answered", "restoring", "lazy_pages",
    "holders", "holder_infos",
)  # fmt: skip
_REQUIRED: Final = tuple(f.name for f in dataclass_fields(HeldRecord) if f.name not in _OPTIONAL)
MAX_HANDLE_ITEMS: Final = 8
MAX_HANDLE_TEXT: Final = 4096


def _handle(value: object) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= MAX_HANDLE_ITEMS
        and all(
            isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= MAX_HANDLE_TEXT
            for k, v in value.items()
        )
    )


def _procs(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, list)
        and len(p) == 2
        and non_negative_int(p[0], 1 << 31)
        and non_negative_int(p[1])
        for p in value
    )


def _holders(value: object) -> bool:
    """``[pid, fd, start, nonce]`` entries (checked again, and against the live
    processes, by :func:`~.holders.take_held` before anything is taken)."""

    return isinstance(value, list) and all(
        isinstance(h, list)
        and len(h) == 4
        and non_negative_int(h[0], 1 << 31)
        and non_negative_int(h[1], 1 << 31)
        and isinstance(h[2], str)
        and hex_text(h[3])
        for h in value
    )


def remove(directory: Path | None) -> None:
    if directory is not None:
        with contextlib.suppress(OSError):
            (directory / RECORD).unlink()


def held_records(work_dir: Path) -> list[tuple[Path, HeldRecord | None]]:
    """Every session directory with a record (None: unreadable)."""

    found: list[tuple[Path, HeldRecord | None]] = []
    if not work_dir.is_dir():
        return found
    for path in sorted(work_dir.glob(f"*/{RECORD}")):
        try:
            found.append((path.parent, HeldRecord.parse(_own(path), path)))
        except (OSError, ValueError, TypeError):
            found.append((path.parent, None))
    return found


def _own(path: Path) -> bytes:
    """The bytes of ``path``; :class:`RecordDamagedError` unless it is a record this
    agent's user wrote.

    A record makes a restarted agent kill, remove (by its engine) or adopt and
    later resume the tree it names: one planted by anyone else (a work directory
    that others can write, a session directory that is a symbolic link to
    theirs) must do none of that.  :meth:`HeldRecord.write` makes a regular
    file, private (0600), owned by the agent, in a real directory.
    """

    if path.parent.is_symlink():
        raise RecordDamagedError(f"{path.parent} is a symbolic link, not a session directory")
    return own_record(path, "a record this agent wrote", private=True)


def mark_lost(directory: Path, detail: str) -> None:
    """Replace a session's work directory by a note that its state was lost (W3)."""

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(directory / LOST, json.dumps({"detail": detail}).encode())


def lost_detail(work_dir: Path, session_id: bytes) -> str | None:
    """What :func:`mark_lost` said about a session, if anything."""

    try:
        path = work_dir / session_id.hex() / LOST
        data = json_record(path.read_bytes(), f"lost-state note {path}")
    except OSError:
        return None
    except RecordDamagedError:
        return ""  # the note is there (the state was lost), its text is not
    return str(data.get("detail", ""))


def claimed_count(state: Path, arrivals: list[str]) -> int:
    """How many of a record's ``arrivals`` (hex migration ids) this host's claim store
    holds; the store is never created here (opening it would)."""

    store = state / COUNTERS
    if not store.exists():
        return 0
    claims = CounterStore(store)
    return sum(1 for a in arrivals if a and claims.claimed_by_any(bytes.fromhex(a)))
