"""Quote verification of record: dcap-qvl, with the TCB status decided by policy.

migsgx's own verifier (:func:`.quote.verify_quote`) checks the structures it
needs and gives each failure its typed error; the verdict of record comes
from dcap-qvl, a third-party DCAP verifier, run with the deployment's root in
Intel's place and the collateral the CA published.  It walks the PCK chain
and the collateral's chains against the root and the CRLs, checks the QE's
identity and every signature, and matches the PCK certificate's TCB against
the TCB info, which yields a TCB status.  The status is then the policy's
call: UpToDate by default, more only where the enclave's measured manifest
allows it, Revoked never.

With a hardware back end the same code runs with Intel's root certificate and
collateral from Intel's PCS (or a PCCS); see ``docs/platform.md``.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import (
    AttestationError,
    CollateralError,
    DebugEnclaveError,
    IdentityMismatchError,
    QuoteFormatError,
    QuoteSignatureError,
    RevokedError,
    StaleCollateralError,
    TcbOutOfDateError,
    TcbStatusError,
    UnknownCAError,
)
from .collateral import Collateral
from .quote import Quote, verify_quote
from .structs import ReportBody
from .tcb_status import ACCEPTABLE_STATUSES, REVOKED, UP_TO_DATE

# The status of a debug enclave's quote, which dcap-qvl does not rate.
DEBUG_UNRATED = "DebugUnrated"

# dcap-qvl reports failures as ValueError text; these fragments name its checks.
# First match wins, so the specific ones come first.
_DCAP_ERRORS: tuple[tuple[str, type[AttestationError]], ...] = (
    ("CertRevoked", RevokedError),
    ("TCB status is invalid: Revoked", RevokedError),
    ("expired", StaleCollateralError),
    ("Expired", StaleCollateralError),
    ("issue date is in the future", StaleCollateralError),
    ("UnknownRevocationStatus", CollateralError),
    ("Crl", CollateralError),
    ("UnknownIssuer", UnknownCAError),
    ("root ca", UnknownCAError),
    ("Debug mode", DebugEnclaveError),
    ("mismatch", IdentityMismatchError),
    ("Unknown QE vendor", IdentityMismatchError),
    ("No matching TCB level", TcbStatusError),
    ("CRL", CollateralError),
    ("TcbInfo", CollateralError),
    ("QeIdentity", CollateralError),
    ("ignature", QuoteSignatureError),
)


@dataclass(frozen=True)
class TcbPolicy:
    """Which TCB statuses a verifier accepts: UpToDate plus ``also``, never Revoked."""

    also: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        bad = set(self.also) - set(ACCEPTABLE_STATUSES)
        if bad:
            raise ValueError(f"TCB statuses that cannot be accepted: {sorted(bad)}")

    def check(self, status: str, advisories: Sequence[str] = (), *, who: str = "") -> None:
        if status == UP_TO_DATE or status in self.also:
            return
        detail = f" (advisories: {', '.join(advisories)})" if advisories else ""
        detail += f" [{who}]" if who else ""
        if status == REVOKED:
            raise RevokedError(f"the platform's TCB level is revoked{detail}", status=status)
        if status.startswith("OutOfDate"):
            raise TcbOutOfDateError(
                f"the platform's TCB is {status}{detail}; the policy accepts "
                f"{', '.join([UP_TO_DATE, *sorted(self.also)])}",
                status=status,
            )
        raise TcbStatusError(
            f"the platform's TCB status {status}{detail} is not accepted by the policy",
            status=status,
        )


@dataclass(frozen=True)
class DcapVerdict:
    body: ReportBody
    status: str
    advisory_ids: tuple[str, ...]
    pck_subject: str


def to_dcap(collateral: Collateral) -> dcap_qvl.QuoteCollateralV3:
    return dcap_qvl.QuoteCollateralV3(
        collateral.pck_crl_issuer_chain,
        collateral.root_ca_crl,
        collateral.pck_crl,
        collateral.tcb_info_issuer_chain,
        collateral.tcb_info,
        collateral.tcb_info_signature,
        collateral.qe_identity_issuer_chain,
        collateral.qe_identity,
        collateral.qe_identity_signature,
    )


def _dcap_error(exc: Exception) -> AttestationError:
    text = str(exc)
    for fragment, kind in _DCAP_ERRORS:
        if fragment in text:
            return kind(f"dcap-qvl refused the quote: {text}")
    return AttestationError(f"dcap-qvl refused the quote: {text}")


def _check_not_revoked(quote: bytes, collateral: Collateral) -> None:
    """The PCK leaf's serial against the PCK CRL, so revocation gets its own error.

    dcap-qvl checks the same (and is the verdict); this gives the reason a type.
    """

    try:
        leaf = x509.load_pem_x509_certificates(Quote.parse(quote).cert_chain_pem)[0]
        crl = x509.load_der_x509_crl(collateral.pck_crl)
    except ValueError as exc:
        raise CollateralError("the PCK CRL is not a DER CRL") from exc
    if (
        crl.issuer == leaf.issuer
        and crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    ):
        raise RevokedError(
            f"the PCK certificate {leaf.subject.rfc4514_string()} is revoked",
            serial=str(leaf.serial_number),
        )


def _root_of(quote: bytes, roots: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The trusted root that signed the top of the quote's chain (by key: two roots may
    share a name)."""

    try:
        chain = x509.load_pem_x509_certificates(Quote.parse(quote).cert_chain_pem)
    except ValueError as exc:
        raise QuoteFormatError("certification data is not a PEM certificate chain") from exc
    for cert in reversed(chain):
        for root in roots:
            if cert == root:
                return root
            try:
                cert.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return root
    return None


