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

After a commit it carries the decision (``migsgx recover``'s logic), and when the
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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .._trace import step
from ..containers.gate import open_gate, parse_ungate
from ..containers.imagefs import sweep_leftovers
from ..containers.podnet import unlock
from ..errors import MigSGXError
from .applink import AppLink
from .dumphold import release_noted, wait_released
from .faults import fault
from .handback import (
    RESUME_WAIT,
    abort_frame_of,
    abort_reply,
    call_enclave,
    commit_rest,
    resume_source,
)  # fmt: skip
from .lazy import still_serving
from .lost_enclaves import hung_up, no_commit, note_lost

if TYPE_CHECKING:
    from .recover import RollForward
    from .redeliver import HeldSource

__all__ = ["Guardian"]

#: How long the guardian keeps delivering a decision that the destination has
#: not confirmed (it holds the committed source enclaves meanwhile).
RECOVER_PATIENCE: Final = 600.0
_LOGGING_ELSEWHERE = False


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


_NUDGED: list[bool] = []


def _nudged(signum: int, frame: object) -> None:
    """SIGUSR1: ``migsgx recover`` asks for an attempt now."""

    _NUDGED.append(True)


def _pause(seconds: float) -> bool:
    """Sleep up to ``seconds``; True if SIGUSR1 cut it short."""

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _NUDGED:
            _NUDGED.clear()
            return True
        time.sleep(0.05)
    return False


def _held_source(socks: list[socket.socket], notes: list[str]) -> HeldSource | None:
    """The committed enclaves' connections and what their offers name, from the tool's notes."""

    from .redeliver import HeldEnclave, HeldSource  # lazy: only after a commit

    held = {}
    for note in notes:
        parts = note.split()
        if parts[0:1] == ["enclave"] and len(parts) == 3 and parts[1].isdigit():
            index = int(parts[1])
            if index < len(socks):
                try:
                    held[index] = HeldEnclave.parse(socks[index], parts[2])
                except MigSGXError as exc:
                    _log(f"enclave {index} cannot be delivered again: {exc}")
    return HeldSource(held) if held else None


def _roller(socks: list[socket.socket]) -> RollForward:
    """What commits the undecided enclaves once another of the migration committed."""

    def roll_forward(indexes: list[int]) -> None:
        commit_rest(dict(enumerate(socks)), indexes, _log)

    return roll_forward


def _committed_any(journals: list[str]) -> bool:
    """Whether an enclave of these migrations decided COMMIT (read from the store file:
    the platform service need not run)."""

    from .journal import Journal  # lazy: the guardian starts fast and imports little
    from .recover import decisions_of

    for name in journals:
        path = Path(name)
        try:
            journal = Journal.load(path)
            decisions = decisions_of(path.parent.parent.parent, journal.enclave_mids)
        except (MigSGXError, OSError, ValueError) as exc:
            _log(f"cannot read the decisions of {path.name}: {exc}")
            continue
        if any(d is not None and d.kind == "commit" for d in decisions):
            return True
    return False


def _recover(
    path: Path, held: HeldSource | None = None, roll_forward: RollForward | None = None
) -> None:
    """``migsgx recover`` for this migration, again with a growing pause while in doubt.

    ``held``: the committed source enclaves, which deliver their state again if
    the destination lost its copy, and are released once it runs (or never can):
    each holds a duplicate of its own connection, so this process's end is no
    end of file for it.  ``roll_forward`` commits the undecided ones once another
    of the migration committed.
    """

    from .journal import Journal  # lazy: the guardian starts fast and imports little
    from .recover import resolve
    from .tls import AgentIdentity

    pause = 0.5
    deadline = time.monotonic() + RECOVER_PATIENCE
    while True:
        try:
            journal = Journal.load(path)
            agent_dir = path.parent.parent
            result = resolve(
                journal, agent_dir.parent, AgentIdentity(agent_dir), tool_gone=True,
                redeliver=held.redeliver if held else None,
                release=held.release if held else None, roll_forward=roll_forward,
                revoke=held.revoke if held else None,
            )  # fmt: skip
        except (MigSGXError, OSError, ValueError) as exc:
            _log(f"recovery of {path.name} failed: {exc}; run migsgx recover")
            return
        _log(f"migration {result.mid}: {result.decision} -> {result.outcome} {result.detail}")
        # An ABORT the destination has not heard yet (its agent unreachable: it may come
        # back and adopt a held tree) is carried again too: nothing is left for an operator.
        untold = result.decision == "abort" and Journal.load(path).phase != "done"
        if not result.in_doubt and not untold:
            return
        _log_to(path.with_suffix(".log"))
        if time.monotonic() > deadline or fault("guardian.retry") == "give-up":
            # The enclaves keep their state (and their duplicates): ``migsgx recover``
            # takes them back once the destination can take the state again.
            _log(f"migration {result.mid} is still in doubt: run migsgx recover")
            return
        # recover asked: at once, then the pauses grow again
        pause = 0.5 if _pause(pause) else min(pause * 2, 30.0)


def _log_to(path: Path) -> None:
    """From now on report into ``path``: the tool's caller must not wait on our stderr."""

    global _LOGGING_ELSEWHERE
    if _LOGGING_ELSEWHERE:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    _log(f"still in doubt: the guardian goes on, reporting to {path}")
    os.dup2(fd, 2)
    os.close(fd)
    _LOGGING_ELSEWHERE = True


def _log(text: str) -> None:
    sys.stderr.write(f"migsgx guardian[{os.getpid()}]: {text}\n")
    sys.stderr.flush()


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
            _log(f"unmounted a dead tool's images tmpfs at {point}")


def _leftovers(notes: list[str], tool: int) -> None:
    """The tool died (or let go in doubt, past its dump): its images leave RAM at once,
    before any wait for a decision.  The images tmpfs first (it is mounted on the
    images directory), then the directory (:mod:`.dumpdirs`)."""

    from .dumpdirs import remove_dump_dir  # lazy: the guardian starts fast

    for point in sweep_leftovers(gone=(tool,)):
        _log(f"unmounted a dead tool's images tmpfs at {point}")
    for path in [n.partition(" ")[2] for n in notes if n.startswith("scratch ")]:
        if remove_dump_dir(Path(path), dying=tool):
            _log(f"removed the images directory {path} of its tool")


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
    signal.signal(signal.SIGUSR1, _nudged)  # (before the tool can write its pid anywhere)
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
        _log(f"continued CRIU (pid {pid}), held by the tool when it died")
    # It puts the container's freezer back as it found it (frozen) when it lets go:
    # only then may the source be thawed.
    for pid in wait_released(continued):
        _log(f"killed CRIU (pid {pid}): it did not end once continued")
    if "done" in notes:
        return 0
    _leftovers(notes, tool)
    # New connections to the source's listeners were dropped: whoever ends up with
    # the container, clients are served (or refused and go elsewhere) again.
    for gate in filter(None, map(parse_ungate, notes)):
        open_gate(*gate)
    if args.restore:
        restored = _numbers(notes, "restored")
        if "activating" not in notes or not restored:
            return 0  # nothing ran: the loaded enclaves end, the next restore starts over
        return _finish_restore(restored[0], socks, bytes.fromhex(args.infos))
    if "in-doubt" in notes:
        # The tool ended in doubt: keep the source enclaves and carry the decision.
        held = _held_source(socks, notes)
        for path in [n.partition(" ")[2] for n in notes if n.startswith("journal ")]:
            _recover(Path(path), held, _roller(socks))
        return 0
    fenced = _numbers(notes, "fence")
    frozen = [n.partition(" ")[2] for n in notes if n.startswith("thaw ")]
    locked = [n.partition(" ")[2] for n in notes if n.startswith("netup ")]
    journals = [n.partition(" ")[2] for n in notes if n.startswith("journal ")]
    if "resume-sent" in notes:
        # No enclaves: the destination's resume is the commit point, and the tool may
        # have died before its resume went (or reached the destination).  Its answer
        # decides: the source goes, or runs again (``migsgx recover``'s logic).
        _log("the tool died after it began the resume: the destination decides")
        for path in journals:
            _recover(Path(path))
        return 0
    # Either way the decisions are recorded now: they are carried to the
    # destination (``migsgx recover``'s logic), so that its loaded copy runs or
    # goes; after an abort, once the source runs again.
    # One COMMIT is the commit point: then nothing aborts (the platform service may
    # be gone, and an abort it cannot check would split the migration).  A
    # checkpoint's enclave that committed its gate ends at once: one that is
    # committed or gone may have been the commit point, and the gates decide.
    if (
        _committed_any(journals)
        or (args.checkpoint and not all(_pending(s) for s in socks))
        or not _aborted_all(socks, journals, args.checkpoint)
    ):
        _log("the tool died after the enclaves committed: the destination rolls forward")
        held = _held_source(socks, notes)
        for path in journals:
            _recover(Path(path), held, _roller(socks))
        if args.checkpoint:
            _resolve_checkpoint(Path(args.checkpoint), aborted=False, held=socks)
        return 0
    step("guardian-aborted")
    _log("the tool died before the commit point: resuming the source")
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
                _log(f"could not unlock the source's network: {exc}")
        handed = resume_source(args.app_pid, args.app_name, socks, fenced, frozen, _log)
        step("guardian-handed-back")
        # Killed here, the journal still names the duplicates the enclaves let go
        # with the hand-back; a later migration's may take their numbers, and the
        # holds' nonces keep ``migsgx recover`` off those (``holders.take_held``).
        fault("guardian.handed-back")
        return handed
    finally:
        for path in journals:
            _no_resume_went(Path(path))
            _recover(Path(path))
        if args.checkpoint:
            _resolve_checkpoint(Path(args.checkpoint), aborted=True)


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
        _log(f"cannot mark {path.name} aborted: {exc}")


def _aborted_all(socks: list[socket.socket], journals: list[str], checkpoint: str = "") -> bool:
    """Abort every source enclave; True only if every one aborted.

    An enclave that answers ``group-unchecked`` lives, but its platform service
    is gone (or its store failed): it stays frozen, and nothing proves that no
    other enclave of its migration committed (a dead tool's COMMIT may still be
    waiting inside one for the service to come back).  Taking that for an
    abort could split the migration, taking it for a commit leaves the source
    frozen although nothing was given up.  So it is asked again, with a growing
    pause, while the store file records no COMMIT of the migration: a restarted
    service checks the abort against the group (then it aborts, or commits
    instead).  Any other refusal, an enclave gone, a recorded COMMIT or
    ``RECOVER_PATIENCE`` ends it: the roll-forward path, in doubt
    (``docs/spec/commit.md``, 1.1 rule 4).
    """

    pending = list(socks)
    pause = 0.5
    deadline = time.monotonic() + RECOVER_PATIENCE
    gone: list[int] = []
    while True:
        replies = {sock: abort_reply(sock) for sock in pending}  # (every one is asked)
        answers = [(sock, answer) for sock, (answer, _) in replies.items()]
        gone += [socks.index(sock) for sock, answer in answers
                 if answer is None and hung_up(sock)]  # fmt: skip
        frames = {i: replies[s][1] for i, s in enumerate(socks) if s in replies and replies[s][1]}
        frames.update(_frames_again(socks, replies, journals))
        # Killed here (the tool dead already), the frames are nowhere but in the
        # enclaves, which keep their duplicates after an abort: ``migsgx recover``
        # takes them back, asks again and hands them to the application.
        fault("guardian.abort-answered")
        _keep_aborts(journals, frames)
        if any(
            answer not in ("aborted", "group-unchecked") and socks.index(sock) not in gone
            for sock, answer in answers
        ):
            return False  # (committed, rolling forward, or not answering)
        if gone and (checkpoint or len(gone) == len(socks) or not no_commit(journals)):
            return False  # (gone, and maybe committed first: the roll-forward path decides)
        unchecked = [sock for sock, answer in answers if answer == "group-unchecked"]
        if not unchecked:
            if gone:
                _log(f"enclave(s) {', '.join(map(str, gone))} died undecided: their state is "
                     "lost; the others go back to the application")  # fmt: skip
                note_lost(journals, gone)
            return True
        if time.monotonic() > deadline or _committed_any(journals):
            return False
        if len(pending) == len(socks) and pause == 0.5:
            _log("the platform service cannot check the abort: asking again until it is back")
            # The tool's caller must not wait on our stderr meanwhile.
            if journals:
                _log_to(Path(journals[0]).with_suffix(".log"))
            else:  # (a checkpoint's: no digest covers a .log file there)
                _log_to(Path(checkpoint) / "guardian.log" if checkpoint else Path(os.devnull))
        pending = unchecked
        pause = 0.5 if _pause(pause) else min(pause * 2, 5.0)


def _frames_again(
    socks: list[socket.socket],
    replies: dict[socket.socket, tuple[str | None, bytes]],
    journals: list[str],
) -> dict[int, bytes]:
    """The ABORT frames of the enclaves that answered ``aborted`` with none, asked again.

    Such an enclave aborted before this guardian asked: the tool got its frame
    and died with it (fault point ``tool.after-abort``).  Outside a migration
    group its store record may have failed as well (the platform service gone),
    and then this frame is the only ABORT there is to carry: the enclave keeps
    it and hands it out again for its migration id (the journal's
    ``enclave_mids``, in the connections' order; ``docs/spec/commit.md`` 1 rule 6).
    """

    from .journal import Journal  # lazy: the guardian starts fast and imports little

    empty = [i for i, s in enumerate(socks) if replies.get(s) == ("aborted", b"")]
    if not empty:
        return {}
    frames: dict[int, bytes] = {}
    for name in journals:
        try:
            mids = Journal.load(Path(name)).enclave_mids
        except (MigSGXError, OSError, ValueError):
            continue
        if len(mids) != len(socks):
            continue  # (not this migration's enclaves, or not every handshake finished)
        for i in empty:
            frame = abort_frame_of(socks[i], mids[i])
            if frame:
                _log(f"enclave {i} had aborted already: its ABORT frame, asked again")
                frames[i] = frame
    return frames


def _keep_aborts(journals: list[str], frames: dict[int, bytes]) -> None:
    """Keep the ABORT frames the enclaves returned in the journal, for :func:`_recover`.

    An abort outside a migration group is recorded best effort: when the
    platform service died with the tool the store holds no ABORT, and without
    these frames the destination would keep its loaded copy held, in doubt
    (``docs/spec/commit.md``, 1 rule 4).  The enclaves are the journal's, in
    its order (the tool passes their connections in that order).
    """

    if not frames:
        return
    from .journal import Journal  # lazy: the guardian starts fast and imports little
    from .recover import keep_aborts

    for name in journals:
        try:
            journal = Journal.load(Path(name))
            count = len(journal.enclave_mids)
            if max(frames) >= count:
                continue  # (not this migration's enclaves)
            kept = journal.aborts or [b""] * count  # (an enclave asked again returns none)
            keep_aborts(journal, {i: frames.get(i, kept[i]) for i in range(count)})
        except (MigSGXError, OSError, ValueError) as exc:
            _log(f"cannot keep the ABORT frames in {name}: {exc}")


def _pending(sock: socket.socket) -> bool:
    """A checkpoint's source enclave still answers and has not committed its gate."""

    msg = call_enclave(sock, "__mig_status", [])
    status = msg.get("value") if msg is not None and msg["t"] == "ret" else None
    return isinstance(status, dict) and not status.get("committed")


def _resolve_checkpoint(
    directory: Path, *, aborted: bool, held: list[socket.socket] | None = None
) -> None:
    """``migsgx recover --checkpoint`` for this checkpoint, once the tool died.

    ``aborted``: every enclave answered this guardian's abort, so nothing was
    committed (no gate needs reading).  Otherwise the gates decide, read through
    this host's platform socket (``$MIGSGX_PLATFORM_SOCKET`` or the default).
    """

    from ..host.client import platform_socket  # lazy: the guardian starts fast
    from .ckpt_recover import resolve_checkpoint

    try:
        sock = None if aborted else platform_socket(None)
        result = resolve_checkpoint(directory, sock, aborted=aborted, held=held)
    except (MigSGXError, OSError, ValueError) as exc:
        _log(f"checkpoint {directory}: {exc}; run migsgx recover --checkpoint")
        return
    _log(f"checkpoint {directory}: {result.decision} -> {result.outcome} {result.detail}")


def _finish_restore(pid: int, socks: list[socket.socket], infos: bytes) -> int:
    """The restore tool died while activating: finish it (activate, continue, attach)."""

    import cbor2  # lazy: only a restore needs it

    from ..host.appctl import info_from_wire
    from ..host.client import EnclaveInfo
    from ..system.process import continue_tree

    _log(f"the restore tool died while activating: finishing the restore of {pid}")
    for sock in socks:
        # Each claims its checkpoint id once: an enclave the tool activated
        # already answers with an error and runs on.
        call_enclave(sock, "__ckpt_activate", [])
    try:
        continue_tree(pid)
    except MigSGXError as exc:
        _log(f"the restored tree is gone: {exc}")
        return 1
    enclaves = [EnclaveInfo(**info_from_wire(i)) for i in cbor2.loads(infos)]
    deadline = time.monotonic() + RESUME_WAIT
    while True:
        try:
            link = AppLink.find(pid)
            if link is None:
                raise MigSGXError(f"the restored process {pid} has no migration control")
            link.attach(socks, enclaves)
            _log(f"restore of {pid} finished: {len(socks)} enclave(s) attached")
            return 0
        except MigSGXError as exc:
            # The application answers once it runs.
            if time.monotonic() > deadline:
                _log(f"could not attach the enclaves to {pid}: {exc}")
                return 1
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
