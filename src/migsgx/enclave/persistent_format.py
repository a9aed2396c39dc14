"""The persistent state's formats: the sealed record, the section, the reservation.

What an enclave's persistent record holds (``docs/spec/persistent.md``,
section 4), what a migration carries of it (the ``persistent`` section,
section 6.2) and the record that holds a name for an arrival: built and
checked here, apart from the record's life on a host
(:mod:`migsgx.enclave.persistent_record`), so that the format's vectors run
the very code an enclave runs, and so that the destination agent can release
a reservation without the enclave's state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import cbor2

from ..errors import PersistentStateError, SealError
from ..sgx.store_types import COUNTER_MAX, RECORD_NAME, RecordUpdate
from ..sgx.trusted import TrustedServices
from . import sealing

RECORD_AAD = b"migsgx persistent record v1 "
#: The record that holds a name for a migration arriving here (before LOADED):
#: this prefix, then CBOR [arrival id, reservation counter id].
RESERVED = b"migsgx persistent reservation v1 "
MAX_MCOUNTERS = 64
MAX_KEY_GENERATIONS = 4096
MAX_TRANSFER_BYTES = 1 << 20


def _valid_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not RECORD_NAME.fullmatch(name):
        raise ValueError(f"{what} is 1 to 64 characters of A-Z a-z 0-9 . _ -")
    return name


@dataclass
class PendingImport:
    """A migrated persistent state, verified and waiting for the commit."""

    name: str
    record_id: bytes
    keys: list[bytes]
    values: dict[str, int]
    retiring: bytes  # SHA-256 of the record the source retires at its commit
    #: The counter that holds the name reserved here until the install (None when
    #: the name is held by the very record the source retires: the same host).
    reservation: str | None = None
    arrival: bytes = b""  # the migration or checkpoint id the reservation is for


def reservation_release(blob: bytes) -> tuple[bytes, RecordUpdate] | None:
    """For a reservation record: its arrival id and the update that releases it.

    The update removes the record and its counter only if both are still what
    the reservation made (unused, unchanged).  None for any other record.  Who
    applies it must know that no live enclave of the host still holds that
    arrival loaded (the destination agent: none of its sessions does).
    """

    held = _reservation_of(blob)
    if held is None:
        return None
    arrival, counter = held
    update = RecordUpdate(None, destroy=(counter,), check={counter: 0}, expect=_digest(blob))
    return arrival, update


def _reservation_blob(arrival: bytes, counter: str) -> bytes:
    return RESERVED + bytes(cbor2.dumps([bytes(arrival), counter]))


def _reservation_of(blob: bytes | None) -> tuple[bytes, str] | None:
    """(arrival id, counter id) of a reservation record; None for anything else."""

    if blob is None or not blob.startswith(RESERVED):
        return None
    try:
        arrival, counter = cbor2.loads(blob[len(RESERVED) :])
    except (ValueError, TypeError, cbor2.CBORDecodeError):
        return None
    if not isinstance(arrival, bytes) or not isinstance(counter, str):
        return None
    return arrival, counter


def open_record(services: TrustedServices, name: str, blob: bytes) -> dict[str, Any]:
    """Unseal and check the record ``name`` (section 4 of the spec); no epoch check here.

    Public so that the format's vectors run the very code an enclave runs.
    """

    try:
        plaintext = sealing.unseal(services, blob, aad=RECORD_AAD + name.encode())
        return _parse_record(plaintext, name)
    except SealError as exc:
        raise PersistentStateError(
            f"the persistent record {name!r} on this host does not open for this enclave"
        ) from exc


def parse_section(section: bytes) -> PendingImport | None:
    """A migrated ``persistent`` section (section 6.2 of the spec); None when it is empty."""

    try:
        data = cbor2.loads(section)
    except Exception as exc:
        raise PersistentStateError("the migrated persistent state does not decode") from exc
    if data is None:
        return None
    return _parse_transfer(data)


def _parse_record(plaintext: bytes, name: str) -> dict[str, Any]:
    try:
        rec = cbor2.loads(plaintext)
    except Exception as exc:
        raise SealError("the persistent record is malformed") from exc
    ok = (
        isinstance(rec, dict)
        and rec.get("v") == 1
        and rec.get("name") == name
        and _is_bytes(rec.get("rid"), 16)
        and _are_keys(rec.get("keys"))
        and isinstance(rec.get("epoch"), list)
        and len(rec["epoch"]) == 2
        and isinstance(rec["epoch"][0], str)
        and _is_uint(rec["epoch"][1])
        and isinstance(rec.get("counters"), dict)
        and all(
            isinstance(n, str)
            and isinstance(c, list)
            and len(c) == 2
            and isinstance(c[0], str)
            and _is_uint(c[1])
            for n, c in rec["counters"].items()
        )
    )
    if not ok:
        raise SealError("the persistent record is malformed")
    return rec  # type: ignore[no-any-return]


def _parse_transfer(data: Any) -> PendingImport:
    ok = (
        isinstance(data, dict)
        and set(data) == {"v", "name", "rid", "keys", "counters", "retiring"}
        and data["v"] == 1
        and isinstance(data["name"], str)
        and RECORD_NAME.fullmatch(data["name"]) is not None
        and _is_bytes(data["rid"], 16)
        and _are_keys(data["keys"])
        and _is_bytes(data["retiring"], 32)
        and isinstance(data["counters"], dict)
        and len(data["counters"]) <= MAX_MCOUNTERS
        and all(
            isinstance(n, str) and RECORD_NAME.fullmatch(n) is not None and _is_uint(v)
            for n, v in data["counters"].items()
        )
    )
    if not ok:
        raise PersistentStateError("the migrated persistent state is malformed")
    return PendingImport(
        data["name"], data["rid"], list(data["keys"]), dict(data["counters"]), data["retiring"]
    )


def _is_bytes(value: Any, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def _are_keys(value: Any) -> bool:
    return (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_KEY_GENERATIONS
        and all(_is_bytes(k, 32) for k in value)
    )


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNTER_MAX


def _digest(record: bytes) -> bytes | None:
    """What a record update compares and sets against: the record it replaces."""

    return hashlib.sha256(record).digest() if record else None
