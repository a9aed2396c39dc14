"""The emulated SGX platform: the software CPU behind the trusted seam.

The seam itself, :class:`~migsgx.sgx.trusted.TrustedServices` (what code inside
an enclave may ask of its platform), is in :mod:`migsgx.sgx.trusted`; a hardware
back end implements that module's protocol and never imports this one.

* :class:`EmulatedPlatform` is the emulated CPU of one host: it owns the host's
  root secret, provisioning and attestation keys and counters, verifies images
  before launch (EINIT), and hands out a :class:`TrustedServices` bound to the
  identity it measured, so an enclave can never ask in another's name.

The state directory of a host::

    platform.toml        host id, CPUSVN, TCB level, collateral location, launch allow list
    root.key             the fused root secret, 32 bytes, mode 0600
    pck-key.pem          provisioning certification key, 0600
    attestation-key.pem  the quoting enclave's attestation key, 0600
    pck-chain.pem        PCK certificate (PCK processor CA's), + that CA + the root
    ca.pem               the deployment's trusted root
    counters.cbor        monotonic counters and enclaves' sealed persistent records, 0600
    migrations.cbor      migration ids accepted before claims moved into counters.cbor
                         (still honoured), 0600
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tomllib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .._fs import read_private, write_private
from ..errors import CollateralError, StateDirError
from .ca import ProvisioningCA
from .claims import ClaimStore
from .collateral import COLLATERAL_FILE, MAX_COLLATERAL_SIZE
from .counters import COUNTERS as COUNTERS  # (re-exported: its home moved)
from .counters import CounterStore
from .image import EnclaveImage, SigStruct
from .keys import KeyDeriver
from .quote import QuotingEnclave, VerifiedQuote, verify_quote
from .store_types import Decision, RecordUpdate
from .structs import KeyRequest, Report, ReportBody, TargetInfo
from .trusted import counter_owner, target_info_of

ROOT_KEY = "root.key"
PLATFORM_TOML = "platform.toml"
PCK_KEY = "pck-key.pem"
ATT_KEY = "attestation-key.pem"
PCK_CHAIN = "pck-chain.pem"
CA_PEM = "ca.pem"
CLAIMS = "migrations.cbor"
DEFAULT_CPU_SVN = bytes([2] * 16)


@dataclass(frozen=True)
class PlatformInfo:
    host_id: str
    cpu_svn: bytes
    state_dir: Path
    # Where this host reads the published collateral (a PCCS's part), one per root.
    collateral: tuple[Path, ...] = ()


class EmulatedPlatform:
    """The emulated CPU, quoting enclave and counter service of one host."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        try:
            meta = tomllib.loads((self.state_dir / PLATFORM_TOML).read_text())
            root = read_private(self.state_dir / ROOT_KEY)
            pck = _load_ec(read_private(self.state_dir / PCK_KEY))
            att = _load_ec(read_private(self.state_dir / ATT_KEY))
            chain = (self.state_dir / PCK_CHAIN).read_bytes()
            self._roots = x509.load_pem_x509_certificates((self.state_dir / CA_PEM).read_bytes())
        except FileNotFoundError as exc:
            raise StateDirError(
                f"{self.state_dir} is not an initialised platform "
                f"(run `migsgx platform init --state {self.state_dir} --ca CA_DIR`)",
                missing=exc.filename,
            ) from exc
        except (tomllib.TOMLDecodeError, ValueError) as exc:
            raise StateDirError(f"platform state in {self.state_dir} is corrupt: {exc}") from exc
        try:
            self.info = PlatformInfo(
                host_id=str(meta["host_id"]),
                cpu_svn=bytes.fromhex(meta["cpu_svn"]),
                state_dir=self.state_dir,
                collateral=_paths(meta.get("collateral", [])),
            )
            self._deriver = KeyDeriver(root, self.info.cpu_svn)
            self.allowed_signers = frozenset(_signer(s) for s in meta.get("allowed_signers", []))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateDirError(f"platform state in {self.state_dir} is corrupt: {exc!r}") from exc
        self._att, self._pck = att, pck
        self._qe = QuotingEnclave(self._deriver, att, pck, chain, self.info.host_id.encode())
        self._chain_stamp = self._chain_mtime()
        self.counters = CounterStore(self.state_dir / COUNTERS)
        self.claims = ClaimStore(self.state_dir / CLAIMS)

    @classmethod
    def init(
        cls,
        state_dir: Path,
        ca: ProvisioningCA,
        *,
        host_id: str | None = None,
        cpu_svn: bytes = DEFAULT_CPU_SVN,
        tcb_level: int | None = None,
        allowed_signers: Iterable[bytes] = (),
    ) -> EmulatedPlatform:
        """Make a host's state; ``allowed_signers`` (MRSIGNERs) is its launch allow list."""

        state_dir = Path(state_dir)
        if (state_dir / ROOT_KEY).exists():
            raise StateDirError(f"{state_dir} already holds a platform; refusing to overwrite it")
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state_dir, 0o700)
        host_id = host_id or uuid.uuid4().hex[:12]
        pck = ec.generate_private_key(ec.SECP256R1())
        att = ec.generate_private_key(ec.SECP256R1())
        cert = ca.issue_pck(pck.public_key(), host_id, tcb_level=tcb_level)
        pem = serialization.Encoding.PEM
        write_private(state_dir / PCK_KEY, _pem_private(pck))
        write_private(state_dir / ATT_KEY, _pem_private(att))
        write_private(
            state_dir / PCK_CHAIN,
            cert.public_bytes(pem) + ca.pck_chain_pem(),
            mode=0o644,
        )
        write_private(state_dir / CA_PEM, ca.certificate.public_bytes(pem), mode=0o644)
        write_private(
            state_dir / PLATFORM_TOML,
            tomli_w.dumps(
                {
                    "host_id": host_id,
                    "cpu_svn": cpu_svn.hex(),
                    "collateral": [str((ca.directory / COLLATERAL_FILE).resolve())],
                    "allowed_signers": sorted(_signer(s).hex() for s in allowed_signers),
                }
            ).encode(),
            mode=0o644,
        )
        # The root secret last: its presence marks a complete platform.
        write_private(state_dir / ROOT_KEY, secrets.token_bytes(32))
        return cls(state_dir)

    def allow_signers(self, signers: Iterable[bytes]) -> None:
        """Add MRSIGNERs to the host's launch allow list (``platform.toml``)."""

        path = self.state_dir / PLATFORM_TOML
        meta = tomllib.loads(path.read_text())
        allowed = set(self.allowed_signers) | {_signer(s) for s in signers}
        meta["allowed_signers"] = sorted(s.hex() for s in allowed)
        write_private(path, tomli_w.dumps(meta).encode(), mode=0o644)
        self.allowed_signers = frozenset(allowed)

    # --- what the untrusted host sees ------------------------------------------
    @property
    def trusted_roots(self) -> list[x509.Certificate]:
        return list(self._roots)

    def reattach_ticket(self, identity: ReportBody) -> bytes:
        """A ticket by which an enclave process is taken back after a service restart.

        A MAC (under a key derived from the root secret) over the identity the
        platform measured at launch: a restarted service binds a reattaching
        enclave to exactly that identity, never to one the process claims.
        """

        nonce = secrets.token_bytes(16)
        return nonce + self._ticket_mac(identity, nonce)

    def reattach_identity(self, packed: bytes, ticket: bytes) -> ReportBody | None:
        """The identity a valid ticket was issued for, or None."""

        if len(ticket) != 48:
            return None
        identity = ReportBody.unpack(packed)
        nonce, mac = ticket[:16], ticket[16:]
        return identity if hmac.compare_digest(mac, self._ticket_mac(identity, nonce)) else None

    def _ticket_mac(self, identity: ReportBody, nonce: bytes) -> bytes:
        key = self._deriver.reattach_key()
        return hmac.new(key, identity.pack() + nonce, hashlib.sha256).digest()

    def collateral(self) -> list[bytes]:
        """The collateral as the CAs last published it, read fresh on every call so
        that a revocation or a TCB recovery reaches verifiers at once."""

        if not self.info.collateral:
            raise CollateralError(f"platform {self.info.host_id} has no collateral source")
        out = []
        for path in self.info.collateral:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CollateralError(f"cannot read collateral at {path}: {exc.strerror}") from exc
            if len(data) > MAX_COLLATERAL_SIZE:
                raise CollateralError(f"collateral at {path} is too large")
            out.append(data)
        return out

    def set_tcb_level(self, ca: ProvisioningCA, level: int) -> None:
        """Move this host to another TCB level, as a microcode update or TCB recovery
        does: the CA issues a new PCK certificate for the same PCK key, at ``level``."""

        pck = _load_ec(read_private(self.state_dir / PCK_KEY))
        cert = ca.issue_pck(pck.public_key(), self.info.host_id, tcb_level=level)
        write_private(
            self.state_dir / PCK_CHAIN,
            cert.public_bytes(serialization.Encoding.PEM) + ca.pck_chain_pem(),
            mode=0o644,
        )

    def einit(self, image: EnclaveImage) -> tuple[ReportBody, SigStruct]:
        """Verify an image as EINIT does; return the identity it will run as."""

        sig = image.verify()
        m = image.manifest
        identity = ReportBody(
            mr_enclave=sig.mr_enclave,
            mr_signer=sig.mr_signer,
            attributes=m.attributes,
            isv_prod_id=m.product_id,
            isv_svn=m.svn,
            cpu_svn=self.info.cpu_svn,
        )
        return identity, sig

    def services_for(self, identity: ReportBody) -> LocalServices:
        return LocalServices(self, identity)

    def verify_quote(self, quote: bytes, **policy: object) -> VerifiedQuote:
        return verify_quote(quote, self._roots, **policy)  # type: ignore[arg-type]

    # --- the CPU, on behalf of a measured enclave -----------------------------
    def egetkey(self, caller: ReportBody, request: KeyRequest) -> bytes:
        return self._deriver.egetkey(caller, request)

    def ereport(self, caller: ReportBody, target: TargetInfo, report_data: bytes) -> Report:
        return self._deriver.ereport(caller, target, report_data)

    def _chain_mtime(self) -> int:
        return (self.state_dir / PCK_CHAIN).stat().st_mtime_ns

    def _current_qe(self) -> QuotingEnclave:
        """The QE, with the PCK certificate of the host's current TCB level: after
        :meth:`set_tcb_level` a running service quotes with the new one."""

        stamp = self._chain_mtime()
        if stamp != self._chain_stamp:
            chain = (self.state_dir / PCK_CHAIN).read_bytes()
            self._qe = QuotingEnclave(
                self._deriver, self._att, self._pck, chain, self.info.host_id.encode()
            )
            self._chain_stamp = stamp
        return self._qe

    def quote(self, caller: ReportBody, report_data: bytes) -> bytes:
        self._current_qe()
        report = self._deriver.ereport(caller, target_info_of(self._qe.identity), report_data)
        return self._qe.quote(report)

    def quote_report(self, report: Report) -> bytes:
        """The QE's entry point: a REPORT from any enclave, targeted at the QE."""

        return self._current_qe().quote(report)

    @property
    def qe_target_info(self) -> TargetInfo:
        return target_info_of(self._qe.identity)


