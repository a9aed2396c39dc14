"""The source's side of a migration: the dump into the ring, LOADED, the aborts.

The hello, the dump (sealed straight into the ring the untrusted side
provides), the destination's LOADED, the migration group, and every abort
with the records that make it final (``docs/spec/commit.md``).  The COMMIT,
the token, the release, the re-delivery and the reading of a decision whose
answer was lost are the layer below (:mod:`.migrator_decision`).
"""

from __future__ import annotations

import time
from typing import Any

import cbor2

from ..core.commit import CommitState, LoadConfirmed
from ..core.handshake import PeerAborted, Role
from ..core.manifest import Manifest, Section
from ..core.stream import TAG_SIZE, StreamSealer
from ..datapath.slots import ChunkWriter, fill_ring
from ..datapath.transport import context_switches
from ..errors import (
    AwaitingDecisionError,
    CommittedError,
    GroupDecidedError,
    GroupUncheckedError,
    MigrationError,
    MigSGXError,
    ProtocolError,
)
from ..limits import check_chunk_size
from ..sgx.store_types import Decision
from . import checkpoints, precopy
from .migrator_decision import _HeldCommitError, _SourceDecision
from .migrator_state import ABORTS_KEPT, MIN_CHUNK, RING_TIMEOUT


def _sealing(sealer: StreamSealer) -> ChunkWriter:
    """The dump loop's chunk writer: seal straight into the slot (the transport copies nothing)."""

    def write(part: memoryview, slot: memoryview, last: bool) -> int:
        return sealer.seal_into(part, slot[: len(part) + TAG_SIZE], final=last)

    return write


