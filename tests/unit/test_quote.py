"""DCAP v3 quotes: what verifies, and the typed error for every way one can be wrong."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from platform_fixtures import World, report_body, shared_world

from migsgx.errors import (
    AttestationError,
    DebugEnclaveError,
    IdentityMismatchError,
    QuoteFormatError,
    QuoteSignatureError,
    UnknownCAError,
)
from migsgx.sgx.ca import SGX_EXTENSIONS_OID, ProvisioningCA
from migsgx.sgx.keys import KeyDeriver
from migsgx.sgx.platform import PCK_KEY, EmulatedPlatform, target_info_of
from migsgx.sgx.quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    MAX_QUOTE_SIZE,
    QE_MR_ENCLAVE,
    QE_MR_SIGNER,
    QUOTE_VERSION,
    Quote,
    QuotingEnclave,
    verify_quote,
)
from migsgx.sgx.structs import FLAG_DEBUG, FLAG_INIT, FLAG_MODE64BIT, Attributes, ReportBody

PEM = serialization.Encoding.PEM
# Offsets in a quote with empty QE authentication data.
HEADER_END = 48
BODY_END = HEADER_END + 384
SIG_START = BODY_END + 4
ATT_KEY = SIG_START + 64
QE_REPORT = ATT_KEY + 64
QE_SIG = QE_REPORT + 384
AUTH_SIZE = QE_SIG + 64
AUTH_DATA = AUTH_SIZE + 2
CERT_TYPE = AUTH_DATA + 32  # Intel's QE writes 32 bytes of QE authentication data
CERT_SIZE = CERT_TYPE + 2
CHAIN = CERT_SIZE + 4


def _quote(platform: EmulatedPlatform, body: ReportBody | None = None) -> bytes:
    b = body or report_body()
    return platform.quote(replace(b, cpu_svn=platform.info.cpu_svn), b.report_data)


@pytest.fixture(scope="module")
def quote_a(world: World) -> bytes:
    return _quote(world.host_a)


def _roots(world: World) -> list[x509.Certificate]:
    return [world.ca.certificate]


# --- the good case -------------------------------------------------------------------------
def test_valid_quote_verifies(world: World, quote_a: bytes) -> None:
    verified = verify_quote(quote_a, _roots(world))
    body = report_body()
    assert verified.body.mr_enclave == body.mr_enclave
    assert verified.body.mr_signer == body.mr_signer
    assert verified.body.report_data == body.report_data
    assert (verified.body.isv_prod_id, verified.body.isv_svn) == (3, 4)
    assert verified.pck_subject == "CN=migsgx PCK a,O=migsgx"
    assert verified.platform_user_data[:16] == hashlib.sha256(b"a").digest()[:16]
    # Through the platform and with the policy it expects.
    assert (
        world.host_b.verify_quote(
            quote_a, expected_mr_enclave=body.mr_enclave, expected_mr_signer=body.mr_signer
        ).body
        == verified.body
    )


def test_quote_layout(quote_a: bytes) -> None:
    version, key_type = struct.unpack_from("<HH", quote_a)
    assert (version, key_type) == (QUOTE_VERSION, ATT_KEY_TYPE_ECDSA_P256) == (3, 2)
    assert quote_a[HEADER_END + 64 : HEADER_END + 96] == report_body().mr_enclave
    assert quote_a[HEADER_END + 128 : HEADER_END + 160] == report_body().mr_signer
    assert quote_a[HEADER_END + 320 : BODY_END] == report_body().report_data
    assert struct.unpack_from("<I", quote_a, BODY_END)[0] == len(quote_a) - SIG_START
    assert quote_a[QE_REPORT + 64 : QE_REPORT + 96] == QE_MR_ENCLAVE
    assert quote_a[QE_REPORT + 128 : QE_REPORT + 160] == QE_MR_SIGNER
    assert struct.unpack_from("<H", quote_a, AUTH_SIZE) == (32,)
    assert quote_a[AUTH_DATA:CERT_TYPE] == bytes(range(32))
    assert struct.unpack_from("<HI", quote_a, CERT_TYPE) == (5, len(quote_a) - CHAIN)
    assert quote_a[CHAIN:].startswith(b"-----BEGIN CERTIFICATE-----")
    assert Quote.parse(quote_a).pack() == quote_a


def test_quotes_of_two_hosts_differ_in_key_and_pck(world: World, quote_a: bytes) -> None:
    qa, qb = Quote.parse(quote_a), Quote.parse(_quote(world.host_b))
    assert qa.attestation_key != qb.attestation_key
    assert verify_quote(qb.pack(), _roots(world)).pck_subject == "CN=migsgx PCK b,O=migsgx"


# --- flipped bits, part by part -----------------------------------------------------------
_REGIONS: list[tuple[str, int, int | None, tuple[type[AttestationError], ...]]] = [
    ("version", 0, 2, (QuoteFormatError,)),
    ("key type", 2, 4, (QuoteFormatError,)),
    ("header", 4, HEADER_END, (QuoteSignatureError,)),  # reserved, svns, vendor, user data
    ("body", HEADER_END, HEADER_END + 320, (QuoteSignatureError,)),
    ("report data", HEADER_END + 320, BODY_END, (QuoteSignatureError,)),
    ("signature length", BODY_END, SIG_START, (QuoteFormatError,)),
    ("isv signature", SIG_START, ATT_KEY, (QuoteSignatureError,)),
    ("attestation key", ATT_KEY, QE_REPORT, (QuoteSignatureError,)),
    ("qe report", QE_REPORT, QE_SIG, (QuoteSignatureError,)),
    ("qe signature", QE_SIG, AUTH_SIZE, (QuoteSignatureError,)),
    ("qe auth size", AUTH_SIZE, AUTH_DATA, (QuoteFormatError,)),
    ("qe auth data", AUTH_DATA, CERT_TYPE, (QuoteSignatureError,)),
    ("cert type and size", CERT_TYPE, CHAIN, (QuoteFormatError,)),
]


@pytest.mark.parametrize(("part", "start", "end", "errors"), _REGIONS, ids=[r[0] for r in _REGIONS])
def test_every_flipped_bit_is_caught(
    world: World,
    quote_a: bytes,
    part: str,
    start: int,
    end: int,
    errors: tuple[type[AttestationError], ...],
) -> None:
    for pos in range(start, end):
        for bit in (0, 7):
            flipped = bytearray(quote_a)
            flipped[pos] ^= 1 << bit
            with pytest.raises(errors):
                verify_quote(bytes(flipped), _roots(world))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flipped_bits_in_the_chain_never_change_the_pck(world: World, quote_a: bytes) -> None:
    """The chain is not signed by the quote: its certificates carry their own signatures.
    A flip either fails, or it hit bytes that are not the PCK certificate (PEM line
    breaks, the redundant root certificate), and the same PCK vouches for the quote."""

    leaf = x509.load_pem_x509_certificates(quote_a[CHAIN:])[0]
    failures = 0
    for pos in range(CHAIN, len(quote_a), 2):
        flipped = bytearray(quote_a)
        flipped[pos] ^= 1
        try:
            verify_quote(bytes(flipped), _roots(world))
        except (QuoteFormatError, UnknownCAError, QuoteSignatureError):
            failures += 1
            continue
        assert x509.load_pem_x509_certificates(bytes(flipped[CHAIN:]))[0] == leaf
    assert failures > (len(quote_a) - CHAIN) // 4


def test_debug_bit_flip_is_a_signature_error_not_a_policy_one(world: World, quote_a: bytes) -> None:
    flipped = bytearray(quote_a)
    flipped[HEADER_END + 48] ^= FLAG_DEBUG  # attributes.flags of the enclave
    with pytest.raises(QuoteSignatureError):
        verify_quote(bytes(flipped), _roots(world), allow_debug=True)


# --- truncated and extended ---------------------------------------------------------------
def test_truncated_quotes(world: World, quote_a: bytes) -> None:
    for n in [*range(0, CHAIN + 8, 7), len(quote_a) - 1]:
        with pytest.raises(QuoteFormatError):
            verify_quote(quote_a[:n], _roots(world))


@pytest.mark.parametrize("extra", [b"\0", b"x" * 100, b"-----BEGIN CERTIFICATE-----\n"])
def test_extended_quotes(world: World, quote_a: bytes, extra: bytes) -> None:
    with pytest.raises(QuoteFormatError):
        verify_quote(quote_a + extra, _roots(world))


def test_oversize_and_non_bytes(world: World) -> None:
    with pytest.raises(QuoteFormatError):
        verify_quote(bytes(MAX_QUOTE_SIZE + 1), _roots(world))
    with pytest.raises(QuoteFormatError):
        verify_quote("quote", _roots(world))  # type: ignore[arg-type]


def test_consistent_lengths_but_garbage_chain(world: World, quote_a: bytes) -> None:
    q = Quote.parse(quote_a)
    for chain in (
        b"",
        b"not pem",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ):
        with pytest.raises(QuoteFormatError):
            verify_quote(replace(q, cert_chain_pem=chain).pack(), _roots(world))


# --- policy ---------------------------------------------------------------------------------
def test_debug_enclave_refused_unless_allowed(world: World) -> None:
    quote = _quote(world.host_a, report_body(debug=True))
    with pytest.raises(DebugEnclaveError):
        verify_quote(quote, _roots(world))
    assert verify_quote(quote, _roots(world), allow_debug=True).body.attributes.debug


def test_expected_identity(world: World, quote_a: bytes) -> None:
    body = report_body()
    with pytest.raises(IdentityMismatchError):
        verify_quote(quote_a, _roots(world), expected_mr_enclave=bytes(32))
    # The "wrong signer" attack: the right code, signed by someone else.
    with pytest.raises(IdentityMismatchError):
        verify_quote(
            quote_a,
            _roots(world),
            expected_mr_enclave=body.mr_enclave,
            expected_mr_signer=hashlib.sha256(b"attacker").digest(),
        )
    verify_quote(
        quote_a,
        _roots(world),
        expected_mr_enclave=body.mr_enclave,
        expected_mr_signer=body.mr_signer,
    )


# --- certificates ---------------------------------------------------------------------------
def test_no_trusted_roots(quote_a: bytes) -> None:
    with pytest.raises(UnknownCAError):
        verify_quote(quote_a, [])


def test_quote_from_another_ca(world: World, tmp_path: object, quote_a: bytes) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    other_ca = ProvisioningCA.init(root / "ca", common_name="someone else's CA")
    other = EmulatedPlatform.init(root / "host", other_ca, host_id="x")
    with pytest.raises(UnknownCAError):
        verify_quote(_quote(other), _roots(world))
    # And the other way round.
    with pytest.raises(UnknownCAError):
        verify_quote(quote_a, [other_ca.certificate])


def test_attacker_ca_with_the_same_subject_name(world: World, tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    fake_ca = ProvisioningCA.init(root / "ca")  # the default name: same subject as the real CA
    assert fake_ca.certificate.subject == world.ca.certificate.subject
    fake_host = EmulatedPlatform.init(root / "host", fake_ca, host_id="a")
    quote = _quote(fake_host)
    with pytest.raises(UnknownCAError):
        verify_quote(quote, _roots(world))
    # Only the PCK certificate: the verifier finds the real root by name, and its key
    # does not verify the PCK's signature.
    q = Quote.parse(quote)
    leaf_only = x509.load_pem_x509_certificates(q.cert_chain_pem)[0].public_bytes(PEM)
    with pytest.raises(UnknownCAError):
        verify_quote(replace(q, cert_chain_pem=leaf_only).pack(), _roots(world))
    # With the real root's certificate appended to the fake chain.
    padded = q.cert_chain_pem + world.ca.certificate.public_bytes(PEM)
    with pytest.raises((UnknownCAError, QuoteSignatureError)):
        verify_quote(replace(q, cert_chain_pem=padded).pack(), _roots(world))


def test_chain_may_omit_the_root(world: World, quote_a: bytes) -> None:
    q = Quote.parse(quote_a)
    certs = x509.load_pem_x509_certificates(q.cert_chain_pem)
    without_root = b"".join(c.public_bytes(PEM) for c in certs[:2])
    assert verify_quote(replace(q, cert_chain_pem=without_root).pack(), _roots(world))


def test_expired_and_not_yet_valid_certificates(world: World, quote_a: bytes) -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(UnknownCAError):
        verify_quote(quote_a, _roots(world), now=now + dt.timedelta(days=3651))
    with pytest.raises(UnknownCAError):
        verify_quote(quote_a, _roots(world), now=now - dt.timedelta(days=1))
    assert verify_quote(quote_a, _roots(world), now=now + dt.timedelta(days=3000))


# --- hand-made chains -----------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool | None = None,
    path_length: int | None = None,
    sgx: bool = False,
    cert_sign: bool | None = None,
    days: tuple[int, int] = (-1, 30),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject if issuer is not None else _name(cn))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    if cert_sign is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if sgx:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(SGX_EXTENSIONS_OID, b"\x30\x00"), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _quote_with_chain(
    pck_key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate]
) -> bytes:
    deriver = KeyDeriver(os.urandom(32))
    pem = b"".join(c.public_bytes(PEM) for c in chain)
    qe = QuotingEnclave(deriver, _key(), pck_key, pem, b"h")
    report = deriver.ereport(report_body(), target_info_of(qe.identity), report_body().report_data)
    return qe.quote(report)


@pytest.fixture(scope="module")
def root_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    return _cert("root", key.public_key(), None, key, ca=True, path_length=0, cert_sign=True), key


def test_hand_made_chain_verifies(
    root_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    root, root_key = root_ca
    pck = _key()
    leaf = _cert("pck", pck.public_key(), root, root_key, ca=False, sgx=True)
    assert verify_quote(_quote_with_chain(pck, [leaf, root]), [root]).pck_subject == "CN=pck"


def test_a_non_pck_certificate_of_the_ca_cannot_sign_quotes(
    world: World, root_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> None:
    """The CA also certifies the hosts' agents for mutual TLS; an agent's key is in
    untrusted hands and must not be able to vouch for a quoting enclave."""

    tls_key = _key()
    tls = world.ca.issue_tls(tls_key.public_key(), "agent-a", ["127.0.0.1", "host-a"])
    assert not any(e.oid == SGX_EXTENSIONS_OID for e in tls.extensions)
    forged = _quote_with_chain(tls_key, [tls, world.ca.certificate])
    with pytest.raises(UnknownCAError):
        verify_quote(forged, _roots(world))
    # A leaf without the SGX extensions is refused whoever issued it.
    root, root_key = root_ca
    plain_key = _key()
    plain = _cert("plain", plain_key.public_key(), root, root_key, ca=False)
    with pytest.raises(UnknownCAError):
        verify_quote(_quote_with_chain(plain_key, [plain, root]), [root])


def test_a_leaf_cannot_act_as_a_ca(world: World) -> None:
    """The agent's TLS key issues a 'PCK' certificate, SGX extensions and all."""

    tls_key = _key()
    tls = world.ca.issue_tls(tls_key.public_key(), "agent-a", [])
    pck = _key()
    fake = _cert("fake pck", pck.public_key(), tls, tls_key, ca=False, sgx=True)
    forged = _quote_with_chain(pck, [fake, tls, world.ca.certificate])
    with pytest.raises(UnknownCAError):
        verify_quote(forged, _roots(world))


