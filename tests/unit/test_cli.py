"""The command line: JSON on stdout, one-line errors on stderr, named exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from platform_fixtures import World, image_files, make_image, write_image

from migsgx import cli
from migsgx.sgx.image import EnclaveImage, mr_signer_of


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """Run ``migsgx ARGV`` in this process: (exit code, parsed stdout or text, stderr)."""

    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    code = exited.value.code
    assert isinstance(code, int)
    try:
        parsed: Any = json.loads(out) if out.strip() else None
    except json.JSONDecodeError:
        parsed = out
    return code, parsed, err


def test_ca_collateral_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ca = str(tmp_path / "ca")
    assert run(capsys, "ca", "init", "--dir", ca)[0] == cli.EXIT_OK
    code, out, _ = run(
        capsys,
        "platform", "init", "--state", str(tmp_path / "h"), "--ca", ca, "--host-id", "h1",
        "--tcb-level", "2",
    )  # fmt: skip
    assert code == cli.EXIT_OK
    code, out, _ = run(capsys, "ca", "publish", "--dir", ca, "--valid-days", "7")
    assert code == cli.EXIT_OK
    assert out["tcb_levels"] == {"3": "UpToDate", "2": "SWHardeningNeeded", "1": "OutOfDate"}
    assert out["next_update"] > out["issued"]
    code, out, _ = run(capsys, "ca", "tcb", "4", "UpToDate", "--dir", ca)
    assert code == cli.EXIT_OK and out["tcb_levels"]["4"] == "UpToDate"
    code, out, _ = run(
        capsys, "platform", "tcb", "--state", str(tmp_path / "h"), "--ca", ca, "--level", "4"
    )
    assert code == cli.EXIT_OK and out == {
        "state": str(tmp_path / "h"),
        "host_id": "h1",
        "tcb_level": 4,
    }
    code, out, _ = run(capsys, "ca", "revoke", "h1", "--dir", ca)
    assert code == cli.EXIT_OK and out["revoked"] == "h1"
    code, _, err = run(capsys, "ca", "revoke", "nobody", "--dir", ca)
    assert code != cli.EXIT_OK
    _assert_one_line_error(err, "config")
    code, _, err = run(capsys, "ca", "tcb", "3", "Fine", "--dir", ca)
    assert code != cli.EXIT_OK


def _assert_one_line_error(err: str, code_name: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"migsgx: error [{code_name}]: ")


def test_ca_and_platform_init(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "ca", "init", "--dir", str(tmp_path / "ca"))
    assert code == cli.EXIT_OK
    assert out["ca"] == str(tmp_path / "ca") and len(out["fingerprint_sha256"]) == 64
    assert (tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600

    code, out, _ = run(
        capsys,
        "platform", "init", "--state", str(tmp_path / "h"), "--ca", str(tmp_path / "ca"),
        "--host-id", "h1", "--allow-signer", "ab" * 32,
    )  # fmt: skip
    assert code == cli.EXIT_OK and out == {
        "state": str(tmp_path / "h"), "host_id": "h1", "allowed_signers": ["ab" * 32]
    }  # fmt: skip
    assert (tmp_path / "h" / "root.key").stat().st_mode & 0o777 == 0o600

    # The allow list grows; the platform reads it back.
    code, out, _ = run(
        capsys, "platform", "allow-signer", "--state", str(tmp_path / "h"), "cd" * 32
    )  # fmt: skip
    assert code == cli.EXIT_OK and out["allowed_signers"] == ["ab" * 32, "cd" * 32]
    code, _, err = run(
        capsys, "platform", "allow-signer", "--state", str(tmp_path / "h"), "abc"
    )  # fmt: skip
    assert code == cli.EXIT_CONFIG

    # Neither overwrites what exists.
    code, _, err = run(capsys, "ca", "init", "--dir", str(tmp_path / "ca"))
    assert code == cli.EXIT_CONFIG
    _assert_one_line_error(err, "state-dir")
    code, _, err = run(
        capsys, "platform", "init", "--state", str(tmp_path / "h"), "--ca", str(tmp_path / "ca")
    )
    assert code == cli.EXIT_CONFIG
    _assert_one_line_error(err, "state-dir")


def test_platform_init_without_a_ca(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(
        capsys, "platform", "init", "--state", str(tmp_path / "h"), "--ca", str(tmp_path / "no")
    )
    assert code == cli.EXIT_CONFIG
    _assert_one_line_error(err, "state-dir")
    assert not (tmp_path / "h" / "root.key").exists()


def test_keygen_sign_measure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, world: World
) -> None:
    key = tmp_path / "author.pem"
    code, out, _ = run(capsys, "enclave", "keygen", "--out", str(key))
    assert code == cli.EXIT_OK
    assert key.stat().st_mode & 0o777 == 0o600
    mrsigner = out["mrsigner"]
    code, _, err = run(capsys, "enclave", "keygen", "--out", str(key))
    assert code == cli.EXIT_CONFIG
    _assert_one_line_error(err, "config")

    image_dir = write_image(tmp_path / "img", EnclaveImage.from_files(image_files()))
    code, out, _ = run(capsys, "enclave", "measure", str(image_dir))
    assert code == cli.EXIT_OK
    assert out == {"mrenclave": EnclaveImage.load(image_dir).measure().hex(), "mrsigner": None}

    code, signed_out, _ = run(capsys, "enclave", "sign", str(image_dir), "--key", str(key))
    assert code == cli.EXIT_OK
    assert signed_out["mrsigner"] == mrsigner
    code, out, _ = run(capsys, "enclave", "measure", str(image_dir))
    assert code == cli.EXIT_OK
    assert set(out) == {"mrenclave", "mrsigner"}
    assert out == {"mrenclave": signed_out["mrenclave"], "mrsigner": mrsigner}


def test_measure_matches_the_library(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, world: World
) -> None:
    image = make_image(world.author)
    image_dir = write_image(tmp_path / "img", image)
    code, out, _ = run(capsys, "enclave", "measure", str(image_dir))
    assert code == cli.EXIT_OK
    assert out == {
        "mrenclave": image.measure().hex(),
        "mrsigner": mr_signer_of(world.author).hex(),
    }


def test_image_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "enclave", "measure", str(empty))
    assert code == cli.EXIT_IMAGE
    _assert_one_line_error(err, "image")

    bad = write_image(tmp_path / "bad", EnclaveImage.from_files(image_files()))
    (bad / "manifest.toml").write_bytes(b"[enclave]\nname = 'x'\n")
    code, _, err = run(capsys, "enclave", "measure", str(bad))
    assert code == cli.EXIT_IMAGE
    _assert_one_line_error(err, "image")

    garbled = write_image(tmp_path / "garbled", EnclaveImage.from_files(image_files()))
    (garbled / "enclave.sig").write_bytes(b"not a sigstruct")
    code, _, err = run(capsys, "enclave", "measure", str(garbled))
    assert code == cli.EXIT_IMAGE
    _assert_one_line_error(err, "image-signature")


def test_sign_refuses_keys_without_exponent_3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "k.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    image_dir = write_image(tmp_path / "img", EnclaveImage.from_files(image_files()))
    code, _, err = run(capsys, "enclave", "sign", str(image_dir), "--key", str(path))
    assert code == cli.EXIT_IMAGE
    _assert_one_line_error(err, "image")
    assert not (image_dir / "enclave.sig").exists()


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "ca", "init")  # --dir is required
    assert code == cli.EXIT_USAGE and err.strip()
    code, _, _ = run(capsys, "no-such-command")
    assert code == cli.EXIT_USAGE
    code, _, _ = run(capsys, "enclave", "measure", str(tmp_path / "missing"))
    assert code == cli.EXIT_USAGE


def test_entry_point_runs(tmp_path: Path, world: World) -> None:
    image_dir = write_image(tmp_path / "img", make_image(world.author))
    proc = subprocess.run(
        [sys.executable, "-m", "migsgx", "enclave", "measure", str(image_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mrsigner"] == mr_signer_of(world.author).hex()
    proc = subprocess.run(
        [sys.executable, "-m", "migsgx", "enclave", "measure", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == cli.EXIT_IMAGE
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