class LocalServices:
    """:class:`TrustedServices` bound to one measured enclave, in this process."""

    def __init__(self, platform: EmulatedPlatform, identity: ReportBody) -> None:
        self._platform = platform
        self._identity = identity
        self._owner = counter_owner(identity)

    @property
    def identity(self) -> ReportBody:
        return self._identity

    def get_key(self, request: KeyRequest) -> bytes:
        return self._platform.egetkey(self._identity, request)

    def report(self, target: TargetInfo, report_data: bytes) -> Report:
        return self._platform.ereport(self._identity, target, report_data)

    def quote(self, report_data: bytes) -> bytes:
        return self._platform.quote(self._identity, report_data)

    def trusted_roots(self) -> list[x509.Certificate]:
        return self._platform.trusted_roots

    def collateral(self) -> list[bytes]:
        return self._platform.collateral()

    def counter_create(self, initial: int = 0) -> tuple[str, int]:
        return self._platform.counters.create(self._owner, initial)

    def counter_read(self, counter_id: str) -> int:
        return self._platform.counters.read(self._owner, counter_id)

    def counter_increment(self, counter_id: str, by: int = 1) -> int:
        return self._platform.counters.increment(self._owner, counter_id, by)

    def counter_destroy(self, counter_id: str) -> None:
        self._platform.counters.destroy(self._owner, counter_id)

    def claim_migration(self, migration_id: bytes) -> bool:
        return self._platform.counters.claim(self._owner, migration_id)

    def migration_claimed(self, migration_id: bytes) -> bool:
        return self._platform.counters.claimed(self._owner, migration_id)

    def refuse_migration(self, migration_id: bytes) -> bool:
        return self._platform.counters.refuse(self._owner, migration_id)

    def persist_read(self, name: str) -> bytes | None:
        """The sealed persistent record ``name`` of this enclave's owner, if any."""

        return self._platform.counters.record_read(self._owner, name)

    def persist_update(self, name: str, update: RecordUpdate) -> None:
        """Change a persistent record and its counters atomically (``RecordUpdate``)."""

        self._platform.counters.record_update(self._owner, name, update)

    def decide(
        self, decision: Decision, retire: Sequence[tuple[str, RecordUpdate]] = ()
    ) -> Decision:
        """Record a migration decision (first wins), atomically with ``retire``."""

        return self._platform.counters.decide(self._owner, decision, retire)

    def persist_transaction(
        self, changes: Sequence[tuple[str, RecordUpdate]], *, claim: bytes | None = None
    ) -> None:
        """Several record updates of this owner (and a migration id's claim) as one write."""

        self._platform.counters.record_transaction(self._owner, changes, claim=claim)

    def revoke_commit(
        self, migration_id: bytes, reopen: Sequence[tuple[str, RecordUpdate]] = ()
    ) -> Decision:
        """Revoke this owner's COMMIT of ``migration_id`` atomically with ``reopen``."""

        return self._platform.counters.revoke(self._owner, migration_id, reopen)


def _paths(value: object) -> tuple[Path, ...]:
    """``collateral`` in platform.toml: one path or a list of them."""

    if isinstance(value, str):
        return (Path(value),)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(Path(v) for v in value)
    raise ValueError("collateral must be a path or a list of paths")


def _signer(value: bytes | str) -> bytes:
    """An MRSIGNER from bytes or hex; anything but 32 bytes is refused."""

    raw = bytes.fromhex(value) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError("an MRSIGNER is 32 bytes")
    return raw


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ec(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateDirError("platform key is not an EC key")
    return key