def test_ca_path_length_is_enforced(
    root_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    root, root_key = root_ca  # path length 0: no intermediate CA below it
    mid_key = _key()
    mid = _cert("intermediate", mid_key.public_key(), root, root_key, ca=True, cert_sign=True)
    pck = _key()
    leaf = _cert("pck", pck.public_key(), mid, mid_key, ca=False, sgx=True)
    with pytest.raises(UnknownCAError):
        verify_quote(_quote_with_chain(pck, [leaf, mid, root]), [root])
    # Below a root without a path length limit the same chain is fine.
    open_key = _key()
    open_root = _cert("open root", open_key.public_key(), None, open_key, ca=True, cert_sign=True)
    mid2 = _cert("intermediate", mid_key.public_key(), open_root, open_key, ca=True)
    leaf2 = _cert("pck", pck.public_key(), mid2, mid_key, ca=False, sgx=True)
    assert verify_quote(_quote_with_chain(pck, [leaf2, mid2]), [open_root])


def test_issuer_without_cert_sign_usage_refused() -> None:
    key = _key()
    root = _cert("root", key.public_key(), None, key, ca=True, cert_sign=False)
    pck = _key()
    leaf = _cert("pck", pck.public_key(), root, key, ca=False, sgx=True)
    with pytest.raises(UnknownCAError):
        verify_quote(_quote_with_chain(pck, [leaf]), [root])


def test_pck_that_is_a_ca_refused(
    root_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    root, root_key = root_ca
    pck = _key()
    leaf = _cert("pck", pck.public_key(), root, root_key, ca=True, sgx=True)
    with pytest.raises(UnknownCAError):
        verify_quote(_quote_with_chain(pck, [leaf]), [root])


def test_expired_root_refused() -> None:
    key = _key()
    root = _cert("old root", key.public_key(), None, key, ca=True, days=(-30, -1))
    pck = _key()
    leaf = _cert("pck", pck.public_key(), root, key, ca=False, sgx=True)
    with pytest.raises(UnknownCAError):
        verify_quote(_quote_with_chain(pck, [leaf]), [root])


def test_expired_pck_refused(
    root_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    root, root_key = root_ca
    pck = _key()
    leaf = _cert("pck", pck.public_key(), root, root_key, ca=False, sgx=True, days=(-30, -1))
    with pytest.raises(UnknownCAError):
        verify_quote(_quote_with_chain(pck, [leaf, root]), [root])


def test_quoting_enclave_identity_is_checked(world: World, quote_a: bytes) -> None:
    """A QE report with another MRSIGNER, properly signed by the host's PCK key."""

    pck_key = serialization.load_pem_private_key(
        (world.host_a.state_dir / PCK_KEY).read_bytes(), password=None
    )
    assert isinstance(pck_key, ec.EllipticCurvePrivateKey)
    q = Quote.parse(quote_a)
    for change in (
        {"mr_signer": hashlib.sha256(b"not the QE author").digest()},
        {"isv_prod_id": 9},
        {"attributes": Attributes(FLAG_INIT | FLAG_DEBUG | FLAG_MODE64BIT)},
    ):
        qe_body = replace(q.qe_report_body, **change)  # type: ignore[arg-type]
        der = pck_key.sign(qe_body.pack(), ec.ECDSA(hashes.SHA256()))
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        r, s = decode_dss_signature(der)
        forged = replace(
            q, qe_report_body=qe_body, qe_report_sig=r.to_bytes(32, "big") + s.to_bytes(32, "big")
        )
        with pytest.raises(IdentityMismatchError):
            verify_quote(forged.pack(), _roots(world))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 1 << 16),
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_quotes_raise_only_attestation_errors(
    edits: list[tuple[int, int]], cut: int
) -> None:
    world = shared_world()
    quote = _QUOTE_CACHE.setdefault("a", _quote(world.host_a))
    mutated = bytearray(quote)
    for pos, value in edits:
        mutated[pos % len(mutated)] = value
    if cut % 3 == 0:
        del mutated[cut % len(mutated) :]
    try:
        verify_quote(bytes(mutated), _roots(world))
    except AttestationError:
        pass


_QUOTE_CACHE: dict[str, bytes] = {}
