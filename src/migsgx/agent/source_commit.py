"""The decision of ``migsgx migrate``: the source enclaves commit (the commit
point), their tokens are delivered (again, to a fresh enclave if a copy was lost:
window W2 of ``docs/spec/commit.md``), or everything rolls back
(:mod:`.source_rollback`, the layer below this one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket

from .. import _proc
from ..errors import (
    DecisionUnknownError,
    InDoubtError,
    LostAfterCommitError,
    MigSGXError,
    SourceLostError,
)
from .control import CONNECT_TIMEOUT
from .datalink import open_data
from .enclave_loss import committed_in_store
from .fault_relays import firewall_drop
from .faults import fault
from .lost_enclaves import hung_up
from .protocol import PastCommitError, RefusedError
from .source_rollback import _RollBackSteps
from .source_state import _Transfer

__all__: list[str] = []

log = logging.getLogger("migsgx.migrate")


class _DecisionSteps(_RollBackSteps):
    """Commit or roll back: the end of a migration, either way."""

    def _commit(self) -> None:
        if self.transfers:
            self._commit_enclaves()
            self.note("committed")
            self._inject(fault("tool.after-commit"))
            # The tokens go on the data connections, and again with ``resume`` over
            # the agents' TLS channel: a dropped data connection loses nothing.
            for transfer in self.transfers:
                try:
                    assert transfer.outgoing is not None
                    transfer.outgoing.deliver(_token_fault(transfer, fault("tool.before-token")))
                except MigSGXError as exc:
                    log.warning("enclave %d: %s", transfer.handed.index, exc)
                    self._redeliver(transfer)
            tokens = [(t.outgoing.token if t.outgoing else None) or b"" for t in self.transfers]
            try:
                reply = self.control_call({"t": "resume", "tokens": tokens}, "resumed")
            except MigSGXError as exc:
                if self.lazy is not None and exc.context.get("remote_code") == SourceLostError.code:
                    self._source_lost(exc)
                if exc.context.get("remote_code") != LostAfterCommitError.code:
                    raise InDoubtError(
                        "the source enclaves committed, but the destination did not confirm "
                        f"that it runs ({exc}); the source stays stopped: run migsgx recover"
                    ) from exc
                # Decided and claimed, then lost (W3): nothing is in doubt and nothing
                # can bring the state back; the source goes as after a success.
                self.lost_after_commit = LostAfterCommitError(
                    f"lost after the commit: {exc}", remote_code=LostAfterCommitError.code
                )
                reply = {"attach_seconds": 0.0}
            # The destination runs (or its copy was lost after the claim): the
            # downtime ends here, and the committed source enclaves may go (their
            # wipe is no part of it).
            self.note("resumed")
            if self.journal is not None:
                self.journal.update(phase="done")
            # (the committed source enclaves still hold their state and a duplicate of
            # their connection: ``migsgx recover`` releases them if nobody else does)
            self._inject(self._fault("tool.before-release"))
            released = 0
            for transfer in self.transfers:
                try:
                    assert transfer.outgoing is not None
                    transfer.outgoing.release()
                    released += 1
                except MigSGXError as exc:
                    log.warning("enclave %d: release: %s", transfer.handed.index, exc)
            if self.journal is not None and released == len(self.transfers):
                self.journal.update(holders=[])  # (they wiped and exited: none holds any)
        else:
            self.resume_sent = True
            if self.guardian is not None:
                self.guardian.note("resume-sent")
            self.note("committed")
            # From here on the destination decides: its ``resume`` is the commit point
            # of a tree without enclaves (``docs/spec/commit.md`` 4.3).
            self._inject(self._fault("tool.after-commit"))
            try:
                reply = self.control_call({"t": "resume"}, "resumed")
            except RefusedError as exc:
                past = exc.context.get("remote_code") == PastCommitError.code
                if past and self.lazy is not None:
                    # Post-copy: said only once the tree ran in its page window; the
                    # window's report follows, as after ``resumed``, and decides.
                    log.warning("%s: its tree runs, the window decides", exc)
                    reply = {"attach_seconds": 0.0}
                elif past:
                    raise InDoubtError(
                        "the destination recorded the resume (the commit point), then it "
                        f"failed ({exc}): the source stays stopped until the guardian (or "
                        "migsgx recover) hears the destination's answer"
                    ) from exc
                else:
                    self.resume_sent = False  # the destination refused, and killed what it held
                    raise
            except MigSGXError as exc:
                raise InDoubtError(
                    "the resume went, but the destination did not confirm it; its resume "
                    f"decides ({exc}): the source stays stopped until the guardian (or "
                    "migsgx recover) hears its answer"
                ) from exc
            self.note("resumed")
            self._inject(self._fault("tool.after-resumed"))
            if self.journal is not None:
                self.journal.update(phase="done")
        self.stats["attach"] = float(reply["attach_seconds"])

    def _redeliver(self, transfer: _Transfer) -> None:
        """The token did not reach a copy: if that copy is gone, deliver the state again.

        Window W2 (``docs/spec/commit.md``): the destination enclave died after
        the decision, before it claimed the migration id.  The committed source
        enclave still holds the state; the agent launches a fresh enclave and
        the state goes again, attested and keyed anew, same migration id.  A
        failure here changes nothing: ``resume`` then tells the outcome.
        """

        assert transfer.outgoing is not None
        index = transfer.handed.index
        try:
            reply = self.control_call({"t": "redeliver", "index": index}, "redelivery")
            port = int(reply["data_port"])
            if not port:
                return  # that copy still waits: the token goes again with ``resume``
            peer = socket.create_connection((self.opts.to[0], port), timeout=CONNECT_TIMEOUT)
            if transfer.peer is not None:
                transfer.peer.close()
            transfer.peer = peer
            peer.settimeout(None)
            open_data(peer, self.data_key, self.session_id, index)
            transfer.outgoing.redeliver(peer)
            self.stats["redelivered"] = int(self.stats.get("redelivered", 0)) + 1
            log.warning("enclave %d: the state was delivered again to a fresh enclave", index)
        except (MigSGXError, OSError) as exc:
            log.warning("enclave %d: delivering the state again failed: %s", index, exc)

    def _commit_enclaves(self) -> None:
        """Every source enclave decides COMMIT; the first one that does is the commit point.

        First every enclave learns the migration's group (a fresh id): from
        the first COMMIT on, the source host's platform store refuses an abort of
        any of them, so that whoever finishes a migration cut between two commits
        (the guardian, an enclave whose driver died) commits the rest.
        """

        for transfer in self.transfers:
            assert transfer.outgoing is not None
            transfer.outgoing.join_group(self.group_id)
        self._inject(self._fault("tool.after-group"))
        for transfer in self.transfers:
            if self.committed:
                self._inject(self._fault("tool.between-commits"))
            try:
                assert transfer.outgoing is not None
                # (an enclave already dead when asked cannot have decided anything)
                transfer.asked_to_commit = _proc.alive(transfer.handed.info.pid)
                transfer.outgoing.decide()
            except MigSGXError as exc:
                outlived = False if self.committed else self._commit_outlived(transfer)
                if outlived is None:
                    # Dead inside its commit, and the store could not be read (or its end
                    # not seen): neither way is known, so nothing is written as decided.
                    self.decision_unknown = True
                    raise InDoubtError(
                        f"enclave {transfer.handed.index} died inside its commit and its "
                        f"platform store could not be read ({exc}): the source stays stopped; "
                        "the guardian resolves it from the store (or run migsgx recover)"
                    ) from exc
                if outlived:
                    # Its COMMIT was written and its answer died with it: that was
                    # the commit point.  The store holds the token for the destination.
                    self.committed = True
                    if self.journal is not None:
                        self.journal.update(phase="committed")
                    raise InDoubtError(
                        f"enclave {transfer.handed.index} died inside its commit, after its "
                        f"COMMIT was recorded ({exc}): the decision stands and the source stays "
                        "stopped; the guardian delivers it (or run migsgx recover)"
                    ) from exc
                if not self.committed and isinstance(exc, DecisionUnknownError):
                    # Sent and maybe written, the answer lost: neither way is known.  The
                    # enclave stays frozen until a platform service answers its abort
                    # (``docs/spec/commit.md`` 1 rule 4); the guardian asks until then.
                    self.decision_unknown = True
                    raise InDoubtError(
                        f"enclave {transfer.handed.index}: its COMMIT may be recorded (its "
                        f"platform service went away before it answered: {exc}); the source "
                        "stays stopped until that service is back, then the guardian resolves "
                        "it from the store (or run migsgx recover)"
                    ) from exc
                if not self.committed:
                    raise  # nothing was decided: roll back
                # Some enclaves committed, this one did not: neither way is whole.
                raise InDoubtError(
                    f"enclave {transfer.handed.index} did not commit after others did ({exc}): "
                    "the tree is left held on the destination and stopped here"
                ) from exc
            self.committed = True
            if self.journal is not None:
                self.journal.update(phase="committed")

    def _commit_outlived(self, transfer: _Transfer) -> bool | None:
        """Whether ``transfer``'s enclave, sent ``__mig_commit`` and then dead, recorded
        its COMMIT: the store, read once its process ended, holds one (True), holds
        none (False), or cannot be read (None).  An enclave that lives answered for
        itself (False)."""

        mid = transfer.outgoing.migration_id if transfer.outgoing is not None else b""
        pid = transfer.handed.info.pid
        if not transfer.asked_to_commit or not mid:
            return False
        if _proc.alive(pid) and not hung_up(transfer.handed.sock):
            return False  # (it answered: an enclave closes its connection only as it ends)
        return committed_in_store(self._platform_state(), mid, pid)

    def _source_lost(self, exc: MigSGXError) -> None:
        self._end_source()
        raise SourceLostError(
            "the source stopped serving process pages inside the post-copy window, after "
            f"the commit point ({exc}); the destination killed its tree: the application "
            "is lost"
        ) from exc

    def _end_source(self) -> None:
        """Committed: the source tree (stopped since the fence) never runs again."""

        assert self.lazy is not None
        if not self.lazy.finish(5.0):
            self.lazy.stop()
        for pid in self.fenced:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._settle(True)


def _token_fault(transfer: _Transfer, action: str | None) -> bytes | None:
    """Fault injection on the data connection right before a token goes (a network
    fault, no process dies): ``drop`` shuts it down, ``stall`` has this host's
    firewall drop its packets both ways from now on, ``corrupt`` flips one bit of
    the token sent (returned: what to send instead)."""

    peer, token = transfer.peer, transfer.outgoing.token if transfer.outgoing else None
    if peer is None or token is None or action is None:
        return None
    if action == "drop":
        peer.shutdown(socket.SHUT_RDWR)
    elif action == "stall":
        firewall_drop(int(peer.getsockname()[1]))
    elif action == "corrupt":
        damaged = bytearray(token)
        damaged[len(damaged) // 2] ^= 0x01
        return bytes(damaged)
    return None
