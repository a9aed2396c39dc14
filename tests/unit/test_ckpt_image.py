"""A checkpoint's enclave image is launched only as the checkpoint recorded it.

:func:`migsgx.datapath.ckpt_image.checked_image` is the one check every launch
from a checkpoint directory goes through (restore, ``recover --checkpoint``'s
gate reads, the checkpoint tool's): fed garbage (a record of any shape, an image
file truncated, longer, with a byte flipped, another enclave's), it answers a
:class:`CheckpointDamagedError` naming the file and what differs, and nothing
else; and :class:`CheckpointIn` asks the platform for nothing before it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from platform_fixtures import image_files

from migsgx.datapath import checkpoint as datapath_checkpoint
from migsgx.datapath.checkpoint import CheckpointIn
from migsgx.datapath.ckpt_image import (
    MAX_IMAGE_FILE,
    checked_image,
    image_digest,
    image_name,
    recorded_digest,
)
from migsgx.errors import CheckpointDamagedError
from migsgx.sgx.image import EnclaveImage

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

#: What a JSON file may hold (and a bit more: what a careless caller might pass).
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4)
    ),
    max_leaves=12,
)

NAME = image_name(0)


def _image_bytes() -> bytes:
    return bytes(cbor2.dumps(image_files()))


def _write(directory: Path, data: bytes) -> Path:
    path = directory / NAME
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


def _damaged(call: Any) -> CheckpointDamagedError:
    """``call`` raises a :class:`CheckpointDamagedError` (and nothing else)."""

    with pytest.raises(CheckpointDamagedError) as caught:
        call()
    return caught.value


# --- the record's parser ----------------------------------------------------------------------
@FUZZ
@given(files=JSONISH)
def test_a_record_of_any_shape_is_refused_or_well_formed(files: object) -> None:
    try:
        size, digest = recorded_digest(files, NAME)
    except CheckpointDamagedError as exc:
        assert NAME in str(exc) and "nothing was launched" in str(exc)
    else:
        assert type(size) is int and 0 <= size <= MAX_IMAGE_FILE
        assert len(digest) == 64 and int(digest, 16) >= 0


@FUZZ
@given(
    entry=st.one_of(
        st.tuples(st.booleans(), st.just("0" * 64)).map(list),  # a bool is no size
        st.tuples(st.floats(), st.just("0" * 64)).map(list),
        st.tuples(st.text(max_size=8), st.just("0" * 64)).map(list),
        st.tuples(st.integers(max_value=-1), st.just("0" * 64)).map(list),
        st.tuples(st.integers(min_value=MAX_IMAGE_FILE + 1), st.just("0" * 64)).map(list),
        st.tuples(st.just(10), st.text(max_size=70).filter(lambda t: len(t) != 64)).map(list),
        st.tuples(st.just(10), st.just("A" * 64)).map(list),  # upper case: not as written
        st.tuples(st.just(10), st.binary(min_size=32, max_size=32)).map(list),
        st.lists(st.integers(0, 10), max_size=5).filter(lambda v: len(v) != 2),
        st.tuples(st.just(10), st.just("0" * 64)),  # a tuple: JSON gives lists only
    )
)
def test_wrong_types_in_the_record_are_refused(entry: object) -> None:
    _damaged(lambda: recorded_digest({NAME: entry}, NAME))


# --- the image file against its record ------------------------------------------------------------
def test_the_recorded_image_is_the_one_launched(tmp_path: Path) -> None:
    data = _image_bytes()
    _write(tmp_path, data)
    image = checked_image(tmp_path, 0, {NAME: image_digest(data)})
    assert image.measure() == EnclaveImage.from_files(image_files()).measure()


@FUZZ
@given(data=st.data())
def test_a_truncated_image_is_refused(tmp_path: Path, data: st.DataObject) -> None:
    full = _image_bytes()
    cut = data.draw(st.integers(0, len(full) - 1))
    path = _write(tmp_path, full[:cut])
    found = _damaged(lambda: checked_image(tmp_path, 0, {NAME: image_digest(full)}))
    assert str(path) in str(found)
    assert f"{cut} bytes where the checkpoint records {len(full)}" in str(found)


@FUZZ
@given(extra=st.binary(min_size=1, max_size=4096))
def test_an_oversized_image_is_refused_reading_one_byte_more(tmp_path: Path, extra: bytes) -> None:
    full = _image_bytes()
    _write(tmp_path, full + extra)
    found = _damaged(lambda: checked_image(tmp_path, 0, {NAME: image_digest(full)}))
    assert f"more than {len(full)} bytes where the checkpoint records {len(full)}" in str(found)


@FUZZ
@given(data=st.data())
def test_one_flipped_bit_anywhere_is_refused(tmp_path: Path, data: st.DataObject) -> None:
    full = _image_bytes()
    at = data.draw(st.integers(0, len(full) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(full)
    flipped[at] ^= 1 << bit
    _write(tmp_path, bytes(flipped))
    found = _damaged(lambda: checked_image(tmp_path, 0, {NAME: image_digest(full)}))
    recorded = hashlib.sha256(full).hexdigest()
    assert f"where the checkpoint records {recorded[:16]}" in str(found)
    assert "SHA-256 " + hashlib.sha256(bytes(flipped)).hexdigest()[:16] in str(found)


def test_another_enclaves_valid_image_is_refused(tmp_path: Path) -> None:
    recorded = _image_bytes()
    other = bytes(cbor2.dumps(image_files(source="def other():\n    return 2\n")))
    EnclaveImage.from_files(cbor2.loads(other))  # (a valid image, of another enclave)
    _write(tmp_path, other)
    found = _damaged(lambda: checked_image(tmp_path, 0, {NAME: image_digest(recorded)}))
    assert "is not the one the checkpoint recorded" in str(found)


@FUZZ
@given(content=st.binary(max_size=2048) | JSONISH.map(lambda v: bytes(cbor2.dumps(v))))
def test_garbage_recorded_as_it_is_is_refused_as_no_image(tmp_path: Path, content: bytes) -> None:
    """Bytes that match their record but are no image: refused, never another error."""

    _write(tmp_path, content)
    try:
        checked_image(tmp_path, 0, {NAME: image_digest(content)})
    except CheckpointDamagedError as exc:
        assert NAME in str(exc)


def test_a_missing_image_a_link_and_a_fifo_are_refused_at_once(tmp_path: Path) -> None:
    data = _image_bytes()
    record = {NAME: image_digest(data)}
    assert "cannot be read" in str(_damaged(lambda: checked_image(tmp_path, 0, record)))
    real = tmp_path / "elsewhere.image"
    real.write_bytes(data)
    (tmp_path / NAME).symlink_to(real)
    assert "cannot be read" in str(_damaged(lambda: checked_image(tmp_path, 0, record)))
    (tmp_path / NAME).unlink()
    os.mkfifo(tmp_path / NAME)  # (never waited on)
    assert "not a regular file" in str(_damaged(lambda: checked_image(tmp_path, 0, record)))


# --- CheckpointIn: the check comes before the platform is asked for anything ---------------------
def _bare_checkpoint(directory: Path, image: bytes, recorded: bytes) -> None:
    directory.mkdir(exist_ok=True)
    _write(directory, image)
    (directory / "enclave-0.key").write_bytes(b"k")
    (directory / "enclave-0.state").write_bytes(b"")
    facts = {"checkpoint_id": "00", "chunk_bytes": 4096, "image": image_digest(recorded)}
    (directory / "enclave-0.json").write_text(json.dumps(facts))


@pytest.mark.parametrize("how", ["load", "probe"])
@pytest.mark.parametrize("where", ["metadata", "bare"])
def test_checkpoint_in_launches_nothing_from_an_image_not_as_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, where: str
) -> None:
    def launch(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an enclave was launched from an unchecked image")

    monkeypatch.setattr(datapath_checkpoint, "launch_enclave", launch)
    recorded = _image_bytes()
    flipped = bytearray(recorded)
    flipped[len(flipped) // 2] ^= 0x10
    _bare_checkpoint(tmp_path, bytes(flipped), recorded)
    files = {NAME: image_digest(recorded)} if where == "metadata" else None
    incoming = CheckpointIn(tmp_path, 0, tmp_path / "no-socket", files=files)
    found = _damaged(incoming.load if how == "load" else incoming.probe)
    assert NAME in str(found) and incoming.link is None and incoming.info is None
    # A record of no digest at all launches nothing either.
    incoming = CheckpointIn(tmp_path, 0, tmp_path / "no-socket", files={"other": [1, "0" * 64]})
    _damaged(incoming.load if how == "load" else incoming.probe)
