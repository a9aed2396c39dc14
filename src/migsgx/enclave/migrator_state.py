"""What one enclave's migration holds, and the steps every migration shares.

The base of :class:`~.migrator.Migrator`: its attributes (one migration at a
time), the attestation of both ends, the handshake, the ring's hand-over, the
status calls and the reset.  The source's decision (:mod:`.migrator_decision`),
the source's side (:mod:`.migrator_source`), the pre-copy rounds
(:mod:`.migrator_rounds`), the destination's side (:mod:`.migrator_destination`)
and the checkpoints (:mod:`.migrator_checkpoints`) are layers over it, each a
subclass of the one before, and
:mod:`.migrator` adds the dispatch of the runtime calls.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from ..core.commit import DestinationCommit, SourceCommit
from ..core.handshake import Handshake, HandshakeComplete, PeerAborted, Role, SessionKeys
from ..core.policy import MigrationPolicy, PolicyMode
from ..core.rounds import digest_key
from ..core.stream_channel import StreamChannel
from ..datapath.ring import ShmRing
from ..datapath.ring_handover import recv_ring_fds
from ..datapath.ring_spec import RingRole
from ..errors import ClaimedBeforeError, MigrationError, ProtocolError
from ..limits import MIN_CHUNK_SIZE
from ..sgx.collateral import Collateral
from ..sgx.dcap import TcbPolicy, verify_dcap
from ..sgx.structs import ReportBody
from . import checkpoints, precopy, precopy_in
from .instance import EnclaveInstance
from .persistent import PersistentState
from .persistent_format import PendingImport

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


def policy_of(instance: EnclaveInstance) -> MigrationPolicy:
    m = instance.manifest
    return MigrationPolicy(mode=PolicyMode(m.migration_policy), allow_debug=m.debug)


class _MigratorState:
    """One enclave's migration state, and the steps both ends share."""

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

    def attach_ring(self, sock: socket.socket) -> None:
        """Receive the ring's descriptors that follow the ``__mig_ring`` frame."""

        if self.role is None:
            raise ProtocolError("no migration in progress")
        if self.ring is not None:
            self.ring.close()
        role = RingRole.PRODUCER if self.role is Role.SOURCE else RingRole.CONSUMER
        self.ring = recv_ring_fds(sock, role, timeout=10.0)

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
                self.source_commit = SourceCommit(self.keys, after_commit=self.redelivering)
            else:
                self.dest_commit = DestinationCommit(self.keys, seen=_ClaimAndInstall(self))
        peer = hs.peer
        return {
            "send": out,
            "done": self.keys is not None,
            "peer_mr_enclave": peer.mr_enclave if peer else None,
            "migration_id": hs.migration_id,
        }

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

    def _digest_key(self) -> bytes:
        if self.keys is None:
            raise ProtocolError("a live migration needs the handshake's keys")
        return digest_key(self.keys.stream_secret, self.keys.migration_id)


class _ClaimAndInstall:
    """The destination's seen-ids store, as its commit end uses it.

    Claiming the migration id installs the arriving persistent state in the
    same platform update (over the name reserved before LOADED): the id is
    taken exactly when the state is in place, and a crash between the two
    cannot leave an id claimed with its state nowhere.
    """

    def __init__(self, migrator: _MigratorState) -> None:
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
