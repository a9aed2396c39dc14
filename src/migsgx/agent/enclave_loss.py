"""Source enclaves that died before the decision: which ones, and how it is said.

An enclave process that ended before any enclave of its migration (or
checkpoint) decided COMMIT took its state with it, as a crash of that enclave
outside a migration would: no copy exists anywhere (the destination's loaded
copy needs a token only the dead enclave could have made), and nothing can
bring it back.  The move did not happen and the source application runs on,
without that enclave's state; its other enclaves went back to it with every
write.  ``migsgx migrate`` and ``migsgx checkpoint`` say so with a status of
their own (11, ``source-enclave-lost``), naming each lost enclave by its index,
MRENCLAVE, process and migration id; ``migsgx recover --json`` names those a
guardian, ``recover`` or the tool found dead in the same form
(``lost_enclaves``), from the journal's ``source_lost``.

A dead enclave counts as lost only where it cannot have committed: it was
never sent ``__mig_commit`` (alive when asked, or dead before), or its host's
platform store, read once its process ended, records no COMMIT of its
migration id.  That reading is final: the platform service refuses, under the
store's lock, any request of an enclave whose channel hung up, and the reader
takes the same lock after every thread of the enclave ended (so its channel
had hung up); a COMMIT whose write began before is there, one that had not
begun never will be (``docs/spec/commit.md``, section 5).  One that did
commit is the in-doubt path's business, never this.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2

from .. import _proc
from ..errors import MigSGXError, SourceEnclaveLostError

__all__ = [
    "LostEnclave", "committed_in_store", "dead", "ended", "lost_error", "lost_in_journal",
    "wait_ended",
]  # fmt: skip

#: How long a reader waits for a dying enclave's last thread to end (it takes
#: milliseconds: its connection closed as its files did).
END_WAIT = 5.0


if TYPE_CHECKING:
    from ..host.client import EnclaveInfo


@dataclass(frozen=True)
class LostEnclave:
    """One source enclave whose state died with its process (nothing secret in it)."""

    index: int
    mr_enclave: str  # hex
    pid: int
    migration_id: str = ""  # hex; "" before its handshake, and for a checkpoint

    @classmethod
    def of(cls, index: int, info: EnclaveInfo, migration_id: bytes | None = None) -> LostEnclave:
        return cls(index, bytes(info.mr_enclave).hex(), int(info.pid),
                   (migration_id or b"").hex())  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        mid = f", migration id {self.migration_id}" if self.migration_id else ""
        return f"enclave {self.index} (MRENCLAVE {self.mr_enclave}, pid {self.pid}{mid})"


def lost_error(
    lost: Sequence[LostEnclave], what: str, cause: BaseException | None = None
) -> SourceEnclaveLostError:
    """The error ``what`` (``the migration``, ``the checkpoint``) ends with: status 11."""

    names = "; ".join(map(str, lost))
    its = "its state is" if len(lost) == 1 else "their states are"
    why = f" (first failure: {type(cause).__name__}: {cause})" if cause is not None else ""
    return SourceEnclaveLostError(
        f"{what} did not happen and the source application runs on, but {names} died "
        f"before the decision: {its} gone, as after a crash of the enclave, and nothing "
        f"can bring it back{why}"[:2000],
        lost=[e.to_dict() for e in lost],
    )


def dead(pid: int) -> bool:
    """Whether the enclave process ``pid`` has ended (a zombie has)."""

    return not _proc.alive(pid)


def ended(pid: int) -> bool:
    """Whether every thread of the process ``pid`` is past its exit (so every file it
    held is closed): gone, or a zombie whose other threads ended too.

    A zombie is not enough: its first thread may have exited while others still
    run and hold its files (the platform channel among them).
    """

    fields = _proc.stat(pid)
    if fields is None:
        return True
    if fields[_proc.STATE] not in ("Z", "X"):
        return False
    try:
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True


def wait_ended(pid: int, timeout: float = END_WAIT) -> bool:
    """Wait (polled) until :func:`ended`; whether it did within ``timeout``."""

    deadline = time.monotonic() + timeout
    while not ended(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def committed_in_store(
    platform_state: Path, migration_id: bytes, pid: int | None = None
) -> bool | None:
    """Whether this host's platform store records a COMMIT of ``migration_id``;
    None when the store cannot be read (read from its file: the service need not run).

    Read under the store's lock, as the platform service writes.  ``pid``: the
    enclave process that may have sent it, which died: read only once every
    thread of it ended (None if it does not within :data:`END_WAIT`), so that
    its platform channel had hung up and the answer is final (a decision it
    sent whose write had not begun is refused for good).
    """

    from ..sgx.counters import COUNTERS, CounterStore  # (only once an enclave died)

    if pid is not None and not wait_ended(pid):
        return None
    try:
        decision = CounterStore(platform_state / COUNTERS).decision(migration_id)
    except (MigSGXError, OSError, ValueError):
        return None
    return decision is not None and decision.kind in ("commit", "revoked")


def lost_in_journal(data: Mapping[str, Any]) -> list[LostEnclave]:
    """The journal's ``source_lost`` indices, named from its ``enclaves`` notes."""

    indices = [i for i in data.get("source_lost") or [] if isinstance(i, int) and i >= 0]
    notes = list(data.get("enclaves") or [])
    mids = list(data.get("enclave_mids") or [])
    found = []
    for index in sorted(set(indices)):
        mr, pid = "", 0
        if index < len(notes):
            with contextlib.suppress(ValueError, TypeError, KeyError, cbor2.CBORDecodeError):
                info = cbor2.loads(bytes.fromhex(str(notes[index])))["info"]
                mr, pid = bytes(info["mr_enclave"]).hex(), int(info["pid"])
        mid = str(mids[index]) if index < len(mids) and isinstance(mids[index], str) else ""
        found.append(LostEnclave(index, mr, pid, mid))
    return found
