"""Garbage fed to every message parser a peer or a local process reaches: only typed errors.

The agents' control messages (``begin`` with ``ports``/``spec``, ``redeliver``,
``deliver``), what ``begin`` announces (listeners, a pod's address), the
platform channel's record updates, the migrated persistent-state section and
memory allocation records, the data connection's hello.  Each property starts
from a message the code accepts and damages it (truncated, bit-flipped,
wrong-typed, oversized, random); what comes out is a parsed value or a
:class:`MigSGXError`, never another exception.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

import cbor2
from fuzz_damage import damaged_encoding, nested
from hypothesis import given, settings
from hypothesis import strategies as st
from platform_fixtures import image_files

from migsgx.agent.datalink import HELLO_SIZE, DestinationLink
from migsgx.agent.protocol import CONTROL
from migsgx.agent.redeliver import HeldEnclave
from migsgx.containers.podnet import PodAddress
from migsgx.enclave.memory import Allocation
from migsgx.enclave.persistent_format import parse_section
from migsgx.errors import MigSGXError
from migsgx.host.appctl import info_to_wire
from migsgx.host.client import EnclaveInfo
from migsgx.sgx.image import MANIFEST, EnclaveImage
from migsgx.sgx.store_types import RecordUpdate
from migsgx.system.ports import Listener
from migsgx.wire import decode_body

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=24)
)
VALUES = nested(SCALARS, keys=st.text(max_size=8) | st.integers(-3, 3))

BEGIN = {
    "t": "begin",
    "session_id": bytes(16),
    "enclaves": [{"info": bytes(8)}],
    "pids": [100, 101],
    "pidns": False,
    "tcp_close": False,
    "page_tls": True,
    "driver": "pid",
    "target": {"pid": 100},
    "ports": [{"proto": "tcp", "address": "0.0.0.0", "port": 8080}],
    "spec": {"ociVersion": "1.0.2", "process": {"args": ["/bin/app"]}},
}
REDELIVER = {"t": "redeliver", "index": 0, "session_id": bytes(16)}
DELIVER = {
    "t": "deliver",
    "session_id": bytes(16),
    "frames": [b"token"],
    "enclave_mids": [bytes(16)],
}


def damaged_cbor(valid: dict[Any, Any]) -> st.SearchStrategy[bytes]:
    """``valid`` as CBOR, damaged in the ways a network, a disk or a peer does."""

    return damaged_encoding(
        valid, lambda value: bytes(cbor2.dumps(value)), VALUES,
        extra_keys=st.text(max_size=8), max_bytes=300,
    )  # fmt: skip


def _typed(parse: Callable[[], object]) -> object:
    try:
        return parse()
    except MigSGXError as exc:
        assert exc.code and str(exc)
        return exc


@FUZZ
@given(body=st.one_of(damaged_cbor(BEGIN), damaged_cbor(REDELIVER), damaged_cbor(DELIVER)))
def test_control_messages_decode_or_raise_frame_errors(body: bytes) -> None:
    msg = _typed(lambda: decode_body(body, CONTROL))
    if isinstance(msg, MigSGXError):
        assert msg.code == "frame"
        return
    assert isinstance(msg, dict) and msg["t"] in CONTROL.messages
    if msg["t"] == "begin":
        # What ``begin`` announces is parsed again by the destination (agent.preflight).
        for item in msg.get("ports") or []:
            _typed(lambda item=item: Listener.from_peer(item))


@FUZZ
@given(value=st.one_of(VALUES, st.fixed_dictionaries(
    {"proto": st.sampled_from(["tcp", "udp"]) | VALUES, "address": st.text(max_size=80) | VALUES,
     "port": st.integers(-5, 70000) | VALUES})))  # fmt: skip
def test_announced_listeners_parse_or_raise_protocol_errors(value: object) -> None:
    found = _typed(lambda: Listener.from_peer(value))
    assert isinstance(found, Listener) or found.code == "protocol"  # type: ignore[attr-defined]


@FUZZ
@given(value=st.one_of(VALUES, st.fixed_dictionaries(
    {"address": st.text(max_size=40) | VALUES, "mac": st.text(max_size=20) | VALUES})))  # fmt: skip
def test_announced_pod_addresses_parse_or_raise_container_errors(value: object) -> None:
    _typed(lambda: PodAddress.from_peer(value))


@FUZZ
@given(msg=st.dictionaries(
    st.sampled_from(["destroy", "record", "expect", "create", "advance", "check", "absent"]),
    VALUES, max_size=7))  # fmt: skip
def test_record_updates_from_the_platform_channel_raise_counter_errors(msg: dict[str, Any]) -> None:
    _typed(lambda: RecordUpdate.from_wire(msg))


_SECTION = {
    "v": 1,
    "name": "db",
    "rid": bytes(16),
    "keys": [bytes(32)],
    "counters": {"c": ["id", 3]},
    "retiring": bytes(32),
}


@FUZZ
@given(
    section=st.one_of(damaged_cbor(_SECTION), st.just(cbor2.dumps(None)), st.binary(max_size=64))
)
def test_a_migrated_persistent_section_parses_or_raises_persistent_errors(section: bytes) -> None:
    _typed(lambda: parse_section(section))


@FUZZ
@given(item=st.one_of(VALUES, st.lists(VALUES, min_size=4, max_size=4)))
def test_allocation_records_parse_or_raise_memory_errors(item: object) -> None:
    _typed(lambda: Allocation.from_wire(item))


@FUZZ
@given(
    record=st.one_of(
        st.binary(max_size=HELLO_SIZE + 8), st.binary(min_size=HELLO_SIZE, max_size=HELLO_SIZE)
    )
)
def test_a_forged_data_hello_is_one_opaque_error(record: bytes) -> None:
    key, mid = os.urandom(32), os.urandom(16)
    dest = DestinationLink(key, mid)
    found = _typed(lambda: dest.receive_hello(record))
    assert isinstance(found, MigSGXError) and found.code == "data-link"


# --- the guardian's pipe: an enclave note, possibly cut where the tool died -----------------------
_INFO = EnclaveInfo(
    pid=7, mr_enclave=bytes(range(32)), mr_signer=bytes(32), isv_prod_id=1, isv_svn=2,
    debug=True, memory_size=1 << 20, thread_slots=2, ecalls=("put", "get"),
)  # fmt: skip
_NOTE = {"info": info_to_wire(_INFO), "image_files": {"app.so": b"\x7fELF"}, "mode": "pipelined"}


@FUZZ
@given(
    payload=st.one_of(
        damaged_cbor(_NOTE).map(bytes.hex),
        st.builds(lambda n: cbor2.dumps(_NOTE).hex()[:n], st.integers(0, 400)),  # cut short
        st.text(max_size=80),
    )
)
def test_a_damaged_enclave_note_is_a_protocol_error(payload: str) -> None:
    left, right = socket.socketpair()
    try:
        found = _typed(lambda: HeldEnclave.parse(left, payload))
        assert isinstance(found, HeldEnclave) or found.code == "protocol"  # type: ignore[attr-defined]
    finally:
        left.close()
        right.close()


def test_the_enclave_note_the_tool_writes_parses() -> None:
    left, right = socket.socketpair()
    with left, right:
        held = HeldEnclave(left, _INFO, {"app.so": b"\x7fELF"})
        assert HeldEnclave.parse(left, held.describe()).info == _INFO


# --- an enclave image as a peer sends it, or a checkpoint holds it --------------------------------
_IMAGE = image_files()
_MANIFEST_LINES = _IMAGE[MANIFEST].decode().splitlines()
TOML_VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=12).map(lambda t: json.dumps(t)),
    st.sampled_from(["true", "[1, 2]", "{a = 1}", '"0MiB"', '"-1GiB"', '"9999999999TiB"',
                     "inf", "nan", "1e400", "[" * 3000 + "]" * 3000, '"1.5MiB"']),
)  # fmt: skip


@st.composite
def damaged_image(draw: st.DrawFn) -> dict[Any, Any]:
    files: dict[Any, Any] = dict(_IMAGE)
    how = draw(st.sampled_from(["line", "bytes", "key", "content", "drop"]))
    if how == "line":  # one manifest field gets another value
        i = draw(st.integers(1, len(_MANIFEST_LINES) - 1))
        lines = list(_MANIFEST_LINES)
        lines[i] = lines[i].split("=")[0] + "= " + draw(TOML_VALUES)
        files[MANIFEST] = "\n".join(lines).encode()
    elif how == "bytes":
        files[MANIFEST] = draw(st.binary(max_size=200))
    elif how == "key":
        files[draw(st.one_of(st.integers(), st.binary(max_size=8), st.text(max_size=12)))] = b"x"
    elif how == "content":
        files[draw(st.sampled_from(sorted(_IMAGE)))] = draw(VALUES)
    else:
        del files[draw(st.sampled_from(sorted(_IMAGE)))]
    return files


@FUZZ
@given(files=damaged_image())
def test_a_damaged_enclave_image_is_an_image_error(files: dict[Any, Any]) -> None:
    found = _typed(lambda: EnclaveImage.from_files(files))
    if isinstance(found, EnclaveImage):
        found.measure()
    else:
        assert found.code == "image"  # type: ignore[attr-defined]
