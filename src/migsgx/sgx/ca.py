"""The provisioning CA: the root every host of a deployment trusts.

It stands in for Intel's PCK certificate chain.  ``migsgx ca init`` makes a
self-signed ECDSA P-256 root; each emulated host gets a PCK certificate for its
provisioning key from it (``migsgx platform init``), and the same CA can issue
TLS certificates for the per-host agents.  Quote verification trusts a root by
its certificate, given by the operator.
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

CA_KEY = "ca-key.pem"
# Intel's SGX extensions OID, which marks PCK certificates (see issue_pck).
SGX_EXTENSIONS_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
CA_CERT = "ca.pem"
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


@dataclass
class ProvisioningCA:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def init(
        cls, directory: Path, *, common_name: str = "migsgx provisioning CA"
    ) -> ProvisioningCA:
        directory = Path(directory)
        if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
            raise StateDirError(f"{directory} already holds a CA; refusing to overwrite it")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        write_private(
            directory / CA_KEY,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        write_private(
            directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644
        )
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> ProvisioningCA:
        directory = Path(directory)
        try:
            key_pem = read_private(directory / CA_KEY)
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        except FileNotFoundError as exc:
            raise StateDirError(
                f"{directory} is not a CA directory (run `migsgx ca init --dir {directory}`)"
            ) from exc
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise StateDirError(f"{directory / CA_KEY} is not an EC private key")
        return cls(key, cert)

    def _leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        *,
        usage: x509.ExtendedKeyUsage | None,
        san: x509.SubjectAlternativeName | None = None,
        sgx_extensions: bool = False,
    ) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if usage is not None:
            builder = builder.add_extension(usage, critical=False)
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        if sgx_extensions:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(SGX_EXTENSIONS_OID, b"\x30\x00"), critical=False
            )
        return builder.sign(self.key, hashes.SHA256())

    def issue_pck(self, public_key: ec.EllipticCurvePublicKey, host_id: str) -> x509.Certificate:
        """Certificate for a host's provisioning (PCK) key.

        Like Intel's PCK certificates it carries the SGX extensions (OID
        1.2.840.113741.1.13.1, here an empty SEQUENCE); quote verification accepts
        only a leaf that does, so no other certificate of this CA can sign quotes.
        """

        return self._leaf(public_key, f"migsgx PCK {host_id}", usage=None, sgx_extensions=True)

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
        return self._leaf(
            public_key,
            f"migsgx agent {host_id}",
            usage=x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            san=x509.SubjectAlternativeName(general) if general else None,
        )


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
