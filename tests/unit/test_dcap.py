"""DCAP verification of record: dcap-qvl accepts the emulated platform's quotes against the
deployment's root with the collateral the CA publishes, and each way a quote, a host or the
collateral can be wrong fails with its own typed error."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from platform_fixtures import report_body

from migsgx.errors import (
    AttestationError,
    CollateralError,
    ConfigError,
    DebugEnclaveError,
    ImageError,
    QuoteFormatError,
    QuoteSignatureError,
    RevokedError,
    StaleCollateralError,
    TcbOutOfDateError,
    TcbStatusError,
    UnknownCAError,
)
from migsgx.sgx import pcs
from migsgx.sgx.ca import SGX_EXTENSIONS_OID, ProvisioningCA
from migsgx.sgx.collateral import COLLATERAL_FILE, Collateral
from migsgx.sgx.dcap import DEBUG_UNRATED, TcbPolicy, to_dcap, verify_dcap
from migsgx.sgx.image import Manifest
from migsgx.sgx.platform import PCK_CHAIN, EmulatedPlatform
from migsgx.sgx.quote import PCE_SVN, Quote
from migsgx.sgx.sgxext import PckExtension

DER = serialization.Encoding.DER


class Deployment:
    """A CA and two hosts: ``a`` at the current TCB level, ``old`` at the out-of-date one."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "ca"
        self.ca = ProvisioningCA.init(self.dir)
        self.a = EmulatedPlatform.init(root / "a", self.ca, host_id="a")
        self.old = EmulatedPlatform.init(root / "old", self.ca, host_id="old", tcb_level=1)

    @property
    def collateral(self) -> Collateral:
        return Collateral.load(self.dir)

    def verify(self, quote: bytes, **kw: object) -> str:
        return verify_dcap(quote, self.collateral, [self.ca.certificate], **kw).status  # type: ignore[arg-type]


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return Deployment(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment(tmp_path_factory.mktemp("dcap"))


# --- the PKI ---------------------------------------------------------------------------------
def test_pck_leaf_carries_intels_sgx_extension(shared: Deployment) -> None:
    chain = x509.load_pem_x509_certificates((shared.a.state_dir / PCK_CHAIN).read_bytes())
    leaf, _pck_ca, root = chain
    assert root == shared.ca.certificate
    raw = leaf.extensions.get_extension_for_oid(SGX_EXTENSIONS_OID).value
    ext = PckExtension.from_der(raw.value)  # type: ignore[attr-defined]
    state = pcs.PcsState.load(shared.dir)
    assert ext.fmspc == state.fmspc and ext.pce_svn == PCE_SVN and ext.pce_id == bytes(2)
    assert ext.components == (3,) * 16 and ext.cpu_svn == bytes([3] * 16)
    assert ext.ppid.hex() == state.hosts["a"]["ppid"]
    # dcap-qvl reads the same values out of the certificate.
    theirs = dcap_qvl.parse_pck_extension_from_pem(leaf.public_bytes(serialization.Encoding.PEM))
    assert (theirs.fmspc, theirs.cpu_svn, theirs.pce_svn) == (ext.fmspc, ext.cpu_svn, PCE_SVN)
    assert (theirs.ppid, theirs.pce_id, theirs.sgx_type) == (ext.ppid, ext.pce_id, 0)
    old = x509.load_pem_x509_certificates((shared.old.state_dir / PCK_CHAIN).read_bytes())[0]
    raw_old = old.extensions.get_extension_for_oid(SGX_EXTENSIONS_OID).value
    assert PckExtension.from_der(raw_old.value).components == (1,) * 16  # type: ignore[attr-defined]


def test_collateral_is_signed_and_shaped_as_a_pccs_serves_it(shared: Deployment) -> None:
    c = shared.collateral
    tcb = json.loads(c.tcb_info)
    assert (tcb["id"], tcb["version"], tcb["tcbType"]) == ("SGX", 3, 0)
    assert {lv["tcbStatus"] for lv in tcb["tcbLevels"]} == {
        "UpToDate",
        "SWHardeningNeeded",
        "OutOfDate",
    }
    qe = json.loads(c.qe_identity)
    assert (qe["id"], qe["version"]) == ("QE", 2)
    signer = x509.load_pem_x509_certificates(c.tcb_info_issuer_chain.encode())[0]
    assert signer == shared.ca.tcb_signer.certificate
    assert Collateral.from_json(c.to_json()) == c
    for der, issuer in ((c.pck_crl, shared.ca.pck_ca), (c.root_ca_crl, shared.ca.root)):
        crl = x509.load_der_x509_crl(der)
        assert crl.is_signature_valid(issuer.key.public_key())
        assert crl.issuer == issuer.certificate.subject


# --- dcap-qvl accepts, and rates -------------------------------------------------------------
def test_an_emulated_quote_verifies_in_dcap_qvl_against_the_deployment_root(
    shared: Deployment,
) -> None:
    quote = shared.a.quote(report_body(), bytes(range(64)))
    report = dcap_qvl.verify_with_root_ca(
        quote,
        to_dcap(shared.collateral),
        shared.ca.certificate.public_bytes(DER),
        int(dt.datetime.now(dt.UTC).timestamp()),
    )
    assert report.status == "UpToDate"
    assert report.ppid.hex() == pcs.PcsState.load(shared.dir).hosts["a"]["ppid"]
    verdict = verify_dcap(quote, shared.collateral, [shared.ca.certificate])
    assert verdict.body.report_data == bytes(range(64))
    assert verdict.body.mr_enclave == report_body().mr_enclave
    assert (verdict.status, verdict.advisory_ids) == ("UpToDate", ())


def test_an_out_of_date_host_is_refused_unless_the_policy_accepts_it(shared: Deployment) -> None:
    quote = shared.old.quote(report_body(), bytes(64))
    with pytest.raises(TcbOutOfDateError):
        shared.verify(quote)
    assert shared.verify(quote, policy=TcbPolicy(frozenset({"OutOfDate"}))) == "OutOfDate"


def test_only_the_accepted_statuses_pass(dep: Deployment) -> None:
    quote = dep.a.quote(report_body(), bytes(64))
    pcs.set_level(dep.ca, 3, "SWHardeningNeeded")
    with pytest.raises(TcbStatusError) as err:
        dep.verify(quote)
    assert not isinstance(err.value, TcbOutOfDateError)
    assert dep.verify(quote, policy=TcbPolicy(frozenset({"SWHardeningNeeded"}))) == (
        "SWHardeningNeeded"
    )
    # A revoked TCB level is refused whatever the policy says.
    pcs.set_level(dep.ca, 3, "Revoked")
    with pytest.raises(RevokedError):
        dep.verify(quote, policy=TcbPolicy(frozenset({"SWHardeningNeeded", "OutOfDate"})))
    with pytest.raises(ValueError):
        TcbPolicy(frozenset({"Revoked"}))
    with pytest.raises(ImageError):
        Manifest("e", "m:E", 4096, accept_tcb=("Revoked",)).check()


def test_a_revoked_host_is_refused_by_both_verifiers(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    quote = dep.a.quote(report_body(), bytes(64))
    assert dep.verify(quote) == "UpToDate"
    pcs.revoke_host(dep.ca, "a")
    with pytest.raises(RevokedError, match="revoked"):
        dep.verify(quote)
    # dcap-qvl's own verdict, without migsgx's CRL look-up first, is the same.
    monkeypatch.setattr("migsgx.sgx.dcap._check_not_revoked", lambda q, c: None)
    with pytest.raises(RevokedError, match="CertRevoked"):
        dep.verify(quote)
    # The other host is unaffected.
    old = dep.old.quote(report_body(), bytes(64))
    assert dep.verify(old, policy=TcbPolicy(frozenset({"OutOfDate"})))
    with pytest.raises(ConfigError):
        pcs.revoke_host(dep.ca, "nobody")
    # A revoked host cannot get itself a fresh certificate by moving its TCB.
    with pytest.raises(ConfigError, match="revoked"):
        dep.a.set_tcb_level(dep.ca, 3)


def test_a_raised_tcb_after_recovery_verifies(dep: Deployment) -> None:
    """A TCB recovery: level 4 appears, 3 goes out of date; a host moved to 4 passes."""

    pcs.set_level(dep.ca, 4, "UpToDate")
    pcs.set_level(dep.ca, 3, "OutOfDate")
    with pytest.raises(TcbOutOfDateError):
        dep.verify(dep.a.quote(report_body(), bytes(64)))
    dep.a.set_tcb_level(dep.ca, 4)
    assert dep.verify(dep.a.quote(report_body(), bytes(64))) == "UpToDate"
    with pytest.raises(ConfigError):
        dep.a.set_tcb_level(dep.ca, 9)


def test_stale_collateral_is_refused(dep: Deployment) -> None:
    quote = dep.a.quote(report_body(), bytes(64))
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(StaleCollateralError):
        dep.verify(quote, now=now + dt.timedelta(days=31))
    # Published a while ago for one day: stale now, whatever the quote.
    pcs.publish(dep.ca, valid_for=dt.timedelta(days=1), now=now - dt.timedelta(days=2))
    with pytest.raises(StaleCollateralError):
        dep.verify(quote)
    # dcap-qvl agrees on its own.
    with pytest.raises(ValueError, match=r"expired|Expired"):
        dcap_qvl.verify_with_root_ca(
            quote,
            to_dcap(dep.collateral),
            dep.ca.certificate.public_bytes(DER),
            int(now.timestamp()),
        )
    pcs.publish(dep.ca)
    assert dep.verify(quote) == "UpToDate"


def test_a_quote_from_another_deployment_is_refused(shared: Deployment, tmp_path: Path) -> None:
    other = Deployment(tmp_path)
    quote = other.a.quote(report_body(), bytes(64))
    with pytest.raises(UnknownCAError):
        shared.verify(quote)
    # The other deployment's collateral does not help: it is not signed by our root.
    with pytest.raises(AttestationError):
        verify_dcap(quote, other.collateral, [shared.ca.certificate])
    # Nor is our quote accepted with the other root.
    with pytest.raises(UnknownCAError):
        ours = shared.a.quote(report_body(), bytes(64))
        verify_dcap(ours, shared.collateral, [other.ca.certificate])


def test_a_verifier_trusting_two_roots_uses_each_roots_collateral(
    shared: Deployment, tmp_path: Path
) -> None:
    other = Deployment(tmp_path)
    both = [shared.collateral, other.collateral]
    roots = [shared.ca.certificate, other.ca.certificate]
    assert verify_dcap(shared.a.quote(report_body(), bytes(64)), both, roots).status == "UpToDate"
    theirs = other.a.quote(report_body(), bytes(64))
    assert verify_dcap(theirs, both[::-1], roots).status == "UpToDate"
    # With only the other root's collateral, a quote of ours does not pass.
    with pytest.raises(CollateralError):
        verify_dcap(shared.a.quote(report_body(), bytes(64)), [other.collateral], roots)
    with pytest.raises(CollateralError):
        verify_dcap(shared.a.quote(report_body(), bytes(64)), [], roots)


def test_debug_enclaves_are_refused_unless_allowed(shared: Deployment) -> None:
    quote = shared.a.quote(report_body(debug=True), bytes(64))
    with pytest.raises(DebugEnclaveError):
        shared.verify(quote)
    assert shared.verify(quote, allow_debug=True) == DEBUG_UNRATED


def test_every_flipped_byte_of_the_quote_is_refused(shared: Deployment) -> None:
    """Every byte up to the certification data is signed: any flip is refused.  The PEM
    chain carries its own signatures: a flip there is refused too, or it hit armour or
    line breaks of a certificate above the leaf (redundant: the root is the verifier's
    own), and the same PCK leaf vouches for the same quote."""

    quote = shared.a.quote(report_body(), bytes(64))
    collateral = shared.collateral
    chain_pem = Quote.parse(quote).cert_chain_pem
    chain_start = len(quote) - len(chain_pem)
    leaf_end = chain_start + chain_pem.index(b"-----END CERTIFICATE-----") + 25
    for pos in range(len(quote)):
        flipped = bytearray(quote)
        flipped[pos] ^= 0xFF
        try:
            verdict = verify_dcap(bytes(flipped), collateral, [shared.ca.certificate])
        except AttestationError:
            continue
        assert pos >= leaf_end, f"byte {pos} of the signed quote or its PCK leaf flipped unnoticed"
        assert verdict.pck_subject == "CN=migsgx PCK a,O=migsgx"
        assert verdict.body == Quote.parse(quote).report_body


@pytest.mark.parametrize(
    ("part", "errors"),
    [
        ("tcb_info", (QuoteSignatureError, CollateralError)),
        ("qe_identity", (QuoteSignatureError, CollateralError)),
        ("tcb_info_signature", (QuoteSignatureError,)),
        ("qe_identity_signature", (QuoteSignatureError,)),
        ("pck_crl", (CollateralError, QuoteFormatError)),
        ("root_ca_crl", (CollateralError, QuoteFormatError)),
    ],
)
def test_tampered_collateral_is_refused(
    shared: Deployment, part: str, errors: tuple[type, ...]
) -> None:
    quote = shared.a.quote(report_body(), bytes(64))
    c = shared.collateral
    value = getattr(c, part)
    for pos in range(0, len(value), max(1, len(value) // 40)):
        if isinstance(value, str):
            ch = value[pos]
            tampered: str | bytes = value[:pos] + ("0" if ch != "0" else "1") + value[pos + 1 :]
        else:
            b = bytearray(value)
            b[pos] ^= 0x01
            tampered = bytes(b)
        with pytest.raises(AttestationError) as err:
            verify_dcap(quote, replace(c, **{part: tampered}), [shared.ca.certificate])
        assert isinstance(err.value, errors), repr(err.value)


def test_a_platform_serves_its_collateral_fresh_and_fails_typed(dep: Deployment) -> None:
    before = dep.a.collateral()
    assert [Collateral.from_json(b) for b in before] == [dep.collateral]
    pcs.revoke_host(dep.ca, "old")  # read again on every call: the new CRL is there at once
    (after,) = dep.a.collateral()
    assert Collateral.from_json(after).pck_crl != Collateral.from_json(before[0]).pck_crl
    (dep.dir / COLLATERAL_FILE).unlink()
    with pytest.raises(CollateralError):
        dep.a.collateral()


def test_missing_collateral_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(CollateralError):
        Collateral.load(tmp_path)
    (tmp_path / COLLATERAL_FILE).write_text("{}")
    with pytest.raises(CollateralError):
        Collateral.load(tmp_path)


def test_pck_extension_round_trip_and_malformed() -> None:
    ext = PckExtension(b"p" * 16, tuple(range(16)), 7, b"\0\1", bytes(6))
    assert PckExtension.from_der(ext.to_der()) == ext
    with pytest.raises(QuoteFormatError):
        PckExtension.from_der(b"\x30\x00")
