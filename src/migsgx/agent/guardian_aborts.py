"""The guardian's aborts: every source enclave asked, each told dead, hung or decided.

The tool died before the commit point (as far as the store file shows), so the
guardian asks every source enclave to abort (``__mig_abort``), one answer
bounded by :data:`~.enclave_ask.HUNG_WAIT` (the rule ``migsgx recover`` follows
too, :mod:`.enclave_ask`).  What each enclave is then:

* **aborted**: it answered so (its ABORT frame, if any, goes into the journal);
* **decided otherwise**: it answered ``committed`` or ``group-decided`` (it, or
  another enclave of its group, committed): the roll-forward path;
* **dead**: its connection reached end of file without an answer (an enclave
  closes it only as its process ends).  Where the others aborted and nothing
  can have committed, its state is lost and the others go back to the
  application (:mod:`.lost_enclaves`): for a migration, the store file records
  no COMMIT; for a checkpoint, another enclave's abort was checked against the
  checkpoint's group by the platform store, which then refuses any commit of
  the group for good (``docs/spec/checkpoint.md``, section 3, step 7);
* **unchecked** (``group-unchecked``): alive, its platform service gone;
* **hung**: its connection open and no answer (stopped, or stuck).  Its state
  may be intact: it is neither dead nor committed.  Counting it as committed
  would leave the source stopped beside an undecided migration, counting it as
  aborted would hand the application a connection nobody answers.

Unchecked and hung enclaves are asked again, with a growing pause, while the
store file records no COMMIT of the migration (a recorded decision decides:
a COMMIT is the roll-forward path, an ABORT stands and the enclave is asked
until it answers, which thaws it).  :data:`~.guardian_log.RECOVER_PATIENCE`
ends it: the roll-forward path, in doubt, for ``migsgx recover``
(``docs/spec/commit.md``, 1.1 rule 4 and section 5), which never gives the
source back beside an enclave that has not aborted.  Once every live one
aborted, the journal says so (``aborted``, :func:`mark_aborted`) before the
source is given back: a ``recover`` run meanwhile waits for this guardian
until then, and gives nothing back on its own.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ..errors import MigSGXError
from .faults import fault
from .guardian_log import RECOVER_PATIENCE, log, log_to, pause
from .handback import abort_asked, abort_frame_of
from .lost_enclaves import no_commit, note_lost

__all__ = ["aborted_all", "committed_any", "mark_aborted", "mark_handed_back"]


def committed_any(journals: list[str]) -> bool:
    """Whether an enclave of these migrations decided COMMIT (read from the store file:
    the platform service need not run)."""

    from .journal import Journal  # lazy: the guardian starts fast and imports little
    from .recover_records import decisions_of

    for name in journals:
        path = Path(name)
        try:
            journal = Journal.load(path)
            decisions = decisions_of(path.parent.parent.parent, journal.enclave_mids)
        except (MigSGXError, OSError, ValueError) as exc:
            log(f"cannot read the decisions of {path.name}: {exc}")
            continue
        if any(d is not None and d.kind == "commit" for d in decisions):
            return True
    return False


def mark_aborted(journals: list[str]) -> None:
    """Every live source enclave answered its abort: the journals say ``aborted``.

    Written before the source is given back (``docs/spec/commit.md`` 4: a
    phase says what is true on the source host).  From then on ``migsgx
    recover`` takes none of the enclaves for frozen in the migration
    (:func:`.recover_records.not_aborted`), and the enclaves whose abort the
    tool's roll-back could not confirm (``unconfirmed``) are no longer named:
    each answered this guardian's abort.  While the journal says less, a
    ``recover`` that finds the guardian alive and an enclave with no decision
    waits for it (:mod:`.recover`), and never gives the source back first.
    """

    from .journal import Journal  # lazy: the guardian starts fast and imports little

    for name in journals:
        try:
            journal = Journal.load(Path(name))
            if journal.enclave_mids and journal.phase in ("begun", "loaded", "fenced"):
                journal.update(phase="aborted")
            if journal.unconfirmed and journal.phase == "aborted":
                # The tool's roll-back could not confirm these aborts; each answered ours.
                journal.update(unconfirmed=[])
        except (MigSGXError, OSError, ValueError) as exc:
            log(f"cannot mark {name} aborted: {exc}")


def mark_handed_back(journals: list[str]) -> None:
    """The guardian gave the source back (``aborted`` journals only): from then on it
    only tells the destination, for as long as that takes (its agent may be gone for
    hours), and ``migsgx recover`` no longer waits for it (:mod:`.recover`)."""

    from .journal import Journal  # lazy: the guardian starts fast and imports little

    for name in journals:
        try:
            journal = Journal.load(Path(name))
            if journal.phase == "aborted":
                journal.update(handed_back=True)
        except (MigSGXError, OSError, ValueError) as exc:
            log(f"cannot mark {name} handed back: {exc}")


def aborted_all(socks: list[socket.socket], journals: list[str], checkpoint: str = "") -> bool:
    """Abort every source enclave; True only if every live one aborted (module docstring)."""

    pending = list(socks)
    pause_s = 0.5
    deadline = time.monotonic() + RECOVER_PATIENCE
    gone: list[int] = []
    aborted: set[int] = set()
    waiting = False
    while True:
        # (every one is asked, each bounded: a hung one holds up the others that long)
        asked = {sock: abort_asked(sock) for sock in pending}
        replies = {sock: (answer, frame) for sock, (answer, frame, _) in asked.items()}
        answers = [(sock, answer) for sock, (answer, _) in replies.items()]
        gone += [socks.index(sock) for sock, (_, _, state) in asked.items() if state == "dead"]
        hung = [s for s, answer in answers if answer is None and socks.index(s) not in gone]
        aborted |= {socks.index(sock) for sock, answer in answers if answer == "aborted"}
        frames = {i: replies[s][1] for i, s in enumerate(socks) if s in replies and replies[s][1]}
        frames.update(_frames_again(socks, replies, journals))
        # Killed here (the tool dead already), the frames are nowhere but in the
        # enclaves, which keep their duplicates after an abort: ``migsgx recover``
        # takes them back, asks again and hands them to the application.
        fault("guardian.abort-answered")
        _keep_aborts(journals, frames)
        if any(answer not in ("aborted", "group-unchecked", None) for _, answer in answers):
            return False  # (committed, or its group did: rolling forward)
        unchecked = [sock for sock, answer in answers if answer == "group-unchecked"]
        undecided = bool(gone) and _lost_undecided(
            len(gone), len(socks), journals, checkpoint, aborted
        )
        if gone and not undecided and not (checkpoint and (hung or unchecked)):
            # (gone, and maybe committed first: the roll-forward path decides; a
            # checkpoint's waits while a sibling may still answer its abort)
            return False
        if not unchecked and not hung:
            if gone:
                log(f"enclave(s) {', '.join(map(str, sorted(gone)))} died undecided: their "
                    "state is lost; the others go back to the application")  # fmt: skip
                note_lost(journals, gone)
            return True
        if time.monotonic() > deadline or committed_any(journals):
            return False
        if not waiting:
            waiting = True
            if hung:
                indexes = ", ".join(str(socks.index(s)) for s in hung)
                log(f"enclave(s) {indexes} do not answer, their connections open (stopped or "
                    "hung): neither dead nor committed, asked again until they answer")  # fmt: skip
            if unchecked:
                log("the platform service cannot check the abort: asking again until it is back")
            _log_elsewhere(journals, checkpoint)
        pending = unchecked + hung
        pause_s = 0.5 if pause(pause_s) else min(pause_s * 2, 5.0)


def _lost_undecided(
    gone: int, count: int, journals: list[str], checkpoint: str, aborted: set[int]
) -> bool:
    """Whether the dead enclaves cannot have committed (the module docstring)."""

    if gone == count:
        return False  # (nobody answered: nothing proves an abort)
    if checkpoint:
        return bool(aborted)  # (a sibling's abort, checked against the group by the store)
    return no_commit(journals)


def _log_elsewhere(journals: list[str], checkpoint: str) -> None:
    """The tool's caller must not wait on our stderr while we wait."""

    if journals:
        log_to(Path(journals[0]).with_suffix(".log"))
    else:  # (a checkpoint's: no digest covers a .log file there)
        log_to(Path(checkpoint) / "guardian.log" if checkpoint else Path(os.devnull))


