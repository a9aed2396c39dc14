"""The provisioning CA: the root every host of a deployment trusts.

It plays Intel's part, with Intel's shape (see ``docs/platform.md``):

    root CA (``ca.pem``)  ─┬─ PCK processor CA (``pck-ca.pem``) ── PCK leaf per host,
                           │                                      with the SGX extension
                           ├─ TCB signing (``tcb-signing.pem``): signs TCB info and QE identity
                           └─ agents' TLS certificates (not Intel's; an agent key is untrusted)

``migsgx ca init`` makes all three keys; ``migsgx platform init`` gets a PCK
certificate for the host's provisioning key, stating its TCB level
(:mod:`.sgxext`); the collateral a verifier needs (TCB info, QE identity, CRLs)
is published from the CA's state by :mod:`.pcs`.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .._fs import read_private, write_private
from ..errors import StateDirError
from .sgxext import SGX_EXTENSIONS_OID, PckExtension

CA_KEY = "ca-key.pem"
CA_CERT = "ca.pem"
PCK_CA_KEY = "pck-ca-key.pem"
PCK_CA_CERT = "pck-ca.pem"
TCB_KEY = "tcb-signing-key.pem"
TCB_CERT = "tcb-signing.pem"
_VALIDITY = _dt.timedelta(days=3650)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "migsgx"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(read_private(path), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateDirError(f"{path} is not an EC private key")
    return key


@dataclass(frozen=True)
class Signer:
    """A key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


@dataclass
class ProvisioningCA:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    pck_ca: Signer
    tcb_signer: Signer
    directory: Path

    @classmethod
    def init(
        cls, directory: Path, *, common_name: str = "migsgx provisioning CA"
    ) -> ProvisioningCA:
        from . import pcs

        directory = Path(directory)
        if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
            raise StateDirError(f"{directory} already holds a CA; refusing to overwrite it")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        # Path length 1: the PCK processor CA sits between the root and the PCK leaves.
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        root = Signer(key, cert)
        pck_key = ec.generate_private_key(ec.SECP256R1())
        pck_cert = _issue(
            root, pck_key.public_key(), "migsgx PCK Processor CA", ca=True, usage=None
        )
        tcb_key = ec.generate_private_key(ec.SECP256R1())
        tcb_cert = _issue(root, tcb_key.public_key(), "migsgx TCB Signing", ca=False, usage=None)
        pem = serialization.Encoding.PEM
        for name, k in ((PCK_CA_KEY, pck_key), (TCB_KEY, tcb_key)):
            write_private(directory / name, _pem_key(k))
        for name, c in ((PCK_CA_CERT, pck_cert), (TCB_CERT, tcb_cert)):
            write_private(directory / name, c.public_bytes(pem), mode=0o644)
        write_private(directory / CA_KEY, _pem_key(key))
        write_private(directory / CA_CERT, cert.public_bytes(pem), mode=0o644)
        authority = cls(key, cert, Signer(pck_key, pck_cert), Signer(tcb_key, tcb_cert), directory)
        pcs.PcsState.create(directory)
        pcs.publish(authority)
        return authority

    @classmethod
    def load(cls, directory: Path) -> ProvisioningCA:
        directory = Path(directory)
        try:
            key = _load_key(directory / CA_KEY)
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            pck = Signer(
                _load_key(directory / PCK_CA_KEY),
                x509.load_pem_x509_certificate((directory / PCK_CA_CERT).read_bytes()),
            )
            tcb = Signer(
                _load_key(directory / TCB_KEY),
                x509.load_pem_x509_certificate((directory / TCB_CERT).read_bytes()),
            )
        except FileNotFoundError as exc:
            raise StateDirError(
                f"{directory} is not a CA directory (run `migsgx ca init --dir {directory}`)"
            ) from exc
        return cls(key, cert, pck, tcb, directory)

    @property
    def root(self) -> Signer:
        return Signer(self.key, self.certificate)

    def pck_chain_pem(self) -> bytes:
        """The chain above a PCK leaf: processor CA, then root (as Intel's PCS gives it)."""

        pem = serialization.Encoding.PEM
        return self.pck_ca.certificate.public_bytes(pem) + self.certificate.public_bytes(pem)

    def issue_pck(
        self, public_key: ec.EllipticCurvePublicKey, host_id: str, *, tcb_level: int | None = None
    ) -> x509.Certificate:
        """PCK certificate for a host's provisioning key, at TCB level ``tcb_level``.

        Like Intel's it carries the SGX extension (FMSPC, TCB components and
        PCESVN, PCE-ID, PPID), is issued by the PCK processor CA, and is recorded
        in the CA's state so that ``migsgx ca revoke HOST`` can revoke it.  Quote
        verification accepts only a leaf that carries the extension, so no other
        certificate of this CA can sign quotes.
        """

        from . import pcs

        def issue(ext: PckExtension) -> x509.Certificate:
            return _issue(
                self.pck_ca,
                public_key,
                f"migsgx PCK {host_id}",
                ca=False,
                usage=None,
                sgx=ext,
            )

        return pcs.register_host(self.directory, host_id, tcb_level, issue)

    def issue_tls(
        self, public_key: ec.EllipticCurvePublicKey, host_id: str, names: list[str]
    ) -> x509.Certificate:
        """Certificate for a host agent's mutual-TLS endpoint."""

        import ipaddress

        general: list[x509.GeneralName] = []
        for n in names:
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                general.append(x509.DNSName(n))
        return _issue(
            self.root,
            public_key,
            f"migsgx agent {host_id}",
            ca=False,
            usage=x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            san=x509.SubjectAlternativeName(general) if general else None,
        )


def _issue(
    issuer: Signer,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    *,
    ca: bool,
    usage: x509.ExtendedKeyUsage | None,
    san: x509.SubjectAlternativeName | None = None,
    sgx: PckExtension | None = None,
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        builder = builder.add_extension(_usage(cert_sign=True), critical=True)
    if usage is not None:
        builder = builder.add_extension(usage, critical=False)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    if sgx is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(SGX_EXTENSIONS_OID, sgx.to_der()), critical=False
        )
    return builder.sign(issuer.key, hashes.SHA256())


def load_root(path: Path) -> x509.Certificate:
    """Load a trusted root certificate (a CA directory or a PEM file)."""

    path = Path(path)
    if path.is_dir():
        path = path / CA_CERT
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise StateDirError(f"no CA certificate at {path}") from exc
    except ValueError as exc:
        raise StateDirError(f"{path} is not a PEM certificate") from exc
