"""What the runc and podman drivers share about a frozen source and a held restore.

Kept apart from both drivers so that neither imports the other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from .._trace import step
from ..errors import MigSGXError
from ..system.process import kill_tree, tree_pids
from .base import ContainerError, DumpPlan, Source
from .cgroups import Freezer
from .gate import ListenerGate

log = logging.getLogger("migsgx.containers")

__all__ = [
    "dump_frozen",
    "end_frozen",
    "give_back",
    "kill_frozen",
    "listeners_gated",
    "own_netns_path",
    "resume_frozen",
    "stop_if_cancelled",
    "write_criu_config",
]


def own_netns_path() -> Path:
    """A path naming this process's network namespace (a named one when there is one)."""

    mine = os.stat("/proc/self/ns/net")
    with contextlib.suppress(OSError):
        for entry in sorted(Path("/run/netns").iterdir()):
            with contextlib.suppress(OSError):
                st = entry.stat()
                if (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev):
                    return entry
    return Path(f"/proc/{os.getpid()}/ns/net")


def resume_frozen(root: int, freezer: Freezer) -> None:
    """Undo a freeze (and any stop) of a source container: it runs as before."""

    for pid in tree_pids(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    freezer.thaw()


def kill_frozen(root: int, freezer: Freezer) -> None:
    """End a frozen source after the commit: SIGKILL queued first, then thawed.

    A thawed task with a pending SIGKILL dies before it runs an instruction of its own,
    and the engine then removes a container without processes (a frozen one it may not).
    """

    pids = tree_pids(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    freezer.thaw()
    kill_tree(root)


def write_criu_config(path: Path, *, tcp_close: bool, tcp_established: bool = False) -> None:
    """CRIU's options for a held restore (runc passes this file to CRIU).

    ``tcp_established``: connections restore open (the container's address moved too).
    """

    # file-locks: held POSIX and flock locks are restored (they were dumped with them).
    lines = ["leave-stopped", "file-locks"] + (["tcp-close"] if tcp_close else [])
    if tcp_established and not tcp_close:
        lines.append("tcp-established")
    path.write_text("\n".join(lines) + "\n")


def stop_if_cancelled(plan: DumpPlan) -> None:
    """Raise if the migration failed meanwhile (an enclave stream): the dump stops here.

    The engines' own checkpoint command (``runc checkpoint``, ``podman container
    checkpoint``) runs CRIU itself, which cannot be stopped safely from outside
    while its parasite code is inside the tasks; the dump is cut at every step
    between (before the freeze, after the engine's command, per file of the
    root file system's archive, before the images go out), so the source thaws
    at the next of them instead of after the whole dump.
    """

    if plan.cancel is not None:
        plan.cancel.check()


@contextlib.contextmanager
def listeners_gated(
    source: Source, plan: DumpPlan, unlock: Callable[[], object] | None
) -> Iterator[None]:
    """The source tree's listeners gated while the block runs, unless the driver locked
    the network itself (``unlock``).

    Without such a lock, a connection half made when CRIU looks could not be
    restored: :class:`~.gate.ListenerGate` closes the listeners before the freeze
    and opens them again at the end, whether the dump succeeded or not.
    """

    gate: ListenerGate | None = None
    if unlock is None:
        gate = ListenerGate.of_tree(source.root)
        if gate.ports:
            plan.note(gate.note())
            gate.close()  # (opened again if it fails)
    try:
        yield
    finally:
        if gate is not None:
            with contextlib.suppress(MigSGXError):
                gate.open()
            step("ungated")


def give_back(
    source: Source, freezer: Freezer, plan: DumpPlan, unlock: Callable[[], object] | None
) -> None:
    """A source whose dump did not finish runs again, where the plan still allows it, and
    the driver's network lock (``unlock``) is undone.

    Best effort: the caller is on its way out with the dump's own error, which a
    failure here must not replace.
    """

    if not plan.may_resume():
        return
    with contextlib.suppress(MigSGXError):
        resume_frozen(source.root, freezer)
    step("thawed")
    if unlock is not None:
        with contextlib.suppress(MigSGXError):
            unlock()


def end_frozen(source: Source, freezer: Freezer, remove: Callable[[], object]) -> None:
    """After the commit: the frozen source is killed and ``remove`` deletes the engine's
    record of it.  Should that fail, it stays frozen and stopped (it cannot run) for an
    operator to remove: the migration succeeded, so this only warns."""

    try:
        kill_frozen(source.root, freezer)
        remove()
    except MigSGXError as exc:
        log.warning("the migrated source container %s stays (frozen): %s", source.label, exc)


def dump_frozen(
    source: Source,
    plan: DumpPlan,
    on_dumped: Callable[[], None],
    *,
    checkpoint: Callable[[], object],
    remove: Callable[[], object],
    unlock: Callable[[], object] | None = None,
) -> None:
    """The engines' dump of a container kept frozen throughout.

    The tree is frozen before ``checkpoint`` (the engine's own dump, leaving it
    running) and must still be frozen after it, so nothing it did after its pages
    were taken can be lost. A failure before ``on_dumped`` returns thaws it where the
    plan still allows the source to resume (and ``unlock`` undoes a network lock the
    driver took before); once dumped, the frozen source is killed and ``remove``
    deletes the engine's record of it.

    Without a lock of the driver's (``unlock``), the tree's listeners are gated
    before the freeze (:func:`listeners_gated`).
    """

    with listeners_gated(source, plan, unlock):
        freezer = Freezer.of_pid(source.root)
        plan.note(f"thaw {freezer.control}")
        finished = False
        try:
            stop_if_cancelled(plan)  # an enclave stream failed already: nothing to freeze for
            freezer.freeze()
            checkpoint()
            if freezer.state() != "FROZEN":
                raise ContainerError(f"{source.label} was thawed during its checkpoint")
            stop_if_cancelled(plan)
            on_dumped()
            finished = True
        finally:
            if not finished:
                give_back(source, freezer, plan, unlock)
        end_frozen(source, freezer, remove)
