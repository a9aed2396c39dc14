"""A guardian for the enclave connections while the migration tool holds them.

Between ``prepare`` and the end of a migration the tool is the only holder of
the application's enclave connections, and an enclave process exits when its
connection closes.  So the tool starts a guardian (its own session, so that it
outlives the tool) holding duplicates of those connections, and tells it
through a pipe what happened: ``thaw FILE`` before a container's cgroup is
frozen for its checkpoint (FILE is the cgroup's freezer control), ``netup
NETNS`` before a container that owns its address is cut off the network,
``ungate NETNS PORT,...`` before new connections to a container's listeners
are dropped, ``fence PID...`` once the source tree got its SIGSTOP, ``criu
PID...`` for post-copy's lazy dump (which holds the tree while it serves
pages), ``resume-sent`` right before a tree
without enclaves is resumed (its commit point is the destination's resume: a
guardian whose tool died after this note asks the destination, as ``migsgx
recover`` does), ``enclave INDEX DESCRIPTION`` for each
enclave connection (its info and image files, for delivering its state again),
``scratch DIR`` for the tool's own images directory (removed as soon as the
pipe ends without ``done``: :mod:`.dumpdirs`), ``done`` when the migration ended
either way.

If the pipe closes without ``done``, the tool died.  If an enclave of the
migration decided COMMIT already (the source host's platform store says so),
that was the commit point: the guardian commits the others too (``__mig_commit``;
the tool may have died between two commits) and carries the decisions.
Otherwise it asks every source enclave to abort its migration.  An enclave that
already committed refuses (or is gone), and one whose migration group committed
meanwhile commits instead: the destination has the state and rolls forward,
and the guardian leaves the source alone (stopped by the fence).  If
every enclave aborted, nothing was given up: the guardian resumes the fenced
(thaws the frozen, reconnects the locked) source and hands the connections back
to the application (``resume``, :mod:`.handback`), which then carries on as if
nothing had happened.  A checkpoint's guardian (``--checkpoint DIR``) then
resolves the checkpoint by ``migsgx recover --checkpoint``'s function
(:func:`.ckpt_recover.resolve_checkpoint`): the files of an aborted checkpoint
go; after a commit, the fenced source goes.  The ABORT frames the enclaves
return go into the journal (``aborts``): outside a migration group an abort
whose store record failed (the platform service died with the tool) is still
carried to the destination, so that its held copy ends (``docs/spec/commit.md``,
1 rule 4).  An enclave that had aborted already (the tool got its frame and
died with it) is asked for that frame again by its migration id (1 rule 6).
An aborted source enclave keeps its duplicate of its connection (below) until
the application has the connection back: a guardian killed between the
aborts and the hand-back leaves the enclaves for ``migsgx recover``, which
takes them back and finishes (``docs/spec/commit.md`` section 5, A6).

After a commit it carries the decision (``migsgx recover``'s logic,
:mod:`.guardian_decided`), and when the
destination lost its loaded copy before the claim (window W2) it delivers the
committed enclaves' state again to fresh ones there (:mod:`.redeliver`).
SIGUSR1 (sent by ``migsgx recover``) cuts its pause between attempts short.
Each source enclave also holds a duplicate of its own connection (the tool
gave it, ``__mig_hold``), so the guardian's end is no end of file for it: once
the destination runs (or never can) the guardian releases the committed
enclaves explicitly; should it die, or give up after ``RECOVER_PATIENCE``,
they keep their state for ``migsgx recover``, which takes their connections
back (:mod:`.holders`).

Run as ``python -m migsgx.agent.guardian --pipe FD --app-pid PID --app-name NAME
--fds FD,FD...`` by :class:`Guardian` only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .._trace import step
from ..containers.gate import open_gate, parse_ungate
from ..containers.imagefs import sweep_leftovers
from ..containers.podnet import unlock
from ..errors import MigSGXError
from .dumphold import release_noted, wait_released
from .faults import fault
from .guardian_aborts import aborted_all, committed_any, mark_aborted, mark_handed_back
from .guardian_decided import carry, finish_restore, held_source, resolve_checkpoint_of, roller
from .guardian_log import RECOVER_PATIENCE, listen, log
from .handback import resume_source
from .lazy import still_serving

__all__ = ["RECOVER_PATIENCE", "Guardian"]


class Guardian:
    """The tool's handle on its guardian process."""

    def __init__(
        self,
        app_pid: int,
        app_name: str,
        socks: Sequence[socket.socket],
        extra: Sequence[str] = (),
    ) -> None:
        read_end, self._write_end = os.pipe()
        fds = [s.fileno() for s in socks]
        argv = [
            sys.executable, "-m", "migsgx.agent.guardian",
            "--pipe", str(read_end), "--app-pid", str(app_pid),
            "--app-name", app_name, "--fds", ",".join(map(str, fds)), *extra,
        ]  # fmt: skip
        try:
            self.proc = subprocess.Popen(
                argv,
                pass_fds=(read_end, *fds),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(read_end)

    def note(self, line: str) -> None:
        data = memoryview(line.encode() + b"\n")
        with contextlib.suppress(OSError):
            while data:  # a long note (an enclave's image files) may take several writes
                data = data[os.write(self._write_end, data) :]

    def abandon(self) -> None:
        """Let the guardian act as if the tool had died (it retries the hand-back)."""

        with contextlib.suppress(OSError):
            os.close(self._write_end)

    def release(self) -> None:
        """The migration ended (either way): the guardian lets go and exits."""

        self.note("done")
        with contextlib.suppress(OSError):
            os.close(self._write_end)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _numbers(notes: list[str], key: str) -> list[int]:
    """The numbers of every ``KEY N [N ...]`` note, in order.

    Only the tool writes the pipe, but a guardian that died of a note it could
    not read would leave the source frozen: a malformed field is skipped.
    """

    return [
        int(field)
        for note in notes
        if note.split()[:1] == [key]
        for field in note.split()[1:]
        if _decimal(field)
    ]


def main(argv: list[str] | None = None) -> int:
    tool = os.getppid()  # (the tool starts the guardian)
    try:
        return _main(argv, tool)
    finally:
        # A tool killed mid-dump left its images tmpfs mounted (the container's memory
        # as CRIU wrote it, never read again on this host).  The pipe's end means the
        # tool is dying or past its dump (it lets go only after its mount is gone).
        for point in sweep_leftovers(gone=(tool,)):
            log(f"unmounted a dead tool's images tmpfs at {point}")
        # Its CRIU's CPU cgroup (``migrate --criu-weight``), CRIU moved out of it first.
        from ..system.cpugroups import sweep  # lazy: the guardian starts fast

        for group in sweep(gone=(tool,)):
            log(f"removed a dead tool's CPU cgroup {group}")


def _leftovers(notes: list[str], tool: int) -> None:
    """The tool died (or let go in doubt, past its dump): its images leave RAM at once,
    before any wait for a decision.  The images tmpfs first (it is mounted on the
    images directory), then the directory (:mod:`.dumpdirs`)."""

    from .dumpdirs import remove_dump_dir  # lazy: the guardian starts fast

    for point in sweep_leftovers(gone=(tool,)):
        log(f"unmounted a dead tool's images tmpfs at {point}")
    for path in [n.partition(" ")[2] for n in notes if n.startswith("scratch ")]:
        if remove_dump_dir(Path(path), dying=tool):
            log(f"removed the images directory {path} of its tool")


def _main(argv: list[str] | None, tool: int) -> int:
    parser = argparse.ArgumentParser(prog="migsgx-guardian")
    parser.add_argument("--pipe", type=int, required=True)
    parser.add_argument("--app-pid", type=int, required=True)
    parser.add_argument("--app-name", required=True)
    parser.add_argument("--fds", default="")
    parser.add_argument("--restore", action="store_true")
    parser.add_argument("--infos", default="")
    parser.add_argument("--checkpoint", default="")
    args = parser.parse_args(argv)
    socks = [socket.socket(fileno=int(fd)) for fd in args.fds.split(",") if fd]
    listen()  # SIGUSR1, before the tool can write our pid anywhere
    notes: list[str] = []
    with os.fdopen(args.pipe, "r") as pipe:
        for line in pipe:
            notes.append(line.strip())
    if "done" not in notes:
        step("guardian-pipe-closed")
    # A tool killed while a fault hook held its engine's CRIU (SIGSTOP) left the
    # container's tasks seized by a stopped CRIU: continued first, whatever comes next.
    continued = release_noted(notes)
    for pid in continued:
        log(f"continued CRIU (pid {pid}), held by the tool when it died")
    # It puts the container's freezer back as it found it (frozen) when it lets go:
    # only then may the source be thawed.
    for pid in wait_released(continued):
        log(f"killed CRIU (pid {pid}): it did not end once continued")
    if "done" in notes:
        return 0
    _leftovers(notes, tool)
    # New connections to the source's listeners were dropped: whoever ends up with
    # the container, clients are served (or refused and go elsewhere) again.
    _open_gates(notes)
    if args.restore:
        restored = _numbers(notes, "restored")
        if "activating" not in notes or not restored:
            return 0  # nothing ran: the loaded enclaves end, the next restore starts over
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        return finish_restore(restored[0], socks, bytes.fromhex(args.infos), checkpoint)
    if "in-doubt" in notes:
        # The tool ended in doubt: keep the source enclaves and carry the decision.
        held = held_source(socks, notes)
        for path in [n.partition(" ")[2] for n in notes if n.startswith("journal ")]:
            carry(Path(path), held, roller(socks))
        return 0
    fenced = _numbers(notes, "fence")
    frozen = [n.partition(" ")[2] for n in notes if n.startswith("thaw ")]
    locked = [n.partition(" ")[2] for n in notes if n.startswith("netup ")]
    journals = [n.partition(" ")[2] for n in notes if n.startswith("journal ")]
    if "resume-sent" in notes:
        # No enclaves: the destination's resume is the commit point, and the tool may
        # have died before its resume went (or reached the destination).  Its answer
        # decides: the source goes, or runs again (``migsgx recover``'s logic).
        log("the tool died after it began the resume: the destination decides")
        for path in journals:
            carry(Path(path))
        return 0
    # Either way the decisions are recorded now: they are carried to the
    # destination (``migsgx recover``'s logic), so that its loaded copy runs or
    # goes; after an abort, once the source runs again.
    # One COMMIT is the commit point: then nothing aborts (the platform service may
    # be gone, and an abort it cannot check would split the migration).  A
    # checkpoint's enclave that committed its gate ends at once, and its group
    # refuses the others' aborts from then on: they answer ``group-decided``.
    if committed_any(journals) or not aborted_all(socks, journals, args.checkpoint):
        log("the tool died and its enclaves did not all abort: the recorded decisions "
            "decide (the destination rolls forward where one committed)")  # fmt: skip
        held = held_source(socks, notes)
        for path in journals:
            carry(Path(path), held, roller(socks))
        if args.checkpoint:
            resolve_checkpoint_of(Path(args.checkpoint), aborted=False, held=socks)
        return 0
    step("guardian-aborted")
    mark_aborted(journals)  # (before the source runs: what recover reads)
    fault("guardian.aborted")
    log("the tool died before the commit point: resuming the source")
    # Post-copy: the tool's CRIU still holds the tree (it may wait for a page
    # connection that never comes); it must let go before SIGCONT can stick.
    criu = [pid for pid in _numbers(notes, "criu") if still_serving(pid)]  # (pids recycle)
    for pid in criu:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        for path in locked:
            try:
                unlock(Path(path))  # a container's own address answers again
            except MigSGXError as exc:
                log(f"could not unlock the source's network: {exc}")
        from .holders import watch_recorded  # lazy: the guardian starts fast

        watch_recorded(socks, journals, args.app_pid)  # (before the tree continues)
        handed = resume_source(args.app_pid, args.app_name, socks, fenced, frozen, log)
        mark_handed_back(journals)  # (recover no longer waits for this guardian)
        step("guardian-handed-back")
        # Killed here, the journal still names the duplicates the enclaves let go
        # with the hand-back; a later migration's may take their numbers, and the
        # holds' nonces keep ``migsgx recover`` off those (``holders.take_held``).
        fault("guardian.handed-back")
        return handed
    finally:
        for path in journals:
            _no_resume_went(Path(path))
            carry(Path(path))
        if args.checkpoint:
            resolve_checkpoint_of(Path(args.checkpoint), aborted=True)


def _open_gates(notes: list[str]) -> None:
    """Open every gate the tool noted; one that stays closed (its namespace not
    reachable from here, its rule not removable) keeps its note in the journal
    (``closed_gates``), so that ``migsgx recover`` tries it again and says so."""

    closed = [n for n in notes if (gate := parse_ungate(n)) is not None and not open_gate(*gate)]
    if not closed:
        return
    log(f"{len(closed)} gate(s) on the source's listeners stay closed: migsgx recover "
        "tries them again")  # fmt: skip
    from .journal import Journal  # lazy: the guardian starts fast and imports little

    for path in [n.partition(" ")[2] for n in notes if n.startswith("journal ")]:
        try:
            journal = Journal.load(Path(path))
            journal.update(closed_gates=[*dict.fromkeys([*journal.closed_gates, *closed])])
        except (MigSGXError, OSError, ValueError) as exc:
            log(f"cannot keep the closed gate(s) in {path}: {exc}")


def _no_resume_went(path: Path) -> None:
    """A tree without enclaves whose tool died before it began the resume: ``aborted``.

    Its destination discards the held tree without the tool, and no resume can
    come any more: the source is the copy (``recover`` then gives it back, as
    this guardian did, without asking the destination, which may be down).
    """

    from .journal import Journal  # lazy: the guardian starts fast and imports little

    try:
        journal = Journal.load(path)
        if not journal.enclave_mids and journal.phase in ("loaded", "fenced", "committed"):
            journal.update(phase="aborted")
    except (MigSGXError, OSError, ValueError) as exc:
        log(f"cannot mark {path.name} aborted: {exc}")


if __name__ == "__main__":
    sys.exit(main())
