"""Enclave images: canonical measurement, signatures, and what EINIT refuses."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from platform_fixtures import (
    PROBE_MODULE,
    World,
    image_files,
    make_image,
    manifest_toml,
    signed,
    write_image,
)

from migsgx.errors import (
    ImageError,
    ImageMeasurementError,
    ImageSignatureError,
    ImageUnsignedError,
)
from migsgx.sgx.image import (
    MANIFEST,
    SIGNATURE,
    SIGSTRUCT_SIZE,
    EnclaveImage,
    Manifest,
    SigStruct,
    load_author_key,
    mr_signer_of,
    parse_size,
    sign_image,
    sign_image_dir,
)
from migsgx.sgx.structs import FLAG_DEBUG


def _measure(files: dict[str, bytes]) -> bytes:
    return EnclaveImage.from_files(files).measure()


# --- measurement ------------------------------------------------------------------
def test_measurement_ignores_creation_order_and_mtimes(tmp_path: Path) -> None:
    files = {**image_files(), "lib/a.py": b"A = 1\n", "lib/b.py": b"B = 2\n", "data.bin": b"\0" * 9}
    first = tmp_path / "one"
    second = tmp_path / "two"
    for directory, order in ((first, sorted(files)), (second, sorted(files, reverse=True))):
        for name in order:
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[name])
    for i, path in enumerate(sorted(second.rglob("*"))):
        os.utime(path, (1_000_000 + i * 7919, 2_000_000 + i * 104729))
    m1 = EnclaveImage.load(first).measure()
    assert m1 == EnclaveImage.load(second).measure()
    assert m1 == _measure(files)


def test_measurement_ignores_the_signature(world: World) -> None:
    image = make_image(world.author)
    unsigned = {n: d for n, d in image.files.items() if n != SIGNATURE}
    assert image.measure() == _measure(unsigned)


def test_every_single_byte_change_changes_the_measurement() -> None:
    files = {**image_files(), "data.bin": bytes(range(40))}
    base = _measure(files)
    seen = {base}
    for name in ("data.bin", f"{PROBE_MODULE}.py"):
        data = files[name]
        for pos in range(0, len(data), max(1, len(data) // 40)):
            changed = bytearray(data)
            changed[pos] ^= 0x01
            m = _measure({**files, name: bytes(changed)})
            assert m not in seen
            seen.add(m)


def test_manifest_bytes_are_measured() -> None:
    files = image_files()
    # Same parsed manifest, different bytes (a comment): still another measurement.
    assert _measure(files) != _measure({**files, MANIFEST: files[MANIFEST] + b"# note\n"})


@pytest.mark.parametrize(
    "change",
    [
        {"name": "probe2"},
        {"entry": f"{PROBE_MODULE}:Other"},
        {"memory_size": "2MiB"},
        {"thread_slots": 5},
        {"product_id": 8},
        {"svn": 2},
        {"debug": True},
    ],
)
def test_every_manifest_field_is_measured(change: dict[str, Any]) -> None:
    assert _measure(image_files()) != _measure(image_files(**change))


def test_file_set_is_measured() -> None:
    files = image_files()
    base = _measure(files)
    assert _measure({**files, "extra.txt": b""}) != base  # an empty file counts
    renamed = dict(files)
    renamed["other.py"] = renamed.pop(f"{PROBE_MODULE}.py")
    assert _measure(renamed) != base
    # Content moved between names is not the same image.
    swap_a = {**files, "a.txt": b"xy", "b.txt": b""}
    swap_b = {**files, "a.txt": b"x", "b.txt": b"y"}
    assert _measure(swap_a) != _measure(swap_b)


def test_size_spellings() -> None:
    assert parse_size(4096) == 4096
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("1 GiB") == 1 << 30
    assert parse_size("8 KiB") == 8192
    for bad in ("64MB", "-1", "", "1.5MiB"):
        with pytest.raises(ValueError):
            parse_size(bad)


# --- manifest -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "toml",
    [
        b"",  # no [enclave] table
        b"[enclave]\nname = 'x'\nentry = 'm:C'\n",  # no memory_size
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 4096\nextra = 1\n",
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 4096\n[other]\n",
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 4095\n",
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 4096.0\n",  # a float
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = [4096]\n",
        b"[enclave]\nname = 'x'\nentry = 'nocolon'\nmemory_size = 4096\n",
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 4096\nthread_slots = 0\n",
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 4096\nthread_slots = true\n",
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 4096\nsvn = 65536\n",
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 4096\nproduct_id = -1\n",
        b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 4096\ndebug = 1\n",
        b"[enclave]\nname = ''\nentry = 'm:C'\nmemory_size = 4096\n",
        b"[enclave]\nname = '../../etc/x'\nentry = 'm:C'\nmemory_size = 4096\n",
        b"[enclave]\nname = 'a\\u0000b'\nentry = 'm:C'\nmemory_size = 4096\n",
        b"[enclave]\nname = '" + b"n" * 65 + b"'\nentry = 'm:C'\nmemory_size = 4096\n",
        b"\xff\xfe not utf-8",
        b"[enclave\n",
    ],
)
def test_bad_manifests_are_image_errors(toml: bytes) -> None:
    with pytest.raises(ImageError):
        EnclaveImage.from_files({MANIFEST: toml, "m.py": b""})


def test_manifest_defaults() -> None:
    m = EnclaveImage.from_files(
        {MANIFEST: b"[enclave]\nname='x'\nentry='m:C'\nmemory_size='8KiB'\n"}
    ).manifest
    assert m == Manifest("x", "m:C", 8192, thread_slots=4, product_id=0, svn=0, debug=False)
    assert not m.attributes.debug
    assert Manifest("x", "m:C", 8192, debug=True).attributes.flags & FLAG_DEBUG


# --- file names ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../x.py", "a/../../x.py", "a//b.py", "./a.py", "a/./b.py", "", "a/"]
)
def test_path_traversal_names_refused(name: str) -> None:
    with pytest.raises(ImageError):
        EnclaveImage.from_files({**image_files(), name: b"x"})


def test_undecodable_file_name_refused() -> None:
    with pytest.raises(ImageError):
        EnclaveImage.from_files({**image_files(), "bad\udcff.py": b"x"})


def test_file_content_must_be_bytes() -> None:
    with pytest.raises(ImageError):
        EnclaveImage.from_files({**image_files(), "a.py": "text"})  # type: ignore[dict-item]


def test_symlinks_refused(tmp_path: Path, world: World) -> None:
    image_dir = write_image(tmp_path / "img", make_image(world.author))
    (tmp_path / "outside.py").write_text("SECRET = 1\n")
    (image_dir / "link.py").symlink_to(tmp_path / "outside.py")
    with pytest.raises(ImageError, match="regular files"):
        EnclaveImage.load(image_dir)
    (image_dir / "link.py").unlink()
    (tmp_path / "outside").mkdir()
    (image_dir / "linkdir").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(ImageError, match="regular files"):
        EnclaveImage.load(image_dir)


def test_fifo_refused(tmp_path: Path, world: World) -> None:
    image_dir = write_image(tmp_path / "img", make_image(world.author))
    os.mkfifo(image_dir / "pipe")
    with pytest.raises(ImageError):
        EnclaveImage.load(image_dir)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        EnclaveImage.load(tmp_path / "missing")


# --- signatures and EINIT -------------------------------------------------------------
def test_signed_image_verifies_and_names_its_author(world: World) -> None:
    image = make_image(world.author)
    sig = image.verify()
    assert sig.mr_enclave == image.measure()
    assert sig.mr_signer == mr_signer_of(world.author)
    identity, _ = world.host_a.einit(image)
    assert identity.mr_enclave == image.measure()
    assert identity.mr_signer == mr_signer_of(world.author)
    assert (identity.isv_prod_id, identity.isv_svn) == (7, 1)
    assert len(image.files[SIGNATURE]) == SIGSTRUCT_SIZE


def test_unsigned_image_refused(world: World) -> None:
    image = EnclaveImage.from_files(image_files())
    with pytest.raises(ImageUnsignedError):
        world.host_a.einit(image)


def _tampered(image: EnclaveImage, **changes: bytes | None) -> EnclaveImage:
    files = dict(image.files)
    for name, data in changes.items():
        if data is None:
            del files[name]
        else:
            files[name] = data
    return EnclaveImage.from_files(files)


def test_tampered_code_byte_refused(world: World) -> None:
    image = make_image(world.author)
    code = bytearray(image.files[f"{PROBE_MODULE}.py"])
    code[len(code) // 2] ^= 0x20
    with pytest.raises(ImageMeasurementError):
        world.host_a.einit(_tampered(image, **{f"{PROBE_MODULE}.py": bytes(code)}))


@pytest.mark.parametrize(
    "change", [{"thread_slots": 64}, {"memory_size": "2MiB"}, {"name": "other"}]
)
def test_tampered_manifest_refused(world: World, change: dict[str, object]) -> None:
    image = make_image(world.author)
    with pytest.raises(ImageMeasurementError):
        world.host_a.einit(_tampered(image, **{MANIFEST: manifest_toml(**change)}))  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [{"debug": True}, {"svn": 9}, {"product_id": 1}])
def test_tampered_signed_fields_refused(world: World, change: dict[str, object]) -> None:
    # Fields that the SIGSTRUCT also names: caught either way, never launched.
    image = make_image(world.author)
    with pytest.raises(ImageMeasurementError):
        world.host_a.einit(_tampered(image, **{MANIFEST: manifest_toml(**change)}))  # type: ignore[arg-type]


def test_added_and_removed_files_refused(world: World) -> None:
    image = make_image(world.author, **{})
    with pytest.raises(ImageMeasurementError):
        world.host_a.einit(_tampered(image, **{"evil.py": b"import os\n"}))
    two = signed({**image.files, "helper.py": b"X = 1\n"}, world.author)
    with pytest.raises(ImageMeasurementError):
        world.host_a.einit(_tampered(two, **{"helper.py": None}))


def test_signature_of_another_author_swapped_in(world: World) -> None:
    """A SIGSTRUCT by another key over the same measurement: launches, as on SGX, but
    as another MRSIGNER, so it gets none of the author's MRSIGNER-bound secrets."""

    image = make_image(world.author)
    resigned = signed(image.files, world.other_author)
    assert resigned.measure() == image.measure()
    mine, _ = world.host_a.einit(image)
    theirs, _ = world.host_a.einit(resigned)
    assert theirs.mr_enclave == mine.mr_enclave
    assert theirs.mr_signer != mine.mr_signer
    assert theirs.mr_signer == mr_signer_of(world.other_author)