class _SourceSide(_SourceDecision):
    """A migration's source: its dump, LOADED, its group, its aborts."""

    def out_start(self) -> bytes:
        """Source: begin a migration; returns the source hello for the destination."""

        self.handshake = self._new_handshake(Role.SOURCE)
        self.handshake.start()
        return self.handshake.data_to_send()

    def dump(self, chunk_size: int, quiesce_timeout: float = 30.0) -> dict[str, Any]:
        streams, ring = self._ready(Role.SOURCE)
        if self.source_commit is not None and self.source_commit.state is not (
            CommitState.AWAIT_LOADED
        ):
            raise ProtocolError("the destination confirmed the load already: no new dump")
        if self.checkpoint is not None and self.dumped:
            raise ProtocolError("the checkpoint was dumped already: no new dump")
        if not check_chunk_size(chunk_size, fits=ring.slot_size - TAG_SIZE):
            raise ProtocolError(f"chunk size must be at least {MIN_CHUNK} and fit a ring slot")
        t0 = time.monotonic()
        cpu0 = time.process_time()
        switches0 = context_switches()
        # From here on the dump's driver is the one on the application's connection:
        # a side channel that ran the handshake may close without aborting it.
        self.dumping = True
        memory = self.instance.memory
        if self.redelivering:
            # Frozen since the first dump, nothing changed: the same state again.
            assert self._dumped_parts is not None
            state, persistent = self._dumped_parts
        else:
            self.instance.quiesce(timeout=quiesce_timeout)
            # From here until an abort, no seal or counter operation may change what
            # the dump says (enclave threads outside ECALLs get FrozenError).
            self.persistent.freeze(timeout=quiesce_timeout)
            persistent = self.persistent.export()
            state = cbor2.dumps(self.instance.export_small_state())
            self._dumped_parts = (state, persistent)
        t_quiesced = time.monotonic()
        if self.rounds_out is not None:
            self.rounds_out.ring = ring
            live = precopy.final_dump(self.rounds_out, state, persistent, chunk_size)
            self.dumped = True
            return {
                **live,
                "streams": len(streams.summaries),
                "quiesce_seconds": t_quiesced - t0,
                "dump_seconds": time.monotonic() - t_quiesced,
                "timeline": {"quiesce": [t0, t_quiesced], **live["timeline"]},
            }
        sections = [
            Section.dense("state", len(state)),
            Section.dense("memory", memory.used),
            Section.dense("persistent", len(persistent)),
        ]
        manifest = Manifest(tuple(sections)).encode()
        sent = 0
        plan: list[tuple[str | Section, memoryview]] = [
            ("manifest", memoryview(manifest)),
            (sections[0], memoryview(state)),
            (sections[1], memory.view(0, memory.used)),
            (sections[2], memoryview(persistent)),
        ]
        for n, (expect, data) in enumerate(plan):
            sealer = streams.sealer(expect, chunk_size)
            sent += fill_ring(ring, sealer.header_bytes, chunk_size, final=False,
                              timeout=RING_TIMEOUT)  # fmt: skip
            sent += fill_ring(ring, data, chunk_size, _sealing(sealer),
                              final=n == len(plan) - 1, timeout=RING_TIMEOUT)  # fmt: skip
        t_sealed = time.monotonic()
        ring.wait_drained(RING_TIMEOUT)
        self.dumped = True
        t_end = time.monotonic()
        return {
            "streams": len(streams.summaries),
            "bytes": sent,
            "memory_bytes": memory.used,
            "quiesce_seconds": t_quiesced - t0,
            "dump_seconds": t_end - t_quiesced,
            "cpu_seconds": time.process_time() - cpu0,  # the enclave process, every thread
            "switches": context_switches() - switches0,
            # CLOCK_MONOTONIC is one clock for every process of the host: the
            # untrusted side lays these beside its own phases.
            "timeline": {
                "quiesce": [t0, t_quiesced],
                "seal": [t_quiesced, t_sealed],
                "drained": [t_sealed, t_end],
            },
        }

    def loaded(self, frame: bytes) -> dict[str, Any]:
        """Source: the destination's LOADED; verified here, nothing is given up yet."""

        sc = self._source_commit()
        event = sc.receive(frame)
        if isinstance(event, PeerAborted):
            raise MigrationError(f"the destination aborted: {event.code}")
        assert isinstance(event, LoadConfirmed)
        return {"streams": event.streams, "digest": event.digest}

    def set_group(self, group: bytes) -> None:
        """Source, before its decision: the migration it moves in with other enclaves.

        Every enclave of one application's migration gets the same 16-byte id
        before the first of them decides; the platform store then refuses an
        ABORT of any of them once one committed, and a COMMIT once one aborted
        (``docs/spec/commit.md``, section 1.1).  Set once; the same id again is
        accepted (a retry), another is refused.
        """

        if not isinstance(group, bytes) or len(group) != 16:
            raise ProtocolError("a migration group id has 16 bytes")
        sc = self.source_commit
        if self.role is not Role.SOURCE or sc is None or self.checkpoint is not None:
            raise ProtocolError("only a migrating source joins a migration group")
        if self.committed or sc.state not in (CommitState.AWAIT_LOADED,
                                              CommitState.LOAD_CONFIRMED):  # fmt: skip
            raise ProtocolError("this migration was decided already")
        if self.group and self.group != group:
            raise ProtocolError("this enclave is in another migration group")
        self.group = bytes(group)

    def abort(self, reason: str = "aborted", none_committed: bool = False) -> bytes:
        """Give up this migration; a source runs on with its state intact.

        ``none_committed``: the caller drove every decision of the migration
        group and saw none succeed (the tool rolling back).  Then an abort the
        platform store cannot record goes ahead in memory, as for a lone
        enclave, instead of ``group-unchecked`` (``docs/spec/commit.md``, 1.1
        rule 4): the source runs again although its platform service is gone.
        """

        if not isinstance(none_committed, bool):
            raise ProtocolError("__mig_abort: none_committed is a boolean")
        with self._ckpt_decide:
            if self.committed:
                raise CommittedError("this enclave's state was checkpointed")
            return self._abort(reason, none_committed)

    def _abort(self, reason: str, none_committed: bool) -> bytes:
        self._unchecked_abort_ok = none_committed
        frame = b""
        dc = self.dest_commit
        if dc is not None and dc.state is CommitState.AWAIT_COMMIT:
            # LOADED went out: the source may have committed, so this may be the
            # only copy.  Only the source's authenticated ABORT ends it.
            raise AwaitingDecisionError(
                "this enclave confirmed its load; only the source's decision ends it"
            )
        sc = self.source_commit
        try:
            if sc is not None:
                frame = sc.abort("aborted", reason[:200], record=self._record_abort)
                self._keep_abort(sc.migration_id, frame)
            elif dc is not None:
                frame = dc.abort("aborted", reason[:200])
        except GroupUncheckedError:
            raise  # (nothing changed: still frozen, the abort may be tried again)
        except _HeldCommitError:
            try:
                self.commit()  # (its own COMMIT was recorded, the answer lost)
            except MigSGXError as exc:
                # Its COMMIT is the store's decision: it rolls forward, never back,
                # and stays frozen until it can commit here too (never "aborted").
                raise GroupDecidedError(
                    f"this enclave's COMMIT is recorded; it stays frozen until it can "
                    f"commit here too ({exc.code})"
                ) from exc
            raise CommittedError(
                "this enclave's COMMIT was recorded before its platform service went away: "
                "it is committed"
            ) from None
        except GroupDecidedError:
            # Another enclave of this migration committed first: that is the commit
            # point of the whole migration.  This one rolls forward, never back.
            assert sc is not None
            if sc.state is not CommitState.LOAD_CONFIRMED:
                raise  # (a tool commits only after every LOADED: stays frozen, said)
            try:
                self.commit()
            except MigSGXError as exc:
                raise GroupDecidedError(
                    f"another enclave of this migration committed; this one stays frozen "
                    f"until it can commit too ({exc.code})"
                ) from exc
            raise CommittedError(
                "another enclave of this migration committed: this one committed too"
            ) from None
        except MigSGXError:
            frame = b""
        was_source = self.role is Role.SOURCE
        was_destination = self.role is Role.DESTINATION
        pending = self._pending_persistent
        ckpt = self.checkpoint if was_source else None
        if ckpt is not None and ckpt.checkpoint_id == self._ckpt_unknown:
            self._abort_unknown_gate(ckpt)  # (answered by the store, or it raises)
        elif ckpt is not None and ckpt.group:
            # Recorded first, with the gate's end: refused once a sibling committed.
            self._record_checkpoint_abort(ckpt, none_committed)
        elif ckpt is not None:
            # The source runs on: its checkpoint must never restore (a second copy).
            checkpoints.destroy(self.instance, ckpt)
        self._reset()
        if was_source:
            self._dumped_parts = None  # (kept only for a re-delivery after a commit)
            self.persistent.thaw()
            self.instance.resume()
        elif was_destination:
            self.persistent.release(pending)
            # Its memory may hold (part of) the source's state: wipe it, and never
            # let this enclave run or migrate again (it would be a second copy).
            self.discarded = True
            self.instance.retire("a migration into this enclave was aborted")
        return frame

    def _abort_unknown_gate(self, ckpt: checkpoints.Checkpoint) -> None:
        raise NotImplementedError  # (the checkpoints' side: ``_Checkpoints``)

    def _keep_abort(self, migration_id: bytes, frame: bytes) -> None:
        """Remember the ABORT of ``migration_id`` for :meth:`abort_frame` (bounded)."""

        self._aborted.pop(migration_id, None)
        self._aborted[migration_id] = frame
        while len(self._aborted) > ABORTS_KEPT:
            del self._aborted[next(iter(self._aborted))]

    def abort_frame(self, migration_id: bytes) -> bytes:
        """Source: the very ABORT frame of ``migration_id`` its abort sealed, again.

        Whoever asked for the abort may have died holding the only frame, and
        the store may hold none (``docs/spec/commit.md``, 1 rule 6).  Only for a
        migration this enclave aborted as its source: never one it committed,
        never the one under way, never an id it does not know.
        """

        if not isinstance(migration_id, bytes) or len(migration_id) != 16:
            raise ProtocolError("__mig_abort_frame takes a 16-byte migration id")
        sc = self.source_commit
        if sc is not None and sc.migration_id == migration_id:
            raise ProtocolError("that migration is under way: __mig_abort decides it")
        frame = self._aborted.get(migration_id)
        if frame is None:
            raise ProtocolError("this enclave aborted no migration of that id")
        return frame

    def _record_abort(self, frame: bytes) -> None:
        """Best effort: the in-memory ABORT already forbids a commit; the record lets
        anyone carry the ABORT to the destination later (``migsgx recover``).

        Not in a group (its first COMMIT: :class:`GroupDecidedError`; a record that
        failed: :class:`GroupUncheckedError`; nothing is aborted), nor after a COMMIT
        whose answer was lost (``docs/spec/commit.md``, 1 rule 4 and 1.1 rule 4).
        """

        assert self.source_commit is not None
        decision = Decision(self.source_commit.migration_id, "abort", frame, group=self.group)
        if self._decision_unknown():
            self._record_unknown_abort(decision)
            return
        try:
            self.instance.services.decide(decision)
        except GroupDecidedError:
            raise
        except (MigSGXError, OSError) as exc:
            if self.group and not self._unchecked_abort_ok:
                raise GroupUncheckedError(
                    "this enclave's migration group could not be checked (the platform "
                    f"store failed: {getattr(exc, 'code', type(exc).__name__)}); it stays "
                    "frozen: an abort after another enclave's commit would split the migration"
                ) from exc

    def _record_checkpoint_abort(self, ckpt: checkpoints.Checkpoint, unchecked_ok: bool) -> None:
        """A grouped checkpoint's abort: decided in the store with its gate's end, or not at all.

        The store refuses it (:class:`GroupDecidedError`) once another enclave
        of the checkpoint committed its gate: that was the commit point, so this
        one stays frozen, its gate pending, until it commits too (``__ckpt_commit``,
        the guardian's or ``migsgx recover --checkpoint``'s roll-forward).  As
        for a migration group (``docs/spec/commit.md``, 1.1 rule 4) an abort the
        store could not check changes nothing (:class:`GroupUncheckedError`),
        unless the caller saw no commit of the group (``none_committed``).
        """

        decision = Decision(ckpt.checkpoint_id, "abort", b"", group=ckpt.group)
        try:
            held = self.instance.services.decide(decision, [checkpoints.abort_change(ckpt)])
        except GroupDecidedError as exc:
            raise GroupDecidedError(
                "another enclave of this checkpoint committed its gate first: this one stays "
                "frozen until it commits too"
            ) from exc
        except (MigSGXError, OSError) as exc:
            if unchecked_ok:
                return  # (the gate stays pending, which never restores)
            raise GroupUncheckedError(
                "this checkpoint's group could not be checked (the platform store failed: "
                f"{getattr(exc, 'code', type(exc).__name__)}); the enclave stays frozen"
            ) from exc
        if held.kind == "commit":
            # Its own commit was recorded and the answer lost: the state is given up.
            self.committed = True
            self.instance.retire("this enclave's state was checkpointed")
            raise CommittedError("this enclave's checkpoint was committed before")
