"""The trusted half of a migration, inside the enclave process.

The untrusted side drives it with runtime calls on the enclave's ECALL
channel (``__mig_*``, see ``docs/spec/channels.md``); everything that touches
keys or plaintext happens here:

* the handshake (quotes binding ephemeral keys, the migration policy from the
  enclave's own measured manifest, key agreement);
* the dump: quiesce, then seal the small state and every used page of
  enclave memory chunk by chunk *into the shared-memory ring* the untrusted
  side provides, as SGX enclaves write straight into untrusted memory;
* the load: open each chunk from the ring straight into enclave memory (after
  copying it into private memory, so the untrusted side cannot change bytes
  between authentication and use), apply the small state only when every
  stream verified;
* the commit: the source gives up its state only on the destination's
  authenticated LOADED, the destination runs only on the source's COMMIT
  token and after claiming the migration id on its platform (once);
* the persistent state (``docs/spec/persistent.md``): frozen when the dump
  begins, carried as the ``persistent`` section, retired on the source right
  before its COMMIT token exists, installed on the destination right after it
  claimed the migration id; an abort thaws the source.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import cbor2

from ..core.commit import (
    CommitState,
    Committed,
    DestinationCommit,
    LoadConfirmed,
    SourceCommit,
)
from ..core.handshake import Handshake, HandshakeComplete, PeerAborted, Role, SessionKeys
from ..core.policy import MigrationPolicy, PolicyMode
from ..core.rounds import digest_key
from ..core.stream import TAG_SIZE, Manifest, Section, StreamChannel, StreamSealer
from ..datapath.ring import RingRole, ShmRing, recv_ring_fds
from ..datapath.transport import ChunkWriter, SlotReader, context_switches, fill_ring
from ..errors import (
    AwaitingDecisionError,
    CheckpointGateError,
    ClaimedBeforeError,
    CommittedError,
    GroupDecidedError,
    GroupUncheckedError,
    MigrationError,
    MigSGXError,
    PersistentStateError,
    ProtocolError,
    ReplayError,
    StreamError,
)
from ..limits import MIN_CHUNK_SIZE, check_chunk_size
from ..sgx.collateral import Collateral
from ..sgx.counters import Decision, RecordUpdate
from ..sgx.dcap import TcbPolicy, verify_dcap
from ..sgx.structs import ReportBody
from . import checkpoints, precopy, precopy_in
from .instance import EnclaveInstance
from .persistent import MAX_TRANSFER_BYTES, PendingImport, PersistentState

RING_TIMEOUT = 120.0
MIN_CHUNK = MIN_CHUNK_SIZE
MAX_STATE_BYTES = 64 << 20
#: The most bytes the manifest of a stop-and-copy state may take (it has three sections).
MANIFEST_ROOM = 4096
SECTIONS = ("state", "memory", "persistent")
#: How many of its own migrations' ABORT frames a source enclave keeps (``__mig_abort_frame``).
ABORTS_KEPT = 16


class _Attester:
    def __init__(self, instance: EnclaveInstance) -> None:
        self._services = instance.services

    def quote(self, report_data: bytes) -> bytes:
        return self._services.quote(report_data)


class _Verifier:
    """Quote verification of record (dcap-qvl) against the deployment's root, with the
    collateral the platform fetched from the CA; the TCB status is decided by the
    enclave's measured manifest (``accept_tcb``), debug by the migration policy."""

    def __init__(self, instance: EnclaveInstance) -> None:
        self._services = instance.services
        self._tcb = TcbPolicy(frozenset(instance.manifest.accept_tcb))
        #: The platform (PCK certificate subject) of the quote verified last: in a
        #: source's handshake, the destination's (its own quote is checked first).
        self.last_platform = ""

    def verify(self, quote: bytes) -> ReportBody:
        collateral = [Collateral.from_json(c) for c in self._services.collateral()]
        verdict = verify_dcap(
            quote, collateral, self._services.trusted_roots(), policy=self._tcb, allow_debug=True
        )
        self.last_platform = verdict.pck_subject
        return verdict.body


