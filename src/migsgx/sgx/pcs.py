"""The CA's provisioning-certification service: TCB levels, hosts, collateral.

Intel's PCS knows every platform's PCK certificate and TCB level, publishes
a TCB info per FMSPC saying which TCB levels are current, and revokes PCK
certificates through a CRL.  The deployment CA does the same from
``pcs.json`` in its directory:

* ``levels``: the TCB levels of this deployment's (single) FMSPC; a level is
  named by its SVN (all 16 components equal it, PCESVN is the PCE's) and has
  a status: UpToDate, SWHardeningNeeded, ConfigurationNeeded, OutOfDate,
  Revoked, ...  A TCB recovery adds a higher level and marks the old ones.
* ``hosts``: each host's PCK certificate serial, TCB level and revocation.

:func:`publish` signs the collateral (``collateral.json``) from that state;
every change that a verifier must see republishes it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .._fs import write_private
from ..errors import ConfigError, StateDirError
from .collateral import COLLATERAL_FILE, Collateral, iso
from .quote import PCE_SVN, QE_SVN, qe_identity
from .sgxext import COMPONENTS, PckExtension
from .tcb_status import TCB_STATUSES

PCS_STATE = "pcs.json"
_LOCK = ".pcs.lock"
DEFAULT_VALIDITY = _dt.timedelta(days=30)
PCE_ID = bytes(2)
# A fresh deployment: level 3 is current, 2 needs software hardening, 1 is out of date.
_DEFAULT_LEVELS = ((3, "UpToDate"), (2, "SWHardeningNeeded"), (1, "OutOfDate"))
# Intel's QE identity masks: DEBUG (bit 1 of byte 0) and the upper half are ignored.
_QE_ATTRIBUTES_MASK = "FBFFFFFFFFFFFFFF0000000000000000"


class SignerLike(Protocol):
    @property
    def key(self) -> ec.EllipticCurvePrivateKey: ...

    @property
    def certificate(self) -> x509.Certificate: ...


class Authority(SignerLike, Protocol):
    """What publishing needs of the CA (``ca.ProvisioningCA``), named here so that this
    module does not import the CA's, which calls it."""

    @property
    def pck_ca(self) -> SignerLike: ...

    @property
    def tcb_signer(self) -> SignerLike: ...

    @property
    def directory(self) -> Path: ...

    def pck_chain_pem(self) -> bytes: ...


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0)