def _frames_again(
    socks: list[socket.socket],
    replies: dict[socket.socket, tuple[str | None, bytes]],
    journals: list[str],
) -> dict[int, bytes]:
    """The ABORT frames of the enclaves that answered ``aborted`` with none, asked again.

    Such an enclave aborted before this guardian asked: the tool got its frame
    and died with it (fault point ``tool.after-abort``), or an earlier ask of
    this guardian's got no answer in time (a hung enclave).  Outside a
    migration group its store record may have failed as well (the platform
    service gone), and then this frame is the only ABORT there is to carry: the
    enclave keeps it and hands it out again for its migration id (the journal's
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
                log(f"enclave {i} had aborted already: its ABORT frame, asked again")
                frames[i] = frame
    return frames


def _keep_aborts(journals: list[str], frames: dict[int, bytes]) -> None:
    """Keep the ABORT frames the enclaves returned in the journal, for the roll-forward path.

    An abort outside a migration group is recorded best effort: when the
    platform service died with the tool the store holds no ABORT, and without
    these frames the destination would keep its loaded copy held, in doubt
    (``docs/spec/commit.md``, 1 rule 4).  The enclaves are the journal's, in
    its order (the tool passes their connections in that order).
    """

    if not frames:
        return
    from .journal import Journal  # lazy: the guardian starts fast and imports little
    from .recover_records import keep_aborts

    for name in journals:
        try:
            journal = Journal.load(Path(name))
            count = len(journal.enclave_mids)
            if max(frames) >= count:
                continue  # (not this migration's enclaves)
            kept = journal.aborts or [b""] * count  # (an enclave asked again returns none)
            keep_aborts(journal, {i: frames.get(i, kept[i]) for i in range(count)})
        except (MigSGXError, OSError, ValueError) as exc:
            log(f"cannot keep the ABORT frames in {name}: {exc}")
