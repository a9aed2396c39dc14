"""Mutual TLS between migration tools and agents, rooted in the deployment CA.

Each host has an agent identity in ``STATE/agent/``: a P-256 key (0600), its
certificate issued by the deployment's CA (:meth:`ProvisioningCA.issue_tls`,
both server and client use, the host's addresses as subject alternative
names) and the CA certificate.  The agent serves with it and the migration
tool on the same host dials with it, so both ends of every control
connection prove that they belong to the deployment.

Beyond the chain, a peer must present a leaf whose common name starts with
``migsgx agent`` and whose extended key usage names the role it plays: the
same CA also certifies hosts' PCK keys, and those must not open a control
channel.  TLS 1.3 only.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .._fs import write_private
from ..errors import ConfigError, ProtocolError, StateDirError, register_error

if TYPE_CHECKING:
    from cryptography import x509

# (X.509 and the CA are imported where a certificate is read or made: the TLS
# itself is the ``ssl`` module's, and ``migsgx recover`` with nothing to deliver
# never reads one; its start counts, docs/benchmarks.md)

__all__ = [
    "AGENT_DIR",
    "AgentIdentity",
    "PeerCertificateError",
    "check_peer",
    "client_context",
    "issue_agent_identity",
    "server_context",
]

AGENT_DIR: Final = "agent"
CERT_FILE: Final = "agent.pem"
KEY_FILE: Final = "agent-key.pem"
CA_FILE: Final = "ca.pem"
_CN_PREFIX: Final = "migsgx agent "


@register_error
class PeerCertificateError(ProtocolError):
    """The peer's certificate is not an agent certificate of this deployment."""

    code = "peer-certificate"


@dataclass(frozen=True)
class AgentIdentity:
    """Where one host's agent certificate, key and trusted CA live."""

    directory: Path
    trust: Path | None = None  # a CA certificate to trust instead of the one stored

    @classmethod
    def of_state(cls, state: Path, *, ca: Path | None = None) -> AgentIdentity:
        """``STATE/agent``; ``ca`` (a CA directory or PEM file) overrides its trusted CA."""

        if ca is not None and Path(ca).is_dir():
            from ..sgx.ca import CA_CERT

            ca = Path(ca) / CA_CERT
        return cls(Path(state) / AGENT_DIR, ca)

    @property
    def cert(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def ca(self) -> Path:
        return self.trust if self.trust is not None else self.directory / CA_FILE

    def check(self) -> AgentIdentity:
        for path in (self.cert, self.key, self.ca):
            if not path.is_file():
                raise StateDirError(
                    f"no agent identity in {self.directory} (missing {path.name}); "
                    "create one with `migsgx agent cert`",
                    missing=str(path),
                )
        if self.key.stat().st_mode & 0o077:
            raise StateDirError(f"{self.key} is accessible by group or others; expected 0600")
        return self

    def host_id(self) -> str:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        return _common_name(cert).removeprefix(_CN_PREFIX)


def issue_agent_identity(
    ca_dir: Path, state: Path, host_id: str, names: list[str]
) -> AgentIdentity:
    """Make ``STATE/agent/`` with a fresh key and a certificate from the CA in ``ca_dir``.

    ``names`` are the addresses (or DNS names) peers dial this agent at.
    """

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ..sgx.ca import CA_CERT, ProvisioningCA

    if not names:
        raise ConfigError("an agent certificate needs at least one address or name")
    authority = ProvisioningCA.load(Path(ca_dir))
    identity = AgentIdentity.of_state(state)
    identity.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = authority.issue_tls(key.public_key(), host_id, names)
    pem = serialization.Encoding.PEM
    write_private(
        identity.key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    write_private(identity.cert, cert.public_bytes(pem), mode=0o644)
    write_private(identity.ca, (Path(ca_dir) / CA_CERT).read_bytes(), mode=0o644)
    return identity


def _context(identity: AgentIdentity, purpose: int) -> ssl.SSLContext:
    identity.check()
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(identity.cert, identity.key)
        ctx.load_verify_locations(cafile=identity.ca)
    except (OSError, ssl.SSLError) as exc:
        raise StateDirError(
            f"cannot load the agent identity in {identity.directory}: {exc}"
        ) from exc
    return ctx


def server_context(identity: AgentIdentity) -> ssl.SSLContext:
    """The agent's side: a client certificate from the deployment CA is required."""

    return _context(identity, ssl.PROTOCOL_TLS_SERVER)


def client_context(identity: AgentIdentity) -> ssl.SSLContext:
    """The tool's side: the agent's certificate must name the address dialled."""

    ctx = _context(identity, ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    return ctx


def _common_name(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def check_peer(sock: ssl.SSLSocket, *, peer_is_server: bool) -> str:
    """Beyond the chain (checked by the handshake): an agent leaf for the right role.

    Returns the peer's host id (its common name without the prefix).
    """

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    der = sock.getpeercert(binary_form=True)
    if not der:
        raise PeerCertificateError("the peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    name = _common_name(cert)
    if not name.startswith(_CN_PREFIX):
        raise PeerCertificateError(f"the peer certificate {name!r} is not an agent certificate")
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise PeerCertificateError("the peer certificate has no extended key usage") from exc
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if peer_is_server else ExtendedKeyUsageOID.CLIENT_AUTH
    if wanted not in usage:
        raise PeerCertificateError("the peer certificate is not for this role")
    return name.removeprefix(_CN_PREFIX)


def wrap_server(ctx: ssl.SSLContext, conn: socket.socket, timeout: float) -> ssl.SSLSocket:
    """Handshake as the agent; a peer without a valid certificate is refused here."""

    conn.settimeout(timeout)
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        conn.close()
        raise PeerCertificateError(f"TLS handshake refused: {exc}") from exc
    try:
        check_peer(tls, peer_is_server=False)
    except PeerCertificateError:
        tls.close()
        raise
    return tls


def wrap_client(
    ctx: ssl.SSLContext, conn: socket.socket, server_name: str, timeout: float
) -> ssl.SSLSocket:
    conn.settimeout(timeout)
    try:
        tls = ctx.wrap_socket(conn, server_hostname=server_name)
    except ssl.SSLCertVerificationError as exc:
        conn.close()
        raise PeerCertificateError(f"the agent at {server_name} is not trusted: {exc}") from exc
    except (ssl.SSLError, OSError) as exc:
        conn.close()
        raise PeerCertificateError(f"TLS handshake with {server_name} failed: {exc}") from exc
    try:
        check_peer(tls, peer_is_server=True)
    except PeerCertificateError:
        tls.close()
        raise
    return tls
