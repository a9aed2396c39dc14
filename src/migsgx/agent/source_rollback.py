"""The roll-back of ``migsgx migrate``: nothing was decided, so the source enclaves
decide ABORT, the destination lets go of what it holds, and the source runs
again with its enclaves handed back (``docs/spec/commit.md`` section 4); an
enclave whose abort is not confirmed keeps the source stopped, in doubt.

The decision it undoes is :mod:`.source_commit`, a layer over this one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from .. import _proc
from .._trace import step
from ..errors import InDoubtError, MigSGXError
from .abort_confirm import abort_fault, confirm_abort
from .enclave_loss import committed_in_store
from .faults import fault
from .handback import abort_enclave, let_go
from .holders import watch_holders
from .source_enclaves import _EnclaveSteps
from .source_state import _Transfer

__all__: list[str] = []

log = logging.getLogger("migsgx.migrate")


class _RollBackSteps(_EnclaveSteps):
    """Roll back: the end of a migration that decided nothing."""

    #: The first COMMIT reached its platform service, which went away before it
    #: answered: it may be recorded, so nothing rolls back (the guardian resolves it).
    decision_unknown = False

    def _platform_state(self) -> Path:
        """This host's platform state directory (its store: the decisions)."""

        return self.opts.identity.directory.parent

    def _lost_undecided(self, frames: list[bytes]) -> list[int]:
        """Indices of the enclaves whose source enclave died undecided (the agent's
        ``abort`` says so: their copies end instead of staying held for good)."""

        state = self._platform_state()
        return [
            i for i, (transfer, frame) in enumerate(zip(self.transfers, frames, strict=True))
            if _undecided_and_gone(transfer, frame, self.committed, state)
        ]  # fmt: skip

    def _roll_back(self, cause: BaseException, *, source_gone: bool = False) -> None:
        if self.decision_unknown:
            # No roll-back: a COMMIT may be recorded.  The guardian (which outlives
            # this tool: ``hand_back_failed`` keeps it) asks the enclaves to abort until
            # their platform service answers: ABORT recorded, the source runs again;
            # their COMMIT, it rolls forward.
            log.warning("in doubt, the source stays stopped: %s", cause)
            self.hand_back_failed = True
            return
        reason = f"{type(cause).__name__}: {cause}"[:500]
        step("roll-back")
        log.warning("migration aborted: %s", reason)
        # The source enclaves decide ABORT first; their frames go on the data
        # connections and again with the agent's ``abort``, since a destination
        # enclave that sent LOADED ends only on one of them.
        socks: list[socket.socket] = []
        frames: list[bytes] = []
        unconfirmed: list[int] = []
        for index, transfer in enumerate(self.transfers):
            sock, frame = transfer.handed.sock, b""
            if transfer.outgoing is not None:
                try:
                    # Nothing committed here (else this is no roll-back): the
                    # enclaves abort even with their platform service gone.
                    action = self._fault("tool.abort-enclave")
                    with abort_fault(transfer.outgoing, transfer.handed.info.pid, action):
                        sock = transfer.outgoing.abort(
                            reason, none_committed=not self.committed,
                            answered=lambda: self._inject(self._fault("tool.abort-answered")),
                        )  # fmt: skip
                except Exception as exc:
                    log.warning("enclave %d: abort failed: %s", transfer.handed.index, exc)
                frame = getattr(transfer.outgoing, "abort_frame", b"") or b""
                # No frame: the abort failed, or the enclave had aborted before.  Asked
                # again, and never taken for aborted unless it says so.  (A live
                # transfer's closed side channel is itself an abort request to it.)
                if not frame and sock.fileno() != -1:
                    state, frame = confirm_abort(
                        sock, transfer.outgoing.migration_id, not self.committed, reason
                    )
                    if state == "unconfirmed":
                        log.warning("enclave %d: its abort is not confirmed (asked again: no "
                                    "answer, or a refusal)", transfer.handed.index)  # fmt: skip
                        unconfirmed.append(index)
            else:
                # (no migration began: it aborts nothing, and keeps its duplicate until
                # the application's ``__mig_unhold``, watching the application)
                abort_enclave(sock)
            socks.append(sock)
            frames.append(frame)
        step("enclaves-aborted")
        lost = self._lost_undecided(frames)
        # ``aborted`` until the source runs again: what the guardian and ``migsgx
        # recover`` finish by giving it back (``docs/spec/commit.md`` 4), but for the
        # enclaves it names ``unconfirmed``: still frozen, asked again by whoever
        # finishes, never taken for aborted.
        if self.journal is not None:
            # (``source_lost``: whoever finishes this roll-back says so too, and the
            # destination ends those copies; ``migsgx recover --json`` names them)
            self.journal.update(
                phase="aborted",
                **({"source_lost": lost} if lost else {}),
                **({"unconfirmed": unconfirmed} if unconfirmed else {}),
            )
        fault("tool.after-abort")
        kept_nothing = False
        if self.control is not None:
            with contextlib.suppress(MigSGXError):
                abort: dict[str, Any] = {"t": "abort", "reason": reason}
                if self.transfers:
                    abort["frames"] = frames
                if lost:
                    abort["source_lost"] = lost
                reply = self.control.call(abort, "aborted")
                kept_nothing = not reply.get("held")
        step("destination-aborted")
        self._inject(self._fault("tool.rolled-back"))
        if self.lazy is not None:
            self.lazy.stop()  # CRIU lets go of the tree before it is thawed
        if unconfirmed and not source_gone:
            self._not_thawed(unconfirmed, cause)
        elif unconfirmed:
            # Nothing to thaw, but an enclave still frozen in its migration refuses to
            # be let go: the guardian stays and asks it again (it then ends).
            self.hand_back_failed = True
        if not source_gone and self.link is not None and self.journal is not None:
            # Who holds each connection now, read while the tree is still stopped: the
            # enclaves follow those processes, not the ones named with the hold.
            watch_holders(socks, self.journal.holders, self.link.pid)
        for pid in self.fenced:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        step("continued")
        self._settle(False)
        # Which enclaves died is read now, before the application has its connections
        # back (it may end an enclave itself from then on; a pid may be reused).
        self.dead_at_hand_back = {
            t.handed.info.pid
            for t in [*self.abandoned, *self.transfers]
            if not _proc.alive(t.handed.info.pid)
        }
        if source_gone:
            # Nobody to hand the enclaves back to: closing their connections ends them.
            log.warning("the source application is gone; its enclaves end with it")
            let_go(socks)
        elif self.link is not None and socks:
            try:
                self.link.resume(socks)
                step("handed-back")
            except MigSGXError as exc:
                log.error("the enclaves could not be handed back (the guardian retries): %s", exc)
                self.hand_back_failed = True
        if self.journal is not None and not self.hand_back_failed:
            # Only now: the source runs again (its enclaves back with it, holding no
            # duplicate any more) and the destination kept nothing.  A ``done``
            # written before left a tool killed in between with a source stopped for
            # good and a journal that ``recover`` took for finished.
            self.journal.update(holders=[], **({"phase": "done"} if kept_nothing else {}))

    def _not_thawed(self, unconfirmed: list[int], cause: BaseException) -> None:
        """Enclaves whose abort is not confirmed: the source stays stopped (in doubt).

        Still frozen in their migration, they would answer none of the
        application's calls, and it takes its enclaves all or none.  The guardian
        (``hand_back_failed`` keeps it) asks them again, with a growing pause, and
        gives the source back once each aborted; ``migsgx recover`` does the same
        once the guardian is gone (``docs/spec/commit.md`` section 4).
        """

        self.hand_back_failed = True
        named = ", ".join(str(self.transfers[i].handed.index) for i in unconfirmed)
        raise InDoubtError(
            f"enclave(s) {named} did not confirm the abort (asked again: no answer, or a "
            "refusal): still frozen, so the source stays stopped; the guardian asks them "
            "again and gives the source back once each aborted (or run migsgx recover)"
        ) from cause


def _undecided_and_gone(
    transfer: _Transfer, frame: bytes, committed: bool, platform_state: Path
) -> bool:
    """Whether ``transfer``'s source enclave died without a decision it could ever make.

    No ABORT frame came back, its process is gone, no enclave of the migration
    committed, and either it was never sent ``__mig_commit`` (only that, or a
    group that committed, makes an enclave decide COMMIT), or it was and died
    inside it and the store, read once its process ended, holds no COMMIT of it
    (its platform service refuses for good a request whose enclave hung up:
    ``docs/spec/commit.md``, section 5).  No COMMIT token of it exists or can
    exist, so the destination's loaded copy can never run (window W1).
    """

    if frame or committed or transfer.outgoing is None:
        return False
    mid, pid = transfer.outgoing.migration_id, transfer.handed.info.pid
    if not mid:
        return False  # (no handshake: nothing waits on the destination)
    if _proc.alive(pid):
        return False
    return not transfer.asked_to_commit or committed_in_store(platform_state, mid, pid) is False