def _sig_bytes(image: EnclaveImage) -> bytearray:
    return bytearray(image.files[SIGNATURE])


def _with_sig(image: EnclaveImage, raw: bytes | bytearray) -> EnclaveImage:
    return _tampered(image, **{SIGNATURE: bytes(raw)})


def test_garbled_sigstruct_refused(world: World) -> None:
    image = make_image(world.author)
    n = SIGSTRUCT_SIZE
    # Flip one bit in each region: magic, header fields, modulus, exponent, signature.
    for pos in (0, 9, 13, 20, 60, 70, 81, 83, 90, 300, 467, 468, 500, n - 100, n - 1):
        raw = _sig_bytes(image)
        raw[pos] ^= 0x04
        with pytest.raises(ImageSignatureError):
            world.host_a.einit(_with_sig(image, raw))
    for wrong in (b"", bytes(n), bytes(_sig_bytes(image)[:-1]), bytes(_sig_bytes(image)) + b"\0"):
        with pytest.raises(ImageSignatureError):
            world.host_a.einit(_with_sig(image, wrong))


def test_forged_sigstruct_header_refused(world: World) -> None:
    """Keep the author's modulus and signature but name another measurement."""

    image = make_image(world.author)
    sig = SigStruct.unpack(image.files[SIGNATURE])
    forged = SigStruct(**{**sig.__dict__, "mr_enclave": bytes(32)})
    with pytest.raises(ImageSignatureError):
        world.host_a.einit(_with_sig(image, forged.pack()))
    forged = SigStruct(**{**sig.__dict__, "isv_svn": sig.isv_svn + 1})
    with pytest.raises(ImageSignatureError):
        world.host_a.einit(_with_sig(image, forged.pack()))


