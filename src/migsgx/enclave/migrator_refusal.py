"""The way back from a COMMIT the destination never acted on (``docs/spec/commit.md``, 2.2).

A committed source enclave keeps its state frozen until the destination runs.
When the destination's copy can never run (a post-copy tree whose agent died
before the claim), the state would be lost although this enclave still holds
it.  The way back: a fresh destination enclave of the same measurement,
attested in a re-delivery handshake under the same migration id (2.1), refuses
the id in its host's claim store for good and answers REFUSED, sealed under
the session's keys; this enclave verifies it and, in one atomic update of its
own store, turns its decision from ``commit`` into ``revoked`` and re-opens
its persistent record, then runs on as after an abort.
"""

from __future__ import annotations

from typing import Any

from ..core.commit import CommitState
from ..core.handshake import Role
from ..errors import ClaimedBeforeError, MigrationError, ProtocolError
from .migrator_checkpoints import _Checkpoints


class _Refusals(_Checkpoints):
    """A destination's refusal of a migration id, and a committed source's revocation."""

    def refuse(self) -> bytes:
        """Destination, handshake done, nothing loaded: refuse the id here for good.

        The host's claim store records the refusal first (no claim of the id
        ever succeeds here afterwards, by any enclave); only then is the
        REFUSED frame made.  An id some enclave claimed cannot be refused
        (``claimed``).  This enclave then ends as after an abort: it holds
        nothing of the state, and it never runs or migrates again.
        """

        dc = self.dest_commit
        if self.role is not Role.DESTINATION or dc is None or self.keys is None:
            raise ProtocolError("only a destination whose handshake finished refuses")
        if dc.state is not CommitState.LOADING or self.keys.streams.summaries:
            raise ProtocolError("this destination loaded state already: it cannot refuse")
        if self.keys.streams.busy:
            raise ProtocolError("this destination is loading: it cannot refuse")
        services = self.instance.services
        mid = dc.migration_id

        def record() -> None:
            try:
                services.refuse_migration(mid)
            except ClaimedBeforeError as exc:
                raise ClaimedBeforeError(
                    "this migration id was claimed on this host: it cannot be refused"
                ) from exc

        frame = dc.refuse(record)
        self._reset()
        self.discarded = True
        self.instance.retire("this enclave refused the migration it was started for")
        return frame

    def refused(self, frame: bytes) -> dict[str, Any]:
        """Source, committed, in a re-delivery: the destination's REFUSED; the state runs again.

        Verified under this re-delivery session's keys (its handshake checked
        the destination's quote, the migration policy and that its platform is
        the one the state was committed to); then the store's ``commit`` of
        this migration id becomes ``revoked`` in the same atomic update that
        re-opens the persistent record the commit retired.  Only then is the
        enclave a live source again, as after an abort.
        """

        if self._exit_thread is not None or self.instance.retired:
            raise ProtocolError("this enclave was released: its state is gone")
        if not self.committed or not self.redelivering or self._dumped_parts is None:
            raise ProtocolError("only a committed source re-delivering its state takes a REFUSED")
        sc = self._source_commit()
        if sc.state is not CommitState.AWAIT_LOADED:
            raise ProtocolError("this re-delivery is past LOADED: no REFUSED is taken")
        if sc.migration_id != self._committed_mid:
            raise ProtocolError("this re-delivery is for another migration")
        mid = sc.migration_id
        services = self.instance.services
        _, section = self._dumped_parts

        def record() -> None:
            # Verified; if the store does not revoke, nothing changes (still committed).
            held = self.persistent.reopen_with(
                section, lambda reopen: services.revoke_commit(mid, reopen)
            )
            if held.kind != "revoked":
                raise MigrationError("the platform store did not revoke this commit")

        sc.refused(frame, record)
        self.committed = False
        self.redelivering = False
        self._token = None
        self._committed_mid = b""
        self._destination_platform = ""
        self._dumped_parts = None
        self._reset()
        self.persistent.thaw()
        self.instance.resume()
        return {"migration_id": mid, "decision": "revoked"}
