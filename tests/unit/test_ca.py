"""The provisioning CA and the state directories: private files, no overwrites."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from platform_fixtures import World

from migsgx.errors import StateDirError
from migsgx.sgx.ca import CA_CERT, CA_KEY, SGX_EXTENSIONS_OID, ProvisioningCA, load_root
from migsgx.sgx.platform import (
    ATT_KEY,
    CA_PEM,
    COUNTERS,
    PCK_CHAIN,
    PCK_KEY,
    PLATFORM_TOML,
    ROOT_KEY,
    EmulatedPlatform,
)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- the CA -----------------------------------------------------------------------------
def test_ca_init_writes_a_private_key(tmp_path: Path) -> None:
    authority = ProvisioningCA.init(tmp_path / "ca")
    assert _mode(tmp_path / "ca" / CA_KEY) == 0o600
    assert _mode(tmp_path / "ca") == 0o700
    bc = authority.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    # Path length 1: the PCK processor CA sits between the root and the PCK leaves.
    assert bc.ca and bc.path_length == 1
    loaded = ProvisioningCA.load(tmp_path / "ca")
    assert loaded.certificate == authority.certificate
    assert load_root(tmp_path / "ca") == authority.certificate
    assert load_root(tmp_path / "ca" / CA_CERT) == authority.certificate


def test_ca_init_refuses_to_overwrite(tmp_path: Path) -> None:
    first = ProvisioningCA.init(tmp_path / "ca")
    with pytest.raises(StateDirError):
        ProvisioningCA.init(tmp_path / "ca")
    assert ProvisioningCA.load(tmp_path / "ca").certificate == first.certificate


def test_ca_load_refuses_missing_or_exposed_key(tmp_path: Path) -> None:
    with pytest.raises(StateDirError):
        ProvisioningCA.load(tmp_path / "nothing")
    ProvisioningCA.init(tmp_path / "ca")
    os.chmod(tmp_path / "ca" / CA_KEY, 0o640)
    with pytest.raises(StateDirError, match="group or others"):
        ProvisioningCA.load(tmp_path / "ca")


def test_load_root_errors(tmp_path: Path) -> None:
    with pytest.raises(StateDirError):
        load_root(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(StateDirError):
        load_root(tmp_path / "junk.pem")


def test_pck_certificates_carry_the_sgx_extensions(world: World) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pck = world.ca.issue_pck(key.public_key(), "h1")
    assert pck.extensions.get_extension_for_oid(SGX_EXTENSIONS_OID)
    assert not pck.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    pck.verify_directly_issued_by(world.ca.pck_ca.certificate)
    world.ca.pck_ca.certificate.verify_directly_issued_by(world.ca.certificate)
    tls = world.ca.issue_tls(key.public_key(), "h1", ["127.0.0.1", "h1.example"])
    with pytest.raises(x509.ExtensionNotFound):
        tls.extensions.get_extension_for_oid(SGX_EXTENSIONS_OID)
    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["h1.example"]


# --- a platform's state directory ----------------------------------------------------------
def test_platform_state_files_are_private(world: World) -> None:
    state = world.host_a.state_dir
    assert _mode(state) == 0o700
    for name in (ROOT_KEY, PCK_KEY, ATT_KEY, COUNTERS):
        assert _mode(state / name) == 0o600, name
    assert len((state / ROOT_KEY).read_bytes()) == 32
    for name in (PCK_CHAIN, CA_PEM, PLATFORM_TOML):  # public
        assert (state / name).exists()


def test_platform_secrets_differ_between_hosts(world: World) -> None:
    for name in (ROOT_KEY, PCK_KEY, ATT_KEY):
        a = (world.host_a.state_dir / name).read_bytes()
        assert a != (world.host_b.state_dir / name).read_bytes()


def test_pck_chain_is_issued_by_the_ca(world: World) -> None:
    chain = x509.load_pem_x509_certificates((world.host_a.state_dir / PCK_CHAIN).read_bytes())
    chain[0].verify_directly_issued_by(chain[1])
    assert chain[1:] == [world.ca.pck_ca.certificate, world.ca.certificate]
    assert chain[0].subject.rfc4514_string() == "CN=migsgx PCK a,O=migsgx"
    assert world.host_a.trusted_roots == [world.ca.certificate]


def test_platform_init_refuses_to_overwrite(world: World) -> None:
    state = world.host_a.state_dir
    before = (state / ROOT_KEY).read_bytes()
    with pytest.raises(StateDirError):
        EmulatedPlatform.init(state, world.ca)
    assert (state / ROOT_KEY).read_bytes() == before


def _copy_state(src: Path, dst: Path) -> Path:
    dst.mkdir(mode=0o700)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".lock"):
            (dst / p.name).write_bytes(p.read_bytes())
            os.chmod(dst / p.name, p.stat().st_mode & 0o777)
    return dst


@pytest.mark.parametrize("name", [ROOT_KEY, PCK_KEY, ATT_KEY])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_exposed_secret_refused(world: World, tmp_path: Path, name: str, mode: int) -> None:
    state = _copy_state(world.host_a.state_dir, tmp_path / "state")
    EmulatedPlatform(state)  # the copy is fine as it is
    os.chmod(state / name, mode)
    with pytest.raises(StateDirError):
        EmulatedPlatform(state)


@pytest.mark.parametrize("name", [ROOT_KEY, PCK_KEY, ATT_KEY, PCK_CHAIN, CA_PEM, PLATFORM_TOML])
def test_missing_state_file_refused(world: World, tmp_path: Path, name: str) -> None:
    state = _copy_state(world.host_a.state_dir, tmp_path / "state")
    (state / name).unlink()
    with pytest.raises(StateDirError):
        EmulatedPlatform(state)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (PLATFORM_TOML, b"not toml ["),
        (PLATFORM_TOML, b'cpu_svn = "0202"\n'),  # no host id
        (PLATFORM_TOML, b'host_id = "a"\ncpu_svn = "zz"\n'),
        (PLATFORM_TOML, b'host_id = "a"\ncpu_svn = "0202"\n'),  # CPUSVN not 16 bytes
        (ROOT_KEY, b"short"),
        (PCK_KEY, b"not a key"),
        (CA_PEM, b"not a certificate"),
    ],
)
def test_corrupt_state_refused(world: World, tmp_path: Path, name: str, content: bytes) -> None:
    state = _copy_state(world.host_a.state_dir, tmp_path / "state")
    mode = _mode(state / name)
    (state / name).write_bytes(content)
    os.chmod(state / name, mode)
    with pytest.raises(StateDirError):
        EmulatedPlatform(state)


def test_reopened_platform_has_the_same_identity(world: World) -> None:
    again = EmulatedPlatform(world.host_a.state_dir)
    assert again.info.host_id == "a"
    assert again.info.cpu_svn == world.host_a.info.cpu_svn
    assert again.qe_target_info == world.host_a.qe_target_info