def select_collateral(
    root: x509.Certificate | None, collateral: Sequence[Collateral]
) -> Collateral:
    """The collateral published under ``root`` (a verifier that trusts several roots has
    one collateral per root): the one whose root CRL that root signed."""

    if not collateral:
        raise CollateralError("no verification collateral")
    if root is not None:
        key = root.public_key()
        for c in collateral:
            try:
                crl = x509.load_der_x509_crl(c.root_ca_crl)
                if isinstance(key, ec.EllipticCurvePublicKey) and crl.is_signature_valid(key):
                    return c
            except ValueError:
                continue
    return collateral[0]


def verify_dcap(
    quote: bytes,
    collateral: Collateral | Sequence[Collateral],
    trusted_roots: Sequence[x509.Certificate],
    *,
    policy: TcbPolicy | None = None,
    allow_debug: bool = False,
    now: _dt.datetime | None = None,
) -> DcapVerdict:
    """Verify ``quote`` end to end; raise a typed :class:`AttestationError` if it fails."""

    now = now or _dt.datetime.now(_dt.UTC)
    root = _root_of(quote, trusted_roots)
    if not isinstance(collateral, Collateral):
        collateral = select_collateral(root, collateral)
    collateral.check_fresh(now)
    verified = verify_quote(quote, trusted_roots, allow_debug=allow_debug, now=now)
    if root is None:  # verify_quote walked to a trusted root; this cannot be, but say so
        raise UnknownCAError("the quote's certificate chain does not lead to a trusted CA")
    _check_not_revoked(quote, collateral)
    if verified.body.attributes.debug:
        # dcap-qvl refuses every debug enclave.  One gets here only where the caller
        # allows debug (a debug build's own policy, development only): migsgx's
        # verifier and the CRL check above are all it gets, and no TCB status.
        return DcapVerdict(verified.body, DEBUG_UNRATED, (), verified.pck_subject)
    # The root the chain led to is the one dcap-qvl is given.
    try:
        report = dcap_qvl.verify_with_root_ca(
            quote,
            to_dcap(collateral),
            root.public_bytes(serialization.Encoding.DER),
            int(now.timestamp()),
        )
    except (ValueError, RuntimeError) as exc:
        raise _dcap_error(exc) from exc
    status = str(report.status)
    advisories = tuple(str(a) for a in report.advisory_ids)
    (policy or TcbPolicy()).check(status, advisories, who=verified.pck_subject)
    return DcapVerdict(verified.body, status, advisories, verified.pck_subject)
