"""The source end's decision: COMMIT or ABORT, the token's delivery, the state again.

On the destination's verified LOADED the source enclave decides; the token
goes to the destination on the data connection (or, in doubt, by the agents'
TLS channel), and only once the destination runs does the source enclave
release its state.  A destination enclave lost before it claimed gets the
frozen state again (:meth:`OutgoingEnclave.redeliver`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from ..errors import InDoubtError, MigrationError, MigSGXError
from .outgoing_transfer import _OutgoingTransfer
from .peerwire import _recv, _send

#: The bound on ``active`` after a token went on the data connection; the
#: destination judges a token in milliseconds, and the token goes again by the
#: agents' TLS channel anyway.
DELIVER_TIMEOUT = 3.0
#: How long ``active`` may still come after the destination said ``rejected``.
REJECTED_GRACE = 0.5


class OutgoingEnclave(_OutgoingTransfer):
    """Source side: hand one enclave's state to a destination, then commit or abort."""

    def redeliver(self, peer: socket.socket) -> bytes:
        """Committed, the destination enclave lost before it claimed: the state again.

        The source enclave runs a new handshake (same migration id, the same
        destination platform only) and dumps its frozen state again to a fresh
        destination enclave on ``peer``; on its LOADED it issues a COMMIT token
        for that session, which goes on ``peer`` at once (and again with
        ``resume``).  Returns the token.  Raises :class:`InDoubtError` if the
        new copy did not confirm that it runs.
        """

        if self.token is None:
            raise MigrationError("nothing was committed")
        self._loaded = False
        self._times = None
        try:
            self._handshake(peer, "__mig_redeliver_start", "sequential"
                            if self.mode == "sequential" else "pipelined")  # fmt: skip
            self.transfer(peer)
            self.token = bytes(self.link.call("__mig_commit"))
        except (MigSGXError, OSError) as exc:
            raise InDoubtError(f"the state could not be delivered again: {exc}") from exc
        self.deliver()
        return self.token

    def revoke(self, peer: socket.socket) -> None:
        """Committed, the destination's copy can never run: undo the commit on its proof.

        The source enclave runs a re-delivery handshake (same migration id, the
        same destination platform only) with a fresh enclave on ``peer``,
        offered in mode ``refuse``: that enclave refuses the id in its host's
        claim store for good and answers REFUSED, which the source enclave
        verifies; it then revokes its commit and runs on, its persistent state
        re-opened (``docs/spec/commit.md``, 2.2).  Raises :class:`InDoubtError`
        if any step fails (then nothing changed here: still committed, frozen).
        """

        if self.token is None:
            raise MigrationError("nothing was committed")
        self._finished = True  # (a failed attempt never asks a committed source to abort)
        try:
            self._handshake(peer, "__mig_redeliver_start", "refuse")
            frame = bytes(_recv(peer, "refused")["frame"])
            self.link.call("__mig_refused", frame)
        except (MigSGXError, OSError) as exc:
            raise InDoubtError(f"the commit could not be revoked: {exc}") from exc
        self.token = None

    def commit(self) -> None:
        """Decide COMMIT, deliver the token, and release the source once the destination runs.

        Raises :class:`InDoubtError` when the destination did not confirm (the
        decision stands; the source enclave keeps its frozen state), and any
        other error only if nothing was decided.
        """

        self.decide()
        self.deliver()
        self.release()

    def join_group(self, group: bytes) -> None:
        """Before any enclave of the migration decides: the migration's group id.

        With it the source host's platform store keeps the enclaves of one
        application together: once one committed, an abort of another is
        refused and that enclave commits instead (``docs/spec/commit.md``, 1.1).
        """

        self.link.call("__mig_group", bytes(group))

    def decide(self) -> bytes:
        """Decide COMMIT (durably, in the source enclave) and return the token.

        The source enclave keeps its frozen state until :meth:`release`.  Raises
        only if nothing was decided (then :meth:`abort` is still possible).
        """

        if not self._loaded or self.peer is None:
            raise MigrationError("commit before the destination confirmed the load")
        token = bytes(self.link.call("__mig_commit"))
        self._finished = True
        # The token is not secret and may be delivered any number of times.
        self.token = token
        return token

    def deliver(self, frame: bytes | None = None) -> None:
        """Carry the token over the data connection and wait for ``active``.

        Raises :class:`InDoubtError` if that fails: the decision stands, and the
        token goes again by another way (the agents' TLS channel).  ``frame``
        replaces the token (fault injection: a token damaged on the way).
        """

        if self.token is None or self.peer is None:
            raise MigrationError("nothing was committed")
        try:
            self.peer.settimeout(DELIVER_TIMEOUT)
            _send(self.peer, {"t": "commit", "token": self.token if frame is None else frame})
            while (kind := _recv(self.peer, "active", "loaded", "rejected")["t"]) != "active":
                if kind == "rejected":
                    # A frame was not authentic: this token, damaged on the way, or one
                    # forged beside it (then ``active`` follows at once).  Not waiting
                    # long: the token goes again by the agents' TLS channel anyway.
                    self.peer.settimeout(REJECTED_GRACE)
                # a LOADED delivered twice changes nothing now: the decision is made
        except (MigSGXError, OSError) as exc:
            raise InDoubtError(f"the COMMIT token did not reach the destination: {exc}") from exc

    def release(self) -> None:
        """The destination confirmed it runs: the source enclave wipes itself and exits."""

        self.link.call("__mig_release")

    def abort(
        self,
        reason: str,
        *,
        none_committed: bool = False,
        answered: Callable[[], object] | None = None,
    ) -> socket.socket:
        """The source enclave resumes with its state; returns its connection.

        ``none_committed``: the caller decided every enclave of the migration and
        none committed, so the enclave may abort even if its platform store cannot
        record it (``__mig_abort``, ``docs/spec/commit.md`` 1.1 rule 4).
        ``answered`` runs once the enclave answered, before its ABORT frame goes
        on the data connection (the tool's fault point ``tool.abort-answered``).
        """

        self._abort_quietly(reason, none_committed=none_committed, answered=answered)
        self.close_side()
        return self.link.sock
