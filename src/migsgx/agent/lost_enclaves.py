"""Source enclaves that died without answering the guardian's abort.

The guardian of a dead tool asks every source enclave to abort.  One whose
connection reached end of file did not answer: an enclave closes its
connection only as its process ends, dead or committed (a COMMIT is written
to its platform store before the enclave answers).  Where every other enclave
aborted and the store records no COMMIT, the dead one cannot have committed:
the others go back to the application, and every ABORT delivery names the
dead ones (``source_lost``), whose destination copies no decision can reach
(``docs/spec/commit.md``, section 5).
"""

from __future__ import annotations

import contextlib
import select
import socket
from pathlib import Path

from ..errors import MigSGXError

__all__ = ["hung_up", "no_commit", "note_lost"]


def _settled(holders: list[object]) -> bool:
    """Whether every recorded enclave process that is dying (in its exit, a zombie, or
    a SIGKILL pending) has ended; waited for (bounded) first."""

    from .enclave_loss import wait_ended
    from .faults import dying

    for item in holders:
        pid = item[0] if isinstance(item, list) and item else None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            continue
        if dying(pid) and not wait_ended(pid):
            return False
    return True


def note_lost(journals: list[str], gone: list[int]) -> None:
    """Record the dead enclaves (``source_lost``): every ABORT delivery names them."""

    from .journal import Journal  # lazy: the guardian starts fast and imports little

    for name in journals:
        with contextlib.suppress(MigSGXError, OSError, ValueError):
            Journal.load(Path(name)).update(source_lost=sorted(set(gone)))


def hung_up(sock: socket.socket | None) -> bool:
    """Whether the enclave at the other end of ``sock`` is gone (its end is closed).

    An enclave closes its connection only as its process ends: with a commit
    (recorded in its platform store before it answers) or dead.  Polled, never
    read (an application may share the connection) and without touching the
    socket's blocking mode; independent of pid namespaces.  No socket, or one
    closed here: False.
    """

    if sock is None or sock.fileno() < 0:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def no_commit(journals: list[str]) -> bool:
    """Whether every migration's decisions could be read and none is a COMMIT.

    Then an enclave that died without answering cannot have committed (its
    decision is written before its token exists), so the others, aborted, may
    go back to the application: the dead one's connection reaches end of file
    there, as a crash of that enclave outside a migration would.  Read once
    every recorded enclave process that is dying ended (its platform channel
    hung up): a COMMIT it sent whose write had not begun is refused for good
    then, so the reading is final (``docs/spec/commit.md``, section 5).
    """

    from .journal import Journal  # lazy: the guardian starts fast and imports little
    from .recover_records import decisions_of

    if not journals:
        return False
    for name in journals:
        path = Path(name)
        try:
            journal = Journal.load(path)
            if not _settled(journal.holders):
                return False
            decisions = decisions_of(path.parent.parent.parent, journal.enclave_mids)
        except (MigSGXError, OSError, ValueError):
            return False
        if any(d is not None and d.kind == "commit" for d in decisions):
            return False
    return True
