"""The destination's side of a migration: the load from the ring, the run.

The start of a fresh enclave as a destination, its memory faulted in ahead,
the load (stop-and-copy or the final transfer after pre-copy rounds, with its
repair), and, on the source's COMMIT token, the claim of the migration id with
the persistent state installed, then the run.
"""

from __future__ import annotations

import time
from typing import Any

import cbor2

from ..core.commit import Committed
from ..core.handshake import PeerAborted, Role
from ..core.manifest import Manifest, Section
from ..core.stream import TAG_SIZE
from ..datapath.slots import SlotReader
from ..datapath.transport import context_switches
from ..errors import MigrationError, ProtocolError, ReplayError, StreamError
from ..sgx.store_types import RecordUpdate
from . import precopy_in
from .migrator_rounds import _Rounds
from .migrator_state import MANIFEST_ROOM, MAX_STATE_BYTES, RING_TIMEOUT, SECTIONS
from .persistent_format import MAX_TRANSFER_BYTES


def _used_length(state: bytes) -> int:
    """The used memory the small state's layout declares (what the digest covers)."""

    try:
        brk = cbor2.loads(state)["memory"]["brk"]
    except Exception as exc:
        raise StreamError("the migrated small state does not decode") from exc
    if not isinstance(brk, int):
        raise StreamError("malformed memory layout")
    return brk


#: The longest a destination holds its handshake for its memory (the source still serves).
_PREFAULT_WAIT_MAX = 60.0


class _DestinationSide(_Rounds):
    """A migration's destination: nothing runs before the source's COMMIT."""

    #: Whether the memory a stop-and-copy load writes is advised for huge pages
    #: (``__mig_in_start``'s argument; a checkpoint's restore keeps this default:
    #: off, measured slower on these VMs, ``docs/benchmarks.md``).
    huge_pages: bool = False

    def in_start(self, huge_pages: bool = False) -> None:
        """Destination: expect a migration; no ECALL runs until it completes.

        ``huge_pages``: the host's choice (its agent's ``--enclave-huge-pages``
        says True) whether the memory that arrives is backed by 2 MiB pages
        where the kernel gives them (``docs/architecture.md``, enclave memory).
        """

        if not isinstance(huge_pages, bool):
            raise ProtocolError("__mig_in_start: huge_pages is true or false")
        if self.instance.calls_served:
            raise ProtocolError("only a freshly launched enclave can receive a migration")
        self.huge_pages = huge_pages
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
        if self.huge_pages:
            self.instance.memory.advise_huge(nbytes)  # (before the first fault)
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
        if self.huge_pages:
            # 2 MiB pages for the memory about to arrive: a fault per 2 MiB, not per 4 KiB.
            memory.advise_huge(memory_section.length)
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
        self._pending_persistent = self.persistent.prepare_import(bytes(persistent_buf), arrival)
        # A live migration confirms to the source; a checkpoint restore has no peer.
        loaded = dc.loaded() if dc is not None else b""
        t_end = time.monotonic()
        return {
            "loaded": loaded,
            "bytes": reader.received,
            "memory_bytes": memory_section.length,
            # Faulted in before the load by __mig_prefault (0 without a hint).
            "prefaulted_bytes": faulted_ahead,
            # Advised for 2 MiB pages (0: not asked, or a kernel without them).
            "huge_advised_bytes": memory.huge_advised,
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