def test_sigstruct_must_use_exponent_3(world: World) -> None:
    image = make_image(world.author)
    sig = SigStruct.unpack(image.files[SIGNATURE])
    with pytest.raises(ImageSignatureError, match="exponent"):
        SigStruct(**{**sig.__dict__, "exponent": 65537}).verify()


@pytest.fixture(scope="module")
def rsa_65537() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def test_author_key_without_exponent_3_refused(
    tmp_path: Path, rsa_65537: rsa.RSAPrivateKey
) -> None:
    from cryptography.hazmat.primitives import serialization

    image = EnclaveImage.from_files(image_files())
    with pytest.raises(ImageError):
        sign_image(image, rsa_65537)
    pem = rsa_65537.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "k.pem"
    path.write_bytes(pem)
    with pytest.raises(ImageError, match="exponent 3"):
        load_author_key(path)


def test_small_rsa_key_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    small = rsa.generate_private_key(public_exponent=3, key_size=1024)
    image = EnclaveImage.from_files(image_files())
    with pytest.raises(ImageError):
        sign_image(image, small)
    path = tmp_path / "k.pem"
    path.write_bytes(
        small.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ImageError):
        load_author_key(path)
    path.write_bytes(b"not a key")
    with pytest.raises(ImageError):
        load_author_key(path)


def test_sigstruct_signed_by_a_2048_bit_key_refused(world: World) -> None:
    image = make_image(world.author)
    sig = SigStruct.unpack(image.files[SIGNATURE])
    short = SigStruct(**{**sig.__dict__, "modulus": sig.modulus[:256] + bytes(128)})
    with pytest.raises(ImageSignatureError):
        short.verify()


def test_author_key_file_is_private(world: World) -> None:
    assert world.author_path.stat().st_mode & 0o777 == 0o600


def test_sign_image_dir_roundtrip(tmp_path: Path, world: World) -> None:
    image_dir = write_image(tmp_path / "img", EnclaveImage.from_files(image_files()))
    sig = sign_image_dir(image_dir, load_author_key(world.author_path))
    loaded = EnclaveImage.load(image_dir)
    assert loaded.verify() == sig
    # Re-signing a signed directory measures the same image (the old signature is not measured).
    assert sign_image_dir(image_dir, world.author).mr_enclave == sig.mr_enclave
    (image_dir / f"{PROBE_MODULE}.py").write_bytes(b"# changed\n")
    with pytest.raises(ImageMeasurementError):
        world.host_a.einit(EnclaveImage.load(image_dir))


def test_sigstruct_layout(world: World) -> None:
    image = make_image(world.author)
    raw = image.files[SIGNATURE]
    assert raw[:8] == b"MSXSIG01"
    assert raw[16:48] == image.measure()
    modulus = raw[84 : 84 + 384]
    assert int.from_bytes(modulus, "little") == world.author.public_key().public_numbers().n
    assert struct.unpack_from("<I", raw, 84 + 384)[0] == 3
