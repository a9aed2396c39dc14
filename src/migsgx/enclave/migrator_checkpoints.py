"""Checkpoints: a migration whose destination is a file.

The source seals its state under a checkpoint's stream secret and gives it up
when the checkpoint is on disk (its gate opened, in a group with the group's
decision); the destination opens the key and claims the checkpoint id once
(``docs/spec/checkpoint.md``).  The dump and the load are the migration's own.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ..core.handshake import Role
from ..errors import (
    CheckpointGateError,
    CommittedError,
    GroupDecidedError,
    GroupUncheckedError,
    MigSGXError,
    PersistentStateError,
    ProtocolError,
)
from ..sgx.store_types import Decision, RecordUpdate
from . import checkpoints
from .migrator_destination import _DestinationSide


class _Checkpoints(_DestinationSide):
    """Both ends of a checkpoint."""

    def ckpt_out(self, group: bytes = b"") -> dict[str, Any]:
        """Source: a sealed stream secret and a fresh checkpoint id; the dump follows.

        ``group`` (16 bytes): the checkpoint of several enclaves this one is part
        of; its gate is created in that group, and its commit and abort are the
        group's decisions (``docs/spec/checkpoint.md``, section 3, step 6).
        """

        if not isinstance(group, bytes) or len(group) not in (0, 16):
            raise ProtocolError("a checkpoint group id has 16 bytes")
        if self.role is not None:
            raise ProtocolError("a migration is already in progress")
        self.checkpoint = checkpoints.start(self.instance, group)
        self.role = Role.SOURCE
        return {"id": self.checkpoint.checkpoint_id, "key": self.checkpoint.sealed_key}

    def ckpt_commit(self, meta: bytes = b"") -> None:
        """Source: the checkpoint is on disk; give the state up for good.

        ``meta``: the SHA-256 of the checkpoint's metadata file, bound into the
        committed gate (empty: none).
        """

        with self._ckpt_decide:
            self._ckpt_commit(meta)

    def _ckpt_commit(self, meta: bytes) -> None:
        ckpt = self.checkpoint
        if ckpt is None or self.role is not Role.SOURCE or not self.dumped or self.committed:
            raise ProtocolError("no completed checkpoint to commit")
        if not isinstance(meta, bytes) or len(meta) not in checkpoints.META_SIZES:
            raise ProtocolError("the checkpoint metadata digest is 32 bytes or empty")
        if ckpt.streams.busy:
            raise ProtocolError("a stream of the checkpoint is still being sealed")
        # One platform update: the record retires and the checkpoint's gate opens.
        reason = "this enclave's persistent state was checkpointed"
        opening = checkpoints.commit_change(self.instance, ckpt, meta)

        def lost() -> None:
            self._ckpt_unknown = ckpt.checkpoint_id

        with self._answer_lost("checkpoint gate commit", "migsgx recover --checkpoint", lost):
            self._gate_commit(ckpt, reason, opening)
        self.committed = True
        self._ckpt_unknown = b""
        self.instance.retire("this enclave's state was checkpointed")
        self._exit_thread = threading.get_ident()

    def _gate_commit(
        self, ckpt: checkpoints.Checkpoint, reason: str, opening: tuple[str, RecordUpdate]
    ) -> None:
        if not ckpt.group:
            self.persistent.retire(reason, also=[opening])
        else:
            # In a group, with the group's decision: refused once a sibling aborted.
            decision = Decision(ckpt.checkpoint_id, "commit", b"", group=ckpt.group)

            def record(retire: Sequence[tuple[str, RecordUpdate]]) -> None:
                if self.instance.services.decide(decision, retire).kind != "commit":
                    raise CheckpointGateError("this checkpoint was aborted before")

            try:
                self.persistent.retire_with(reason, record, also=[opening])
            except GroupDecidedError as exc:
                raise GroupDecidedError(
                    "another enclave of this checkpoint aborted first: this one cannot "
                    "commit (it may abort)"
                ) from exc

    def _abort_unknown_gate(self, ckpt: checkpoints.Checkpoint) -> None:
        """The abort of a checkpoint whose gate commit may be recorded: never best effort.

        The platform store answers (``docs/spec/commit.md``, section 5): the gate
        still pending goes (alone; in a group with the group's ABORT), and the
        abort goes ahead; a committed gate (its own COMMIT held) means committed
        (:class:`CommittedError`); no answer changes nothing, the enclave stays
        frozen (:class:`GroupUncheckedError`, asked again by the guardian or
        ``migsgx recover --checkpoint``).
        """

        services = self.instance.services
        try:
            if ckpt.group:
                decision = Decision(ckpt.checkpoint_id, "abort", b"", group=ckpt.group)
                held = services.decide(decision, [checkpoints.abort_change(ckpt)])
                committed = held.kind == "commit"
            else:
                committed = services.counter_read(ckpt.gate_counter) == checkpoints.COMMITTED
                if not committed:
                    services.persist_update(*checkpoints.abort_change(ckpt))
        except GroupDecidedError as exc:
            raise GroupDecidedError(
                "another enclave of this checkpoint committed its gate first: this one stays "
                "frozen until it commits too"
            ) from exc
        except (MigSGXError, OSError) as exc:
            raise GroupUncheckedError(
                "this checkpoint's gate commit may be recorded (its platform service went away "
                "while it recorded it); the enclave stays frozen until its platform service is "
                f"back ({getattr(exc, 'code', type(exc).__name__)})"
            ) from exc
        self._ckpt_unknown = b""
        if committed:
            self.committed = True
            self.instance.retire("this enclave's state was checkpointed")
            raise CommittedError("this enclave's checkpoint gate committed before: it is committed")

    def ckpt_in(self, sealed_key: bytes, meta: bytes = b"") -> None:
        """Destination: open a checkpoint's key (this host, an enclave it allows).

        ``meta``: the SHA-256 of the metadata file the restore read; it must be
        the one the source committed.
        """

        if not isinstance(sealed_key, bytes) or not isinstance(meta, bytes):
            raise ProtocolError("__ckpt_in takes the key record and a metadata digest")
        if self.role is not None:
            raise ProtocolError("a migration is already in progress")
        if self.instance.calls_served:
            raise ProtocolError("only a freshly launched enclave can restore a checkpoint")
        self._without_persistent()
        self.checkpoint = checkpoints.open_key(self.instance, sealed_key, meta)
        self.role = Role.DESTINATION
        self.instance.quiesce(timeout=0)
        self.persistent.freeze(timeout=5.0)

    def ckpt_activate(self) -> dict[str, Any]:
        """Destination: every stream verified; claim the checkpoint id once, then run."""

        if self.checkpoint is None or self.role is not Role.DESTINATION:
            raise ProtocolError("no checkpoint is being restored")
        if self._pending_state is None:
            raise ProtocolError("the checkpoint's state has not been loaded")
        # The gate is consumed in the update that installs the persistent state:
        # the checkpoint runs at most once, and only after its source committed.
        try:
            self._activate(also=[checkpoints.consume_change(self.checkpoint)])
        except PersistentStateError as exc:
            raise CheckpointGateError(
                "the checkpoint could not be claimed: it was restored before, or its state "
                "cannot be installed here"
            ) from exc
        self.checkpoint = None
        return {"active": True}
