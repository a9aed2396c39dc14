"""``migsgx inspect`` over forged checkpoints: an ``InspectError``, never a trip.

``inspect`` is meant for checkpoints one does not trust: every CRIU image
entry, every JSON member and every enclave file it reads may be anything.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from platform_fixtures import image_files

from migsgx.criu.images import command_of, process_tree
from migsgx.errors import InspectError
from migsgx.inspection import inspect_path
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.platform import COUNTERS

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True)
# A real CRIU 4.2 pstree.img (one task, pid 1) and a core image naming "python3".
PSTREE = bytes.fromhex("19435654303027500a00000008011000180120012801")
_TC = b"\x32\x07python3"
CORE = (
    struct.pack("<II", 0x54564319, 0x55053847)
    + struct.pack("<I", 4 + len(_TC))
    + b"\x08\x01\x1a"
    + bytes([len(_TC)])
    + _TC
)


def _flipped(data: bytes, bits: list[int]) -> bytes:
    raw = bytearray(data)
    for bit in bits:
        raw[bit % (len(raw) * 8) // 8] ^= 1 << (bit % 8)
    return bytes(raw)


@FUZZ
@given(
    data=st.one_of(
        st.lists(st.integers(0, 10_000), min_size=1, max_size=3).map(lambda b: _flipped(PSTREE, b)),
        st.integers(0, len(PSTREE)).map(lambda n: PSTREE[:n]),
        st.binary(max_size=64).map(lambda b: PSTREE[:8] + b),
    )
)
def test_a_damaged_process_tree_image_is_an_inspect_error(data: bytes) -> None:
    try:
        tree = process_tree(data)
    except InspectError:
        return
    assert tree and all(isinstance(p["pid"], int) for p in tree)


@FUZZ
@given(
    data=st.one_of(
        st.lists(st.integers(0, 10_000), min_size=1, max_size=3).map(lambda b: _flipped(CORE, b)),
        st.integers(0, len(CORE)).map(lambda n: CORE[:n]),
        st.binary(max_size=64).map(lambda b: CORE[:8] + b),
    )
)
def test_a_damaged_core_image_is_an_inspect_error(data: bytes) -> None:
    try:
        assert isinstance(command_of(data, "core-1.img"), str)
    except InspectError:
        pass


def _checkpoint(root: Path, checkpoint_id: object) -> Path:
    root.mkdir()
    (root / "pstree.img").write_bytes(PSTREE)
    (root / "core-1.img").write_bytes(CORE)
    (root / "migsgx.json").write_text(json.dumps({"format": 1, "enclaves": 1}))
    (root / "enclave-0.json").write_text(json.dumps({"checkpoint_id": checkpoint_id}))
    (root / "enclave-0.image").write_bytes(cbor2.dumps(image_files()))
    (root / "enclave-0.key").write_bytes(b"MSXSEAL1" + bytes(40))
    (root / "enclave-0.state").write_bytes(struct.pack(">IB", 4, 1) + b"seal")  # one final frame
    return root


def _state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    CounterStore(state / COUNTERS)  # an empty record store: nothing claimed
    return state


@pytest.mark.parametrize("checkpoint_id", ["zz-not-hex", "abc", ["00"], {"x": 1}])
def test_a_forged_checkpoint_id_is_an_inspect_error(tmp_path: Path, checkpoint_id: object) -> None:
    state = _state(tmp_path)
    with pytest.raises(InspectError, match="checkpoint id"):
        inspect_path(_checkpoint(tmp_path / "ck", checkpoint_id), state=state)


def test_a_hex_checkpoint_id_is_read(tmp_path: Path) -> None:
    state = _state(tmp_path)
    report = inspect_path(_checkpoint(tmp_path / "ck", "00" * 16), state=state)
    assert report["enclaves"][0]["checkpoint_id"] == "00" * 16