def _sealing(sealer: StreamSealer) -> ChunkWriter:
    """The dump loop's chunk writer: seal straight into the slot (the transport copies nothing)."""

    def write(part: memoryview, slot: memoryview, last: bool) -> int:
        return sealer.seal_into(part, slot[: len(part) + TAG_SIZE], final=last)

    return write


def policy_of(instance: EnclaveInstance) -> MigrationPolicy:
    m = instance.manifest
    return MigrationPolicy(mode=PolicyMode(m.migration_policy), allow_debug=m.debug)


class Migrator:
    """One enclave's migration state; at most one migration at a time."""

    def __init__(self, instance: EnclaveInstance) -> None:
        self.instance = instance
        self.role: Role | None = None
        self.handshake: Handshake | None = None
        self.keys: SessionKeys | None = None
        self.ring: ShmRing | None = None
        self.source_commit: SourceCommit | None = None
        self.dest_commit: DestinationCommit | None = None
        self.committed = False
        self.discarded = False
        self._exit_thread: int | None = None
        self.checkpoint: checkpoints.Checkpoint | None = None
        self.dumped = False
        self.dumping = False  # the dump began (on the application's connection)
        self._pending_state: Any = None
        self._pending_persistent: PendingImport | None = None
        # The persistent state went in with the claim of the migration id (one update).
        self._installed = False
        # The commit end of the migration this enclave came in by, kept after it
        # ran so that its COMMIT token, replayed, is still recognised as a replay.
        self._arrived: DestinationCommit | None = None
        self._token: bytes | None = None
        # Live migration (pre-copy rounds before the final dump): precopy.py.
        self.rounds_out: precopy.SourceRounds | None = None
        self.rounds_in: precopy_in.DestinationRounds | None = None
        self._verifier: _Verifier | None = None
        # Re-delivery after the commit (``docs/spec/commit.md``, section 2.1): the
        # small state and persistent section as dumped (the persistent record is
        # retired at the commit, so it cannot be exported again), the platform the
        # state went to, and whether a re-delivery handshake is under way.
        self._dumped_parts: tuple[bytes, bytes] | None = None
        self._destination_platform = ""
        self._committed_mid = b""
        self.redelivering = False
        self._repair_pending: tuple[bytes, bytes] | None = None
        #: The migration this enclave moves in with the application's others
        #: (``__mig_group``): the first decision of any of them binds them all.
        self.group = b""
        self._unchecked_abort_ok = False
        #: The ABORT frames this enclave returned as a source, by migration id, the
        #: newest last (at most ``ABORTS_KEPT``): asked again (``__mig_abort_frame``)
        #: after whoever got one died with it (``docs/spec/commit.md``, 1 rule 6).
        self._aborted: dict[bytes, bytes] = {}
        # A checkpoint's commit and abort run in threads of their own (a dead
        # tool's commit may still run while its guardian aborts): one at a time.
        self._ckpt_decide = threading.RLock()

    @property
    def persistent(self) -> PersistentState:
        return self.instance.context.persistent

    @property
    def exit_after_reply(self) -> bool:
        """True in the thread of the call that gave the state up: its reply is the last.

        Runtime calls run in threads of their own, and each checks this after its
        reply.  A flag for all threads would let another call that just replied
        (``__mig_loaded``, right before ``__mig_commit``) hang up first, and the
        COMMIT token would never leave the enclave.
        """

        return self._exit_thread == threading.get_ident()

    # --- dispatch -----------------------------------------------------------------
    def call(self, name: str, args: list[Any]) -> Any:
        fn = _CALLS.get(name)
        if fn is None:
            raise ProtocolError(f"no runtime call {name!r}")
        if (
            self.committed
            and name not in _AFTER_COMMIT
            and not (self.redelivering and name in _REDELIVERY)
        ):
            raise CommittedError("this enclave's state has moved to another host")
        if self.discarded and name != "__mig_status":
            raise MigrationError("a migration into this enclave was aborted; it cannot run")
        return fn(self, *args)

    def attach_ring(self, sock: socket.socket) -> None:
        """Receive the ring's descriptors that follow the ``__mig_ring`` frame."""

        if self.role is None:
            raise ProtocolError("no migration in progress")
        if self.ring is not None:
            self.ring.close()
        role = RingRole.PRODUCER if self.role is Role.SOURCE else RingRole.CONSUMER
        self.ring = recv_ring_fds(sock, role, timeout=10.0)

    # --- handshake ----------------------------------------------------------------
    def _new_handshake(self, role: Role, migration_id: bytes | None = None) -> Handshake:
        if self.role is not None:
            raise ProtocolError("a migration is already in progress")
        policy = policy_of(self.instance)
        self.role = role
        self._verifier = _Verifier(self.instance)
        return Handshake(
            role,
            attester=_Attester(self.instance),
            verifier=self._verifier,
            policy=policy,
            migration_id=migration_id,
            seen=self.instance.services if role is Role.DESTINATION else None,
        )

    def out_start(self) -> bytes:
        """Source: begin a migration; returns the source hello for the destination."""

        self.handshake = self._new_handshake(Role.SOURCE)
        self.handshake.start()
        return self.handshake.data_to_send()

    def redeliver_start(self) -> bytes:
        """Source, committed: a new handshake, same migration id, for the state again.

        The destination enclave that loaded the state died before it claimed the
        migration id (window W2, ``docs/spec/commit.md``).  This enclave still
        holds the state, frozen; it hands it again, attested and keyed like the
        first time, to a fresh enclave on the *same* destination platform, whose
        claim store lets the id activate at most once.
        """

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

    def in_start(self) -> None:
        """Destination: expect a migration; no ECALL runs until it completes."""

        if self.instance.calls_served:
            raise ProtocolError("only a freshly launched enclave can receive a migration")
        self._without_persistent()
        self.handshake = self._new_handshake(Role.DESTINATION)
        self.instance.quiesce(timeout=0)
        self.persistent.freeze(timeout=5.0)

    def prefault(self, nbytes: int) -> int:
        """Destination, before the state arrives: fault in ``nbytes`` of memory meanwhile.

        ``nbytes`` is the source's hint (its memory in use when it offered the
        state), untrusted and only a hint: at most this enclave's declared memory
        is faulted in, in a thread, while the handshake runs and the source still
        serves; the load stops it and gives back what lies beyond the memory
        that arrived.  On SGX hardware this is the runtime adding (EAUG) the
        pages ahead.  Returns the bytes it will fault in at most.
        """

        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ProtocolError("__mig_prefault: a byte count")
        if self.role is not Role.DESTINATION or self.checkpoint is not None:
            raise ProtocolError("only a migration's destination faults its memory in ahead")
        if self.ring is not None or self.instance.memory.prefaulting_ahead:
            raise ProtocolError("too late, or asked twice, to fault memory in ahead")
        return self.instance.memory.prefault_ahead(nbytes)

    def prefault_wait(self, seconds: float) -> dict[str, Any]:
        """Destination: wait up to ``seconds`` (at most a minute) for :meth:`prefault`'s
        thread to finish, so that the source, which waits for this enclave's
        ``destination-hello``, freezes only once the memory is in.  Returns
        ``done`` (whether it finished) and ``bytes`` (faulted in, 0 unless done)."""

        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ProtocolError("__mig_prefault_wait: seconds")
        if self.role is not Role.DESTINATION or self.checkpoint is not None:
            raise ProtocolError("only a migration's destination faults its memory in ahead")
        memory = self.instance.memory
        if self.ring is not None or not memory.prefaulting_ahead:
            return {"done": False, "bytes": 0}
        done = memory.wait_prefault(min(float(seconds), _PREFAULT_WAIT_MAX))
        return {"done": done is not None, "bytes": done or 0}

    def hs(self, data: bytes) -> dict[str, Any]:
        hs = self.handshake
        if hs is None or self.keys is not None:
            raise ProtocolError("no handshake in progress")
        hs.receive_data(data)
        event = hs.next_event()
        out = hs.data_to_send()
        if isinstance(event, PeerAborted):
            self._reset()
            raise MigrationError(f"the peer aborted the handshake: {event.code}")
        if isinstance(event, HandshakeComplete):
            platform = self._verifier.last_platform if self._verifier is not None else ""
            if self.redelivering and platform != self._destination_platform:
                # The claim store that lets the id activate once is the first
                # destination host's: another host would run a second copy.
                self.handshake = None
                raise MigrationError(
                    "a re-delivery goes only to the host the state was committed to"
                )
            self.keys = event.keys
            if self.role is Role.SOURCE:
                self._destination_platform = platform
                self.source_commit = SourceCommit(self.keys)
            else:
                self.dest_commit = DestinationCommit(self.keys, seen=_ClaimAndInstall(self))
        peer = hs.peer
        return {
            "send": out,
            "done": self.keys is not None,
            "peer_mr_enclave": peer.mr_enclave if peer else None,
            "migration_id": hs.migration_id,
        }

    # --- source: dump ---------------------------------------------------------------
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

    def commit(self) -> bytes:
        """Source: decide COMMIT, durably; the state stays here, frozen, until released.

        The decision (with the token) is written to this host's platform store in
        the same atomic update that retires the persistent record
        (``docs/spec/commit.md``).  From then on this enclave never runs again,
        but it keeps its memory until :meth:`release`: while the destination has
        not confirmed that it runs, this frozen copy is what a re-delivery reads.
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

        def record(token: bytes) -> None:
            decision = Decision(sc.migration_id, "commit", token, group=self.group)
            try:
                held = self.persistent.retire_with(
                    "this enclave's persistent state has moved to another host",
                    lambda retire: services.decide(decision, retire),
                )
            except GroupDecidedError as exc:
                raise MigrationError(
                    "another enclave of this migration aborted: this one cannot commit"
                ) from exc
            if held.kind != "commit":
                raise MigrationError("this migration was decided aborted before")

        token = sc.commit(record)
        self.committed = True
        self._token = token
        self._committed_mid = sc.migration_id
        return token

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

    def token(self) -> bytes:
        """Source, committed: the COMMIT token again, for a re-delivery."""

        if self._token is None:
            raise ProtocolError("no commit was decided")
        return self._token

    def release(self) -> None:
        """Source, committed: the destination runs; wipe the state and exit."""

        if not self.committed or self._token is None:
            raise ProtocolError("only a committed source is released")
        self.instance.retire("this enclave's state has moved to another host")
        self._exit_thread = threading.get_ident()

    # --- destination: load ---------------------------------------------------------
    def load(self, prefault: bool = False) -> dict[str, Any]:
        streams, ring = self._ready(Role.DESTINATION)
        dc = self.dest_commit
        t0 = time.monotonic()
        if self.rounds_in is not None:
            return self._load_live(t0)
        cpu0 = time.process_time()
        switches0 = context_switches()
        reader = SlotReader(ring, timeout=RING_TIMEOUT)

        def open_stream(expect: str | Section, sink: memoryview) -> int:
            opener = streams.opener(bytes(reader.take()), expect=expect)
            pos = 0
            while not opener.done:
                chunk = reader.take()
                room = sink[pos : pos + max(0, len(chunk) - TAG_SIZE)]
                if len(room) < len(chunk) - TAG_SIZE:
                    raise StreamError("a section of the migrated state is larger than it may be")
                pos += opener.open_into(chunk, room)
            return pos

        # Three dense sections take 134 bytes: a page holds them (and a buffer as
        # large as a chunk would be half this enclave's extra memory at 1 GiB).
        manifest_buf = bytearray(MANIFEST_ROOM)
        n = open_stream("manifest", memoryview(manifest_buf))
        manifest = Manifest.decode(bytes(manifest_buf[:n]))
        labels = tuple(s.label for s in manifest.sections)
        if labels != SECTIONS or any(s.page_size for s in manifest.sections):
            raise StreamError("unexpected sections in the migrated state")
        state_section, memory_section, persistent_section = manifest.sections
        memory = self.instance.memory
        if (
            state_section.length > MAX_STATE_BYTES
            or memory_section.length > memory.size
            or persistent_section.length > MAX_TRANSFER_BYTES
        ):
            raise StreamError("the migrated state does not fit this enclave")
        ahead = memory.prefaulting_ahead
        with memory.prefaulting(memory_section.length, prefault and not ahead):
            state_buf = bytearray(state_section.length)
            open_stream(state_section, memoryview(state_buf))
            open_stream(memory_section, memory.view(0, memory_section.length))
        faulted_ahead = memory.finish_prefault(memory_section.length)
        persistent_buf = bytearray(persistent_section.length)
        open_stream(persistent_section, memoryview(persistent_buf))
        if not reader.ended:
            raise StreamError("the transfer's end is not where the stream ends")
        try:
            self._pending_state = cbor2.loads(bytes(state_buf))
        except Exception as exc:
            raise StreamError("the migrated small state does not decode") from exc
        # Checked before LOADED: a state that cannot be installed here is refused
        # while the source can still go on.
        arrival = (
            self.keys.migration_id
            if self.keys is not None
            else (self.checkpoint.checkpoint_id if self.checkpoint is not None else b"")
        )
        self._pending_persistent = self.persistent.prepare_import(
            bytes(persistent_buf), arrival
        )
        # A live migration confirms to the source; a checkpoint restore has no peer.
        loaded = dc.loaded() if dc is not None else b""
        t_end = time.monotonic()
        return {
            "loaded": loaded,
            "bytes": reader.received,
            "memory_bytes": memory_section.length,
            # Faulted in before the load by __mig_prefault (0 without a hint).
            "prefaulted_bytes": faulted_ahead,
            "load_seconds": t_end - t0,
            "cpu_seconds": time.process_time() - cpu0,
            "switches": context_switches() - switches0,
            "timeline": {"open": [t0, t_end]},
        }

    def _load_live(self, t0: float) -> dict[str, Any]:
        """Destination of a live migration: the final transfer after the rounds.

        If segments differ, the result names them under ``repair`` and carries
        no LOADED: ``__mig_load_repair`` must follow (``precopy.md``, 3.3).
        """

        assert self.rounds_in is not None and self.ring is not None
        self.rounds_in.ring = self.ring
        state, persistent, figures = precopy_in.final_load(
            self.rounds_in, self._digest_key(), MAX_STATE_BYTES, MAX_TRANSFER_BYTES,
            used_length=_used_length, repair=True,
        )  # fmt: skip
        if "repair" in figures:
            self._repair_pending = (state, persistent)
            return {**figures, "loaded": b"", "load_seconds": time.monotonic() - t0}
        return self._loaded_live(state, persistent, figures, t0)

    def load_repair(self) -> dict[str, Any]:
        """Destination: the segments named after the final check, received and checked again."""

        _streams, ring = self._ready(Role.DESTINATION)
        pending, self._repair_pending = self._repair_pending, None
        if self.rounds_in is None or pending is None:
            raise ProtocolError("no final check asked for a repair")
        t0 = time.monotonic()
        self.rounds_in.ring = ring
        repair = precopy_in.repair_load(self.rounds_in, self._digest_key())
        return self._loaded_live(*pending, {"repair": repair}, t0)

    def _loaded_live(
        self, state: bytes, persistent: bytes, figures: dict[str, Any], t0: float
    ) -> dict[str, Any]:
        try:
            self._pending_state = cbor2.loads(state)
        except Exception as exc:
            raise StreamError("the migrated small state does not decode") from exc
        self._pending_persistent = self.persistent.prepare_import(persistent)
        loaded = self.dest_commit.loaded() if self.dest_commit is not None else b""
        t_end = time.monotonic()
        timeline = dict(figures.get("timeline", {}))
        last = max((span[1] for span in timeline.values()), default=t0)
        timeline["loaded"] = [last, t_end]
        return {**figures, "loaded": loaded, "load_seconds": t_end - t0, "timeline": timeline}

    # --- live migration: pre-copy rounds while ECALLs run --------------------------------
    def precopy_round(self, chunk_size: int) -> dict[str, Any]:
        """Source: the next pre-copy round, while the enclave keeps serving ECALLs."""

        _streams, ring = self._ready(Role.SOURCE)
        if self.rounds_out is None:
            raise ProtocolError("pre-copy rounds need the dirty tracker (__mig_track)")
        if not MIN_CHUNK <= chunk_size <= ring.slot_size - TAG_SIZE or chunk_size % 4096:
            raise ProtocolError("chunk size must be whole pages and fit a ring slot")
        self.rounds_out.ring = ring  # each round comes with a ring of its own
        return self.rounds_out.round(chunk_size)

    def precopy_repair(self, segments: list[int], chunk_size: int) -> dict[str, Any]:
        """Source, quiesced, final transfer sent: the segments the destination named, once."""

        _streams, ring = self._ready(Role.SOURCE)
        if self.rounds_out is None or not self.dumped:
            raise ProtocolError("a repair follows a live migration's final transfer")
        if self.source_commit is not None and self.source_commit.state is not (
            CommitState.AWAIT_LOADED
        ):
            raise ProtocolError("the destination confirmed the load already: no repair")
        if not isinstance(segments, list):
            raise ProtocolError("a repair names a list of segments")
        if not MIN_CHUNK <= chunk_size <= ring.slot_size - TAG_SIZE or chunk_size % 4096:
            raise ProtocolError("chunk size must be whole pages and fit a ring slot")
        self.rounds_out.ring = ring
        return precopy.repair_dump(self.rounds_out, segments, chunk_size)

    def precopy_track(self) -> dict[str, Any]:
        """Source: arm the OS's dirty tracking before round 0, or say at once that it cannot."""

        if self.role is not Role.SOURCE or self.keys is None or self.dumped:
            raise ProtocolError("pre-copy needs a migration whose dump has not begun")
        if self.rounds_out is None:
            self.rounds_out = precopy.SourceRounds.arm(
                self.instance.memory, self.keys.streams, self._digest_key()
            )
        return {"pages": self.instance.memory.pages}

    def load_round(self) -> dict[str, Any]:
        """Destination: apply the next pre-copy round; nothing runs before the commit."""

        streams, ring = self._ready(Role.DESTINATION)
        if self.keys is None:
            raise ProtocolError("pre-copy needs a migration")
        if self.rounds_in is None:
            self.rounds_in = precopy_in.DestinationRounds(self.instance.memory, streams, ring)
            self.rounds_in.digest_key = self._digest_key()
        self.rounds_in.ring = ring
        return self.rounds_in.load_round()

    def precopy_active(self) -> bool:
        """True while rounds run and the final dump has not begun (a driver may go away)."""

        return (
            self.role is Role.SOURCE
            and not self.dumped
            and not self.dumping
            and not (self.rounds_out is not None and self.rounds_out.finalizing)
        )

    def _digest_key(self) -> bytes:
        if self.keys is None:
            raise ProtocolError("a live migration needs the handshake's keys")
        return digest_key(self.keys.stream_secret, self.keys.migration_id)

    def commit_in(self, token: bytes) -> dict[str, Any]:
        """Destination: the source's COMMIT token; claim the id, then run."""

        dc = self.dest_commit or self._arrived
        if dc is None:
            raise ProtocolError("no migration to commit")
        event = dc.receive(token)
        if isinstance(event, PeerAborted):
            self.abort("the source aborted")  # authentic: this copy is discarded
            raise MigrationError(f"the source aborted: {event.code}")
        if not isinstance(event, Committed):
            raise ReplayError("the commit token was not accepted")
        self._activate()
        return {"active": True}

    def _activate(self, *, also: list[tuple[str, RecordUpdate]] | None = None) -> None:
        """Destination, the id claimed: install the persistent state, import, run."""

        if not self._installed:
            self.persistent.install(self._pending_persistent, also=also or ())
        self._installed = False
        self._pending_persistent = None
        self.persistent.thaw()
        self.instance.import_small_state(self._pending_state)
        self.instance.resume()
        # Done: the enclave may migrate again, as a source, with fresh keys.
        self._arrived = self.dest_commit
        self._reset()

    # --- both -------------------------------------------------------------------------
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
        if ckpt is not None and ckpt.group:
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

    def _keep_abort(self, migration_id: bytes, frame: bytes) -> None:
        """Remember the ABORT of ``migration_id`` for :meth:`abort_frame` (bounded)."""

        self._aborted.pop(migration_id, None)
        self._aborted[migration_id] = frame
        while len(self._aborted) > ABORTS_KEPT:
            del self._aborted[next(iter(self._aborted))]

    def abort_frame(self, migration_id: bytes) -> bytes:
        """Source: the ABORT frame of ``migration_id`` again, which this enclave aborted.

        Whoever asked for the abort may have died holding the only frame (the
        tool, between its enclaves' aborts and telling the destination), and
        outside a migration group the store may hold no record of it (its
        platform service died too).  The frame is not secret; this returns the
        very one the abort sealed, so it is as authentic as it was then, and
        the destination judges it as any other.  The enclave decides what it
        answers, from its own trusted state: only a migration it aborted as its
        source (never one it committed: a committed enclave answers only the
        calls of section 2, and a migration's abort and commit exclude each
        other), never the one under way (``__mig_abort`` decides that one),
        never an id it does not know (it holds no keys to seal one with).
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

        Except in a migration group whose first decision was a COMMIT: then
        :class:`GroupDecidedError` goes up and nothing is aborted.  In a group
        the record is not best effort: the store's group rule is the only check
        that no other enclave of the migration committed, so an abort the store
        did not record raises :class:`GroupUncheckedError` and nothing is aborted.
        """

        assert self.source_commit is not None
        decision = Decision(self.source_commit.migration_id, "abort", frame, group=self.group)
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

    def status(self) -> dict[str, Any]:
        return {
            "role": self.role.value if self.role else None,
            "committed": self.committed,
            "handshake_done": self.keys is not None,
            # What a migration would move of enclave memory; the OS sees as much
            # (the pages it maps), and a destination uses it as a hint.
            "memory_used": self.instance.memory.used,
        }

    def persistent_status(self) -> dict[str, Any]:
        """Public facts of the persistent state: name, open, frozen, counter names."""

        return self.persistent.status()

    def _without_persistent(self) -> None:
        """A destination must not have a persistent state: it receives one."""

        if self.persistent.name is not None:
            raise ProtocolError(
                "an enclave that opened a persistent state cannot receive a migration"
            )

    # --- helpers ------------------------------------------------------------------------
    def _ready(self, role: Role) -> tuple[StreamChannel, ShmRing]:
        if self.role is not role:
            raise ProtocolError("the handshake has not completed")
        if self.keys is not None:
            streams = self.keys.streams
        elif self.checkpoint is not None:
            streams = self.checkpoint.streams
        else:
            raise ProtocolError("the handshake has not completed")
        if self.ring is None:
            raise ProtocolError("no ring was attached")
        return streams, self.ring

    def _source_commit(self) -> SourceCommit:
        if self.source_commit is None:
            raise ProtocolError("no migration to commit")
        return self.source_commit

    def _close_ring(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    def _reset(self) -> None:
        if self.rounds_out is not None:
            self.rounds_out.close()
        self.rounds_out = None
        self.rounds_in = None
        self._repair_pending = None
        self._close_ring()
        self.role = None
        self.handshake = None
        self.keys = None
        self.source_commit = None
        self.dest_commit = None
        self.checkpoint = None
        self.dumped = False
        self.dumping = False
        self._pending_state = None
        self._pending_persistent = None
        self.group = b""

    # --- checkpoints: a migration whose destination is a file ------------------------
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
        self.committed = True
        self.instance.retire("this enclave's state was checkpointed")
        self._exit_thread = threading.get_ident()

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


def _used_length(state: bytes) -> int:
    """The used memory the small state's layout declares (what the digest covers)."""

    try:
        brk = cbor2.loads(state)["memory"]["brk"]
    except Exception as exc:
        raise StreamError("the migrated small state does not decode") from exc
    if not isinstance(brk, int):
        raise StreamError("malformed memory layout")
    return brk


class _ClaimAndInstall:
    """The destination's seen-ids store, as its commit end uses it.

    Claiming the migration id installs the arriving persistent state in the
    same platform update (over the name reserved before LOADED): the id is
    taken exactly when the state is in place, and a crash between the two
    cannot leave an id claimed with its state nowhere.
    """

    def __init__(self, migrator: Migrator) -> None:
        self._migrator = migrator

    def migration_claimed(self, migration_id: bytes) -> bool:
        return self._migrator.instance.services.migration_claimed(migration_id)

    def claim_migration(self, migration_id: bytes) -> bool:
        m = self._migrator
        try:
            m.persistent.install(m._pending_persistent, claim=migration_id)
        except ClaimedBeforeError:
            return False
        m._installed = True
        return True


#: The longest a destination holds its handshake for its memory (the source still serves).
_PREFAULT_WAIT_MAX = 60.0

_CALLS: dict[str, Any] = {
    "__mig_out_start": Migrator.out_start,
    "__mig_in_start": Migrator.in_start,
    "__mig_hs": Migrator.hs,
    "__mig_dump": Migrator.dump,
    "__mig_track": Migrator.precopy_track,
    "__mig_round": Migrator.precopy_round,
    "__mig_load_round": Migrator.load_round,
    "__mig_repair": Migrator.precopy_repair,
    "__mig_load_repair": Migrator.load_repair,
    "__mig_loaded": Migrator.loaded,
    "__mig_commit": Migrator.commit,
    "__mig_load": Migrator.load,
    "__mig_prefault": Migrator.prefault,
    "__mig_prefault_wait": Migrator.prefault_wait,
    "__mig_commit_in": Migrator.commit_in,
    "__mig_abort": Migrator.abort,
    "__mig_abort_frame": Migrator.abort_frame,
    "__mig_group": Migrator.set_group,
    "__mig_status": Migrator.status,
    "__mig_token": Migrator.token,
    "__mig_release": Migrator.release,
    "__mig_redeliver_start": Migrator.redeliver_start,
    "__ckpt_out": Migrator.ckpt_out,
    "__ckpt_commit": Migrator.ckpt_commit,
    "__ckpt_in": Migrator.ckpt_in,
    "__ckpt_activate": Migrator.ckpt_activate,
    "__ps_status": Migrator.persistent_status,
}
RUNTIME_CALLS = frozenset(_CALLS) | {"__mig_ring", "__mig_side", "__mig_hold"}
#: What a committed source still answers: its token again, its release, and the
#: start of a re-delivery of its state (``docs/spec/commit.md``, section 2.1).
_AFTER_COMMIT = frozenset(
    {"__mig_status", "__mig_token", "__mig_release", "__mig_redeliver_start"}
)
#: What a committed source answers while it re-delivers its state.
_REDELIVERY = frozenset({"__mig_hs", "__mig_dump", "__mig_loaded", "__mig_commit"})