@dataclass
class PcsState:
    fmspc: bytes
    levels: dict[int, str]
    hosts: dict[str, dict[str, Any]]
    evaluation: int = 1
    crl_number: int = 0

    @classmethod
    def create(cls, directory: Path) -> PcsState:
        state = cls(
            fmspc=bytes.fromhex("00906ea1") + secrets.token_bytes(2),
            levels=dict(_DEFAULT_LEVELS),
            hosts={},
        )
        state.save(directory)
        return state

    @classmethod
    def load(cls, directory: Path) -> PcsState:
        try:
            doc = json.loads((Path(directory) / PCS_STATE).read_bytes())
            return cls(
                fmspc=bytes.fromhex(doc["fmspc"]),
                levels={int(k): str(v) for k, v in doc["levels"].items()},
                hosts=dict(doc["hosts"]),
                evaluation=int(doc["evaluation"]),
                crl_number=int(doc["crl_number"]),
            )
        except FileNotFoundError as exc:
            raise StateDirError(f"{directory} has no {PCS_STATE}; not a CA directory") from exc
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            RecursionError,
            OverflowError,
        ) as exc:
            raise StateDirError(f"{directory}/{PCS_STATE} is corrupt: {exc!r}") from exc

    def save(self, directory: Path) -> None:
        doc = {
            "fmspc": self.fmspc.hex(),
            "levels": {str(k): v for k, v in sorted(self.levels.items(), reverse=True)},
            "hosts": self.hosts,
            "evaluation": self.evaluation,
            "crl_number": self.crl_number,
        }
        write_private(Path(directory) / PCS_STATE, json.dumps(doc, indent=1).encode())

    @property
    def current_level(self) -> int:
        """The highest UpToDate level: where a new host starts."""

        up = [svn for svn, status in self.levels.items() if status == "UpToDate"]
        return max(up) if up else max(self.levels)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[PcsState]:
    """Load, let the caller change, save: one CA update at a time across processes."""

    fd = os.open(Path(directory) / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        state = PcsState.load(directory)
        yield state
        state.save(directory)
    finally:
        os.close(fd)


def _check_level(state: PcsState, level: int) -> None:
    if level not in state.levels:
        known = ", ".join(str(k) for k in sorted(state.levels))
        raise ConfigError(f"no TCB level {level} in this deployment (levels: {known})")


def register_host(
    directory: Path,
    host_id: str,
    level: int | None,
    issue: Callable[[PckExtension], x509.Certificate],
) -> x509.Certificate:
    """Issue (or re-issue, at another level) a host's PCK certificate and record it."""

    with _locked(directory) as state:
        level = state.current_level if level is None else level
        _check_level(state, level)
        known = state.hosts.get(host_id)
        if known and known["revoked"]:
            # As Intel's PCS: a revoked platform gets no new PCK certificate.
            raise ConfigError(f"host {host_id!r} is revoked; it gets no new PCK certificate")
        ppid = bytes.fromhex(known["ppid"]) if known else secrets.token_bytes(16)
        ext = PckExtension(
            ppid=ppid,
            components=(level,) * COMPONENTS,
            pce_svn=PCE_SVN,
            pce_id=PCE_ID,
            fmspc=state.fmspc,
        )
        cert = issue(ext)
        state.hosts[host_id] = {
            "serial": str(cert.serial_number),
            "ppid": ppid.hex(),
            "level": level,
            "revoked": list(known["revoked"]) if known else [],
        }
        return cert


def revoke_host(authority: Authority, host_id: str) -> Collateral:
    """Put the host's current PCK certificate on the PCK CRL; republish."""

    with _locked(authority.directory) as state:
        host = state.hosts.get(host_id)
        if host is None:
            raise ConfigError(f"no host {host_id!r} was certified by this CA")
        if host["serial"] not in host["revoked"]:
            host["revoked"].append(host["serial"])
    return publish(authority)


def set_level(authority: Authority, level: int, status: str) -> Collateral:
    """Add a TCB level or change its status (a TCB recovery); republish."""

    if status not in TCB_STATUSES:
        raise ConfigError(f"unknown TCB status {status!r} (one of {', '.join(TCB_STATUSES)})")
    if not 0 <= level <= 255:
        raise ConfigError("a TCB level is a component SVN, 0..255")
    with _locked(authority.directory) as state:
        state.levels[level] = status
        state.evaluation += 1
    return publish(authority)


def _raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _crl(
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    serials: list[int],
    number: int,
    now: _dt.datetime,
    until: _dt.datetime,
) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(until)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(issuer_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.DER)


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


def build_collateral(
    authority: Authority,
    state: PcsState,
    *,
    now: _dt.datetime,
    valid_for: _dt.timedelta,
) -> Collateral:
    until = now + valid_for
    pem = serialization.Encoding.PEM
    root_pem = authority.certificate.public_bytes(pem).decode()
    tcb_chain = authority.tcb_signer.certificate.public_bytes(pem).decode() + root_pem
    levels = [
        {
            "tcb": {
                "sgxtcbcomponents": [{"svn": svn}] * COMPONENTS,
                "pcesvn": PCE_SVN,
            },
            "tcbDate": iso(now),
            "tcbStatus": status,
        }
        for svn, status in sorted(state.levels.items(), reverse=True)
    ]
    tcb_info = _json(
        {
            "id": "SGX",
            "version": 3,
            "issueDate": iso(now),
            "nextUpdate": iso(until),
            "fmspc": state.fmspc.hex().upper(),
            "pceId": PCE_ID.hex().upper(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": state.evaluation,
            "tcbLevels": levels,
        }
    )
    qe = qe_identity()
    qe_doc = _json(
        {
            "id": "QE",
            "version": 2,
            "issueDate": iso(now),
            "nextUpdate": iso(until),
            "tcbEvaluationDataNumber": state.evaluation,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": qe.attributes.pack().hex().upper(),
            "attributesMask": _QE_ATTRIBUTES_MASK,
            "mrsigner": qe.mr_signer.hex().upper(),
            "isvprodid": qe.isv_prod_id,
            "tcbLevels": [
                {"tcb": {"isvsvn": QE_SVN}, "tcbDate": iso(now), "tcbStatus": "UpToDate"}
            ],
        }
    )
    tcb_key = authority.tcb_signer.key
    revoked = sorted(int(s) for host in state.hosts.values() for s in host["revoked"])
    return Collateral(
        tcb_info=tcb_info,
        tcb_info_signature=_raw_signature(tcb_key, tcb_info.encode()),
        tcb_info_issuer_chain=tcb_chain,
        qe_identity=qe_doc,
        qe_identity_signature=_raw_signature(tcb_key, qe_doc.encode()),
        qe_identity_issuer_chain=tcb_chain,
        pck_crl=_crl(
            authority.pck_ca.key,
            authority.pck_ca.certificate,
            revoked,
            state.crl_number,
            now,
            until,
        ),
        pck_crl_issuer_chain=authority.pck_chain_pem().decode(),
        root_ca_crl=_crl(authority.key, authority.certificate, [], state.crl_number, now, until),
    )


def publish(
    authority: Authority,
    *,
    valid_for: _dt.timedelta = DEFAULT_VALIDITY,
    now: _dt.datetime | None = None,
) -> Collateral:
    """Sign fresh collateral from the CA's state into ``collateral.json``."""

    with _locked(authority.directory) as state:
        state.crl_number += 1
        collateral = build_collateral(authority, state, now=now or _now(), valid_for=valid_for)
        write_private(authority.directory / COLLATERAL_FILE, collateral.to_json(), mode=0o644)
    return collateral
