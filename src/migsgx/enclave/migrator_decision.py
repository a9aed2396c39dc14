"""The source's decision: its COMMIT, and what a committed source still does.

The durable COMMIT with its token (``docs/spec/commit.md``, section 1), the
token again, the release, the start of a re-delivery of the frozen state
(2.1), and the decision whose answer was lost: a COMMIT that reached the
platform service, which went away before it answered (1 rule 4).  Such an
enclave is neither committed nor undecided until its platform store answers,
so whatever a committed source does (the token again, a re-delivery, the
release) first asks the store (:meth:`_SourceDecision._read_decision`), and an
abort asks it too (:meth:`_SourceDecision._record_unknown_abort`).  The
checkpoints' gate commit has the same lost answer (:meth:`_SourceDecision._answer_lost`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

from ..core.commit import CommitState
from ..core.handshake import Role
from ..errors import (
    DecisionUnknownError,
    GroupDecidedError,
    GroupUncheckedError,
    MigrationError,
    MigSGXError,
    PlatformAnswerLostError,
    ProtocolError,
)
from ..sgx.store_types import Decision, RecordUpdate
from .migrator_state import _MigratorState


class _HeldCommitError(Exception):
    """The store answered an abort with this enclave's own COMMIT (first decision wins)."""


class _SourceDecision(_MigratorState):
    """A migration's source: its COMMIT, its token, its release, its state again."""

    #: The migration whose COMMIT went out and got no answer: it may be recorded
    #: (``docs/spec/commit.md``, 1 rule 4).
    _unknown_mid: bytes = b""
    #: The checkpoint whose gate commit went out and got no answer (the same rule).
    _ckpt_unknown: bytes = b""
    #: The ABORT asked of that migration while its decision was unknown and the store
    #: did not answer: from then on the decision is read back with it, never with the
    #: COMMIT (whoever asked for the abort may already take the source for undecided).
    _abort_asked: Decision | None = None

    @staticmethod
    @contextlib.contextmanager
    def _answer_lost(what: str, then: str, mark: Callable[[], None]) -> Iterator[None]:
        """A commit request that went out and got no answer: ``mark`` it, say decision-unknown.

        ``what`` names the request (its COMMIT, its checkpoint gate commit), ``then``
        what to run once the platform service is back.  A request whose send failed
        is not this (nothing can be recorded): it raises as it is.
        """

        try:
            yield
        except PlatformAnswerLostError as exc:
            mark()  # (sent: it may hold, retirement and all)
            raise DecisionUnknownError(
                f"this enclave's {what} reached its platform service, which went away "
                "before it answered: it may be recorded; the enclave stays frozen until "
                f"its platform service is back (run {then} then)"
            ) from exc

    def commit(self) -> bytes:
        """Source: decide COMMIT, durably; the state stays here, frozen, until released.

        The decision (with the token) is written to this host's platform store in
        the same atomic update that retires the persistent record
        (``docs/spec/commit.md``).  From then on this enclave never runs again,
        but it keeps its memory until :meth:`release`: while the destination has
        not confirmed that it runs, this frozen copy is what a re-delivery reads.

        The store may hold this migration's COMMIT already (its first answer was
        lost): then the token is the recorded one, never a second (rule 3).
        """

        sc = self._source_commit()
        # Every precondition of the token before anything is retired: a refusal
        # after the retirement would leave the state nowhere.
        if sc.state is not CommitState.LOAD_CONFIRMED:
            raise ProtocolError("the destination has not confirmed the load")
        if self.keys is None or self.keys.streams.busy:
            raise ProtocolError("a stream was started after the destination's LOADED")
        services = self.instance.services
        if self.redelivering:
            # Decided before (the first decision is final): a token for this session.
            token = sc.commit()
            self._token = token
            self.redelivering = False
            return token
        self._read_with_abort()
        recorded: list[bytes] = []

        def record(token: bytes) -> None:
            decision = Decision(sc.migration_id, "commit", token, group=self.group)

            def write(retire: Sequence[tuple[str, RecordUpdate]]) -> Decision:
                held = services.decide(decision, retire)
                if held.kind != "commit":
                    # (raised inside: nothing of the persistent state is taken for retired)
                    raise MigrationError("this migration was decided aborted before")
                return held

            def lost() -> None:
                self._unknown_mid = sc.migration_id

            try:
                with self._answer_lost("COMMIT", "migsgx recover", lost):
                    held = self.persistent.retire_with(
                        "this enclave's persistent state has moved to another host", write
                    )
            except GroupDecidedError as exc:
                raise MigrationError(
                    "another enclave of this migration aborted: this one cannot commit"
                ) from exc
            recorded.append(held.frame)

        token = sc.commit(record)
        if recorded and recorded[0]:
            # The COMMIT the store holds: this call's, or the one whose answer was lost.
            token = recorded[0]
        self.committed = True
        self._unknown_mid = b""
        self._abort_asked = None
        self._token = token
        self._committed_mid = sc.migration_id
        return token

    def _decision_unknown(self) -> bool:
        sc = self.source_commit
        return bool(self._unknown_mid) and sc is not None and sc.migration_id == self._unknown_mid

    def _read_with_abort(self) -> None:
        """A COMMIT of a migration whose abort was asked: the store is asked with that ABORT.

        Once an abort was asked while the decision was unknown (``group-unchecked``),
        whoever asked may take the source for undecided, and a COMMIT recorded now
        (by any holder of the connection, asking the token or the release) would
        be one nobody asked for.  First decision wins: a COMMIT held, the commit
        goes on (with the recorded token); nothing held, the ABORT is recorded
        and the commit refused (:class:`MigrationError`), the state frozen and
        intact until the abort asked next, which the store answers ABORT.
        """

        asked = self._abort_asked
        if asked is None or not self._decision_unknown() or asked.migration_id != self._unknown_mid:
            return
        try:
            held = self.instance.services.decide(asked)
        except GroupDecidedError:
            return  # (another enclave of its group committed: the commit rolls forward)
        if held.kind != "commit":
            raise MigrationError(
                "this migration's abort was asked, and it is decided aborted: it cannot commit"
            )

    def _read_decision(self, then: str) -> None:
        """Before anything only a committed source does: a lost answer read from the store.

        Its COMMIT went out and its answer was lost (:meth:`_decision_unknown`):
        the store is asked with that COMMIT again, and its first decision answers.
        COMMIT (the one recorded, or recorded now: the enclave verified LOADED
        and was asked to commit): committed, with the recorded token.  ABORT
        (or its group's other decision): not committed, refused here
        (:class:`MigrationError`).  No answer: still unknown, still frozen
        (:class:`DecisionUnknownError`, asked again).  Once an abort was asked
        (and not answered), the store is asked with that ABORT instead
        (:meth:`_read_with_abort`).  ``then`` names what was asked, for the message.
        """

        with self._ckpt_decide:  # (one decision at a time: an abort reads the store too)
            if self.committed or not self._decision_unknown():
                return
            try:
                self.commit()
            except (DecisionUnknownError, MigrationError, ProtocolError):
                raise  # (the store answered, or this enclave cannot commit at all)
            except (MigSGXError, OSError) as exc:
                raise DecisionUnknownError(
                    f"this enclave's decision is unknown (its COMMIT's answer was lost) and its "
                    f"platform store did not answer ({getattr(exc, 'code', type(exc).__name__)}): "
                    f"it stays frozen; {then} once its platform service is back"
                ) from exc

    def redeliver_start(self) -> bytes:
        """Source, committed: a new handshake, same migration id, for the state again.

        The destination enclave that loaded the state died before it claimed the
        migration id (window W2, ``docs/spec/commit.md``).  This enclave still
        holds the state, frozen; it hands it again, attested and keyed like the
        first time, to a fresh enclave on the *same* destination platform, whose
        claim store lets the id activate at most once.  A source whose COMMIT's
        answer was lost reads its decision from the store first.
        """

        self._read_decision("deliver the state again")
        if not self.committed or self._token is None or self._dumped_parts is None:
            raise ProtocolError("only a committed source re-delivers its state")
        if self.checkpoint is not None or not self._destination_platform:
            raise ProtocolError("nothing to re-deliver")
        mid = self._committed_mid
        if len(mid) != 16:
            raise ProtocolError("no migration id to re-deliver")
        if self.rounds_out is not None:
            self.rounds_out.close()
            self.rounds_out = None
        self._close_ring()
        self.role = None
        self.keys = None
        self.redelivering = True
        self.handshake = self._new_handshake(Role.SOURCE, migration_id=mid)
        self.handshake.start()
        return self.handshake.data_to_send()

    def token(self) -> bytes:
        """Source, committed: the COMMIT token again (the recorded one), for a re-delivery."""

        self._read_decision("ask the token again")
        if self._token is None:
            raise ProtocolError("no commit was decided")
        return self._token

    def release(self) -> None:
        """Source, committed: the destination runs; wipe the state and exit."""

        self._read_decision("release it again")
        if not self.committed or self._token is None:
            raise ProtocolError("only a committed source is released")
        self.instance.retire("this enclave's state has moved to another host")
        self._exit_thread = threading.get_ident()

    def _record_unknown_abort(self, decision: Decision) -> None:
        """The abort of a migration whose COMMIT may be recorded: never best effort,
        ``none_committed`` or not.  The store's answer decides (the first decision wins):
        ABORT, it aborts; its own COMMIT (:class:`_HeldCommitError`), it is committed;
        none, it stays frozen (``group-unchecked``, asked again by the guardian)."""

        try:
            held = self.instance.services.decide(decision)
        except GroupDecidedError:
            raise
        except (MigSGXError, OSError) as exc:
            self._abort_asked = decision  # (the read-back sends it from now on)
            raise GroupUncheckedError(
                "this enclave's decision may be recorded (its platform service went away "
                "while it recorded the COMMIT); it stays frozen until its platform service "
                f"is back ({getattr(exc, 'code', type(exc).__name__)})"
            ) from exc
        if held.kind != "abort":
            raise _HeldCommitError
        self._unknown_mid = b""
        self._abort_asked = None
