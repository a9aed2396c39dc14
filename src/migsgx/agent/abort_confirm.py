"""The roll-back's aborts, confirmed: an abort that got no answer is asked again.

The tool's roll-back asks each source enclave ``__mig_abort`` through its
migration end (:meth:`~migsgx.datapath.outgoing.OutgoingEnclave.abort`), which
keeps the ABORT frame returned and nothing else: a call that failed (no answer,
a refusal, a connection error) leaves an empty frame, as an enclave that had
aborted before does.  An enclave whose abort failed is still frozen in its
migration: it answers none of the application's calls, and the application
takes its enclaves all or none.  So where no frame came back the enclave is
asked again, bounded (:mod:`.enclave_ask`), and read as the guardian and
``migsgx recover`` read an answer (:func:`.handback.abort_reply`'s rule):
``aborted`` (its frame asked again by its migration id where it returned none,
``docs/spec/commit.md`` 1 rule 6), dead (its end closed: the roll-back's loss
rule), or not confirmed (hung, or a refusal), which the journal then names
(``unconfirmed``) and nobody takes for an abort: the source is not thawed
beside it (section 4).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any, Literal

from ..errors import EnclaveLostError
from .enclave_ask import ask
from .handback import _abort_of, abort_frame_of

__all__ = ["abort_fault", "confirm_abort"]

Confirmed = Literal["aborted", "dead", "unconfirmed"]


def confirm_abort(
    sock: socket.socket, migration_id: bytes | None, none_committed: bool, reason: str
) -> tuple[Confirmed, bytes]:
    """Ask the enclave at ``sock`` to abort again; what it is, and its ABORT frame.

    ``none_committed`` as the roll-back's own abort (the tool drove every
    decision and saw none succeed).  An enclave that aborted already answers
    ``aborted`` with no frame: its frame is then asked by ``migration_id``.
    """

    asked = ask(sock, "__mig_abort", [reason[:200], none_committed])
    if asked.state == "dead":
        return "dead", b""
    answer, frame = _abort_of(asked)
    if answer != "aborted":
        return "unconfirmed", b""
    if not frame and migration_id:
        frame = abort_frame_of(sock, migration_id)
    return "aborted", frame


class _LostRequests:
    """An enclave link whose requests are lost on their connection (fault injection)."""

    def __init__(self, link: Any) -> None:
        self._link = link

    def __getattr__(self, name: str) -> Any:
        return getattr(self._link, name)

    def call(self, name: str, *args: Any) -> Any:
        raise EnclaveLostError(f"fault injected: {name} was lost on its connection")


@contextlib.contextmanager
def abort_fault(outgoing: Any, pid: int, action: str | None) -> Iterator[None]:
    """Fault injection at the roll-back's abort of one enclave (``tool.abort-enclave``).

    ``drop``: the ``__mig_abort`` request is lost on the enclave's connection
    (the enclave is not told; everything else of the abort goes on);
    ``drop-and-stop``: the same, and the enclave is stopped (SIGSTOP: alive,
    its connection open, answering nothing), so that it is asked again in vain.
    """

    if action not in ("drop", "drop-and-stop"):
        yield
        return
    if action == "drop-and-stop":
        os.kill(pid, signal.SIGSTOP)
    link = outgoing.link
    outgoing.link = _LostRequests(link)
    try:
        yield
    finally:
        outgoing.link = link
