"""DCAP ECDSA quotes, version 3: building (the emulated quoting enclave) and verifying.

Byte layout (all integers little-endian), as in Intel's DCAP ``sgx_quote_3.h``::

    header (48)      version u16 = 3 | att_key_type u16 = 2 (ECDSA-256 P-256)
                     | reserved u32 = 0 | qe_svn u16 | pce_svn u16
                     | qe_vendor_id 16 | user_data 20
    report body (384)                 the attested enclave (sgx_report_body_t)
    signature_data_len u32
    signature data   isv_report_sig 64   ECDSA r||s (big-endian) over header||body,
                                         by the attestation key
                     attestation_key 64  x||y of the attestation key
                     qe_report 384       the quoting enclave's report body; its
                                         report_data = SHA-256(attestation_key ||
                                         qe_auth_data) || 32 zero bytes
                     qe_report_sig 64    ECDSA r||s over qe_report, by the PCK key
                     qe_auth_size u16 | qe_auth_data
                     cert_type u16 = 5 | cert_size u32 | PEM chain (PCK leaf first)

The verifier is the code a hardware back end would use unchanged: it walks the
chain to a trusted root, checks the QE report with the PCK key, checks that the
QE report binds the attestation key, checks the QE's identity, then checks the
enclave's report with the attestation key.  Each failure has its own error type.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ..errors import (
    DebugEnclaveError,
    IdentityMismatchError,
    QuoteFormatError,
    QuoteSignatureError,
    UnknownCAError,
)
from .keys import KeyDeriver
from .sgxext import SGX_EXTENSIONS_OID
from .structs import REPORT_BODY_SIZE, Attributes, Report, ReportBody

QUOTE_VERSION = 3
ATT_KEY_TYPE_ECDSA_P256 = 2
CERT_TYPE_PCK_CHAIN = 5
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
MAX_QUOTE_SIZE = 64 * 1024

HEADER = struct.Struct("<HHIHH16s20s")
assert HEADER.size == 48

# The emulated quoting enclave's identity; verifiers check it as they would
# check Intel's QE identity.
QE_MR_SIGNER = hashlib.sha256(b"migsgx emulated quoting enclave signer v1").digest()
QE_MR_ENCLAVE = hashlib.sha256(b"migsgx emulated quoting enclave v1").digest()
QE_PROD_ID = 1
QE_SVN = 1
PCE_SVN = 1
QE_AUTH_DATA_SIZE = 32


def _sig_raw(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _sig_der(raw: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def _pub_raw(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]


def _pub_from_raw(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError as exc:
        raise QuoteFormatError("attestation key is not a P-256 point") from exc


def qe_identity() -> ReportBody:
    return ReportBody(
        mr_enclave=QE_MR_ENCLAVE,
        mr_signer=QE_MR_SIGNER,
        isv_prod_id=QE_PROD_ID,
        isv_svn=QE_SVN,
        attributes=Attributes(),
    )


@dataclass(frozen=True)
class Quote:
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    report_body: ReportBody
    isv_report_sig: bytes
    attestation_key: bytes
    qe_report_body: ReportBody
    qe_report_sig: bytes
    qe_auth_data: bytes
    cert_chain_pem: bytes
    # The header's reserved u32, kept as it came: the signature covers it.
    reserved: int = 0

    def header(self) -> bytes:
        return HEADER.pack(
            QUOTE_VERSION,
            ATT_KEY_TYPE_ECDSA_P256,
            self.reserved,
            self.qe_svn,
            self.pce_svn,
            self.qe_vendor_id,
            self.user_data,
        )

    def pack(self) -> bytes:
        sig_data = (
            self.isv_report_sig
            + self.attestation_key
            + self.qe_report_body.pack()
            + self.qe_report_sig
            + struct.pack("<H", len(self.qe_auth_data))
            + self.qe_auth_data
            + struct.pack("<HI", CERT_TYPE_PCK_CHAIN, len(self.cert_chain_pem))
            + self.cert_chain_pem
        )
        return self.header() + self.report_body.pack() + struct.pack("<I", len(sig_data)) + sig_data

    @classmethod
    def parse(cls, data: bytes) -> Quote:
        if not isinstance(data, bytes | bytearray):
            raise QuoteFormatError("quote must be bytes")
        if len(data) > MAX_QUOTE_SIZE:
            raise QuoteFormatError(f"quote of {len(data)} bytes is larger than {MAX_QUOTE_SIZE}")
        data = bytes(data)
        fixed = HEADER.size + REPORT_BODY_SIZE + 4
        if len(data) < fixed:
            raise QuoteFormatError("quote is truncated")
        version, key_type, reserved, qe_svn, pce_svn, vendor, user_data = HEADER.unpack_from(data)
        if version != QUOTE_VERSION:
            raise QuoteFormatError(f"unsupported quote version {version}")
        if key_type != ATT_KEY_TYPE_ECDSA_P256:
            raise QuoteFormatError(f"unsupported attestation key type {key_type}")
        body = ReportBody.unpack(data[HEADER.size : HEADER.size + REPORT_BODY_SIZE])
        (sig_len,) = struct.unpack_from("<I", data, HEADER.size + REPORT_BODY_SIZE)
        sig = data[fixed:]
        if len(sig) != sig_len:
            raise QuoteFormatError("signature data length does not match the quote size")
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            if pos + n > len(sig):
                raise QuoteFormatError("quote signature data is truncated")
            out = sig[pos : pos + n]
            pos += n
            return out

        isv_sig = take(64)
        att_key = take(64)
        qe_report = ReportBody.unpack(take(REPORT_BODY_SIZE))
        qe_sig = take(64)
        (auth_len,) = struct.unpack("<H", take(2))
        auth = take(auth_len)
        cert_type, cert_len = struct.unpack("<HI", take(6))
        if cert_type != CERT_TYPE_PCK_CHAIN:
            raise QuoteFormatError(f"unsupported certification data type {cert_type}")
        chain = take(cert_len)
        if pos != len(sig):
            raise QuoteFormatError("trailing bytes after the certification data")
        return cls(
            qe_svn,
            pce_svn,
            vendor,
            user_data,
            body,
            isv_sig,
            att_key,
            qe_report,
            qe_sig,
            auth,
            chain,
            reserved,
        )


class QuotingEnclave:
    """The emulated QE: turns a REPORT targeted at it into a quote.

    Like Intel's QE it first verifies the REPORT (local attestation), so only
    an enclave running on this CPU can get a quote, and only about itself.
    """

    def __init__(
        self,
        deriver: KeyDeriver,
        attestation_key: ec.EllipticCurvePrivateKey,
        pck_key: ec.EllipticCurvePrivateKey,
        cert_chain_pem: bytes,
        platform_id: bytes,
    ) -> None:
        self._deriver = deriver
        self._att_key = attestation_key
        self._att_pub = _pub_raw(attestation_key.public_key())
        self._chain = cert_chain_pem
        self._identity = qe_identity()
        self._user_data = hashlib.sha256(platform_id).digest()[:16] + bytes(4)
        # 32 bytes of QE authentication data, as Intel's QE writes (bytes 0..31).
        auth = bytes(range(QE_AUTH_DATA_SIZE))
        qe_data = hashlib.sha256(self._att_pub + auth).digest() + bytes(32)
        self._qe_report = ReportBody(
            mr_enclave=self._identity.mr_enclave,
            mr_signer=self._identity.mr_signer,
            isv_prod_id=self._identity.isv_prod_id,
            isv_svn=self._identity.isv_svn,
            attributes=self._identity.attributes,
            cpu_svn=deriver.cpu_svn,
            report_data=qe_data,
        )
        self._qe_sig = _sig_raw(pck_key.sign(self._qe_report.pack(), ec.ECDSA(hashes.SHA256())))
        self._auth = auth

    @property
    def identity(self) -> ReportBody:
        return self._identity

    def quote(self, report: Report) -> bytes:
        body = self._deriver.verify_report(self._identity, report)
        q = Quote(
            qe_svn=QE_SVN,
            pce_svn=PCE_SVN,
            qe_vendor_id=INTEL_QE_VENDOR_ID,
            user_data=self._user_data,
            report_body=body,
            isv_report_sig=bytes(64),
            attestation_key=self._att_pub,
            qe_report_body=self._qe_report,
            qe_report_sig=self._qe_sig,
            qe_auth_data=self._auth,
            cert_chain_pem=self._chain,
        )
        signed = q.header() + body.pack()
        isv_sig = _sig_raw(self._att_key.sign(signed, ec.ECDSA(hashes.SHA256())))
        return Quote(**{**q.__dict__, "isv_report_sig": isv_sig}).pack()


@dataclass(frozen=True)
class VerifiedQuote:
    body: ReportBody
    pck_subject: str
    platform_user_data: bytes


def _load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise QuoteFormatError("certification data is not a PEM certificate chain") from exc
    if not certs:
        raise QuoteFormatError("empty certificate chain")
    # Certificates are parsed lazily: a malformed field would surface later as a bare
    # ValueError.  Touch every field the verifier reads, here, once.
    for cert in certs:
        try:
            cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
            cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
            list(cert.extensions)
            cert.public_key()
        except (
            ValueError,
            TypeError,
            UnsupportedAlgorithm,
            x509.DuplicateExtension,
            x509.InvalidVersion,
        ) as exc:
            raise QuoteFormatError("a certificate in the chain is malformed") from exc
    return certs


def _check_validity(cert: x509.Certificate, now: _dt.datetime) -> None:
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise UnknownCAError(f"certificate {cert.subject.rfc4514_string()} is not valid now")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_issuer(issuer: x509.Certificate, cas_below: int) -> None:
    """``issuer`` signed a certificate in the path: it must be a CA allowed to, with
    ``cas_below`` CA certificates between it and the leaf."""

    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    name = issuer.subject.rfc4514_string()
    if bc is None or not bc.ca:
        raise UnknownCAError(f"certificate {name} is not a CA and may not issue certificates")
    if bc.path_length is not None and cas_below > bc.path_length:
        raise UnknownCAError(f"certificate {name} exceeds its path length constraint")
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise UnknownCAError(f"certificate {name} may not sign certificates")


def _check_pck(leaf: x509.Certificate) -> None:
    """The leaf must be a PCK certificate, not any other certificate of the CA (such
    as an agent's TLS certificate, whose key is in untrusted hands)."""

    try:
        leaf.extensions.get_extension_for_oid(SGX_EXTENSIONS_OID)
    except x509.ExtensionNotFound:
        raise UnknownCAError(
            f"certificate {leaf.subject.rfc4514_string()} is not a PCK certificate"
        ) from None
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if bc.ca:
        raise UnknownCAError("the PCK certificate is a CA certificate")


def _verify_chain(
    chain: list[x509.Certificate], roots: Sequence[x509.Certificate], now: _dt.datetime
) -> x509.Certificate:
    """Walk leaf -> ... -> a trusted root; return the leaf (PCK) certificate.

    Every certificate that signs another on the path must be a CA (basic
    constraints, path length, key usage), every certificate on it must be valid
    now, trusted root included, and the leaf must be a PCK certificate.
    """

    for cert in chain:
        _check_validity(cert, now)
    leaf = chain[0]
    _check_pck(leaf)
    current = leaf
    rest = chain[1:]
    for cas_below in range(len(chain)):
        for root in roots:
            if root.subject == current.issuer and _issued_by(current, root):
                _check_issuer(root, cas_below)
                _check_validity(root, now)
                return leaf
        issuers = [c for c in rest if c.subject == current.issuer]
        if not issuers:
            break
        issuer = next((c for c in issuers if _issued_by(current, c)), None)
        if issuer is None:
            raise QuoteSignatureError("a certificate in the chain has a bad signature")
        _check_issuer(issuer, cas_below)
        rest = [c for c in rest if c is not issuer]
        current = issuer
    raise UnknownCAError("the quote's certificate chain does not lead to a trusted CA")


def verify_quote(
    quote: bytes,
    trusted_roots: Sequence[x509.Certificate],
    *,
    allow_debug: bool = False,
    expected_mr_enclave: bytes | None = None,
    expected_mr_signer: bytes | None = None,
    now: _dt.datetime | None = None,
) -> VerifiedQuote:
    """Verify a quote end to end; return the attested enclave's report body."""

    if not trusted_roots:
        raise UnknownCAError("no trusted provisioning CA configured")
    q = Quote.parse(quote)
    chain = _load_chain(q.cert_chain_pem)
    pck = _verify_chain(chain, trusted_roots, now or _dt.datetime.now(_dt.UTC))
    pck_key = pck.public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey):
        raise QuoteFormatError("PCK certificate does not hold an EC key")
    try:
        pck_key.verify(
            _sig_der(q.qe_report_sig), q.qe_report_body.pack(), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature as exc:
        raise QuoteSignatureError("QE report signature does not verify with the PCK key") from exc
    expected_qe_data = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + bytes(32)
    if q.qe_report_body.report_data != expected_qe_data:
        raise QuoteSignatureError("QE report does not bind the attestation key")
    qe = q.qe_report_body
    if qe.mr_signer != QE_MR_SIGNER or qe.isv_prod_id != QE_PROD_ID or qe.attributes.debug:
        raise IdentityMismatchError("the quote was not produced by a trusted quoting enclave")
    att_key = _pub_from_raw(q.attestation_key)
    try:
        att_key.verify(
            _sig_der(q.isv_report_sig), q.header() + q.report_body.pack(), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature as exc:
        raise QuoteSignatureError("enclave report signature does not verify") from exc
    body = q.report_body
    if body.attributes.debug and not allow_debug:
        raise DebugEnclaveError("the attested enclave is a debug enclave")
    if expected_mr_enclave is not None and body.mr_enclave != expected_mr_enclave:
        raise IdentityMismatchError(
            f"MRENCLAVE {body.mr_enclave.hex()} is not the expected {expected_mr_enclave.hex()}"
        )
    if expected_mr_signer is not None and body.mr_signer != expected_mr_signer:
        raise IdentityMismatchError(
            f"MRSIGNER {body.mr_signer.hex()} is not the expected {expected_mr_signer.hex()}"
        )
    return VerifiedQuote(body, pck.subject.rfc4514_string(), q.user_data)
