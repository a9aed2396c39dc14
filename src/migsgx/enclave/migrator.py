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

The trusted half is a stack of layers, one job each: the shared state and the
handshake (:mod:`.migrator_state`), the source's decision (its COMMIT, the
token again, the release, the re-delivery, and the reading of a decision whose
answer was lost: :mod:`.migrator_decision`), the source (:mod:`.migrator_source`), the
pre-copy rounds (:mod:`.migrator_rounds`), the destination
(:mod:`.migrator_destination`) and the checkpoints
(:mod:`.migrator_checkpoints`), the refusal of a migration id and the
revocation of a commit it proves (:mod:`.migrator_refusal`); :class:`Migrator`
here adds the dispatch of the runtime calls.
"""

from __future__ import annotations

from typing import Any

from ..errors import CommittedError, MigrationError, ProtocolError
from .migrator_refusal import _Refusals
from .migrator_state import (
    ABORTS_KEPT,
    MANIFEST_ROOM,
    MAX_STATE_BYTES,
    MIN_CHUNK,
    RING_TIMEOUT,
    SECTIONS,
    policy_of,
)

__all__ = [
    "ABORTS_KEPT",
    "MANIFEST_ROOM",
    "MAX_STATE_BYTES",
    "MIN_CHUNK",
    "RING_TIMEOUT",
    "RUNTIME_CALLS",
    "SECTIONS",
    "Migrator",
    "policy_of",
]


class Migrator(_Refusals):
    """One enclave's migration state; at most one migration at a time."""

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
    "__mig_refuse": Migrator.refuse,
    "__mig_refused": Migrator.refused,
    "__ckpt_out": Migrator.ckpt_out,
    "__ckpt_commit": Migrator.ckpt_commit,
    "__ckpt_in": Migrator.ckpt_in,
    "__ckpt_activate": Migrator.ckpt_activate,
    "__ps_status": Migrator.persistent_status,
}
RUNTIME_CALLS = frozenset(_CALLS) | {
    "__mig_ring",
    "__mig_side",
    "__mig_hold",
    "__mig_held",
    "__mig_unhold",
    "__mig_watch",
}
#: What a committed source still answers: its token again, its release, and the
#: start of a re-delivery of its state (``docs/spec/commit.md``, section 2.1).
_AFTER_COMMIT = frozenset({"__mig_status", "__mig_token", "__mig_release", "__mig_redeliver_start"})
#: What a committed source answers while it re-delivers its state.
_REDELIVERY = frozenset({"__mig_hs", "__mig_dump", "__mig_loaded", "__mig_commit", "__mig_refused"})
