"""DCAP verification collateral, as a PCCS serves it, in one file.

A verifier of DCAP quotes needs, besides the quote and a trusted root, the
collateral of the attesting platform: the TCB info for its FMSPC (signed by
the TCB signing key), the QE identity (signed by the same key), the CRL of the
PCK CA and the CRL of the root, each with the issuer chain that signs it.
Nothing in it is secret and every part is signed, so it may come from anywhere
(the CA directory, a peer, a cache); what matters is that it verifies and is
fresh.  The file format is ``docs/spec/collateral.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509

from ..errors import CollateralError, StaleCollateralError

COLLATERAL_FILE = "collateral.json"
FORMAT_VERSION = 1
MAX_COLLATERAL_SIZE = 256 * 1024
_TEXT = (
    "tcb_info",
    "tcb_info_issuer_chain",
    "qe_identity",
    "qe_identity_issuer_chain",
    "pck_crl_issuer_chain",
)
_BINARY = ("tcb_info_signature", "qe_identity_signature", "pck_crl", "root_ca_crl")


def iso(when: _dt.datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, the way Intel's PCS writes dates."""

    return when.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Collateral:
    """The nine parts of ``QuoteCollateralV3``; signatures raw r||s, CRLs DER."""

    tcb_info: str
    tcb_info_signature: bytes
    tcb_info_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes
    qe_identity_issuer_chain: str
    pck_crl: bytes
    pck_crl_issuer_chain: str
    root_ca_crl: bytes

    # --- file form ------------------------------------------------------------
    def to_json(self) -> bytes:
        doc: dict[str, object] = {"version": FORMAT_VERSION}
        for name, value in asdict(self).items():
            doc[name] = value.hex() if isinstance(value, bytes) else value
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Collateral:
        if len(data) > MAX_COLLATERAL_SIZE:
            raise CollateralError(f"collateral of {len(data)} bytes is too large")
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
                raise CollateralError("collateral is not version 1 of the collateral format")
            fields: dict[str, str | bytes] = {}
            for name in _TEXT:
                value = doc[name]
                if not isinstance(value, str):
                    raise TypeError(name)
                fields[name] = value
            for name in _BINARY:
                fields[name] = bytes.fromhex(doc[name])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CollateralError(f"collateral is malformed: {exc!r}") from exc
        return cls(**fields)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> Collateral:
        """From a file, or from the ``collateral.json`` a CA directory publishes."""

        path = Path(path)
        if path.is_dir():
            path = path / COLLATERAL_FILE
        try:
            return cls.from_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise CollateralError(
                f"no collateral at {path} (run `migsgx ca publish`)", path=str(path)
            ) from exc

    # --- what a verifier checks before anything else -------------------------------
    def _document(self, text: str, key: str) -> dict[str, object]:
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:  # (nested too deep)
            raise CollateralError(f"{key} is not JSON") from exc
        if not isinstance(doc, dict):
            raise CollateralError(f"{key} is not a JSON object")
        return doc

    @property
    def tcb_info_document(self) -> dict[str, object]:
        return self._document(self.tcb_info, "TCB info")

    @property
    def qe_identity_document(self) -> dict[str, object]:
        return self._document(self.qe_identity, "QE identity")

    def validity(self) -> tuple[_dt.datetime, _dt.datetime]:
        """The window in which every part is current: latest issue, earliest next update."""

        starts: list[_dt.datetime] = []
        ends: list[_dt.datetime] = []
        for doc, name in (
            (self.tcb_info_document, "TCB info"),
            (self.qe_identity_document, "QE identity"),
        ):
            try:
                starts.append(_dt.datetime.fromisoformat(str(doc["issueDate"])))
                ends.append(_dt.datetime.fromisoformat(str(doc["nextUpdate"])))
            except (KeyError, ValueError) as exc:
                raise CollateralError(f"{name} has no valid issueDate/nextUpdate") from exc
        for der, name in ((self.pck_crl, "PCK CRL"), (self.root_ca_crl, "root CA CRL")):
            try:
                crl = x509.load_der_x509_crl(der)
            except ValueError as exc:
                raise CollateralError(f"{name} is not a DER CRL") from exc
            starts.append(crl.last_update_utc)
            if crl.next_update_utc is None:
                raise CollateralError(f"{name} has no nextUpdate")
            ends.append(crl.next_update_utc)
        return max(starts), min(ends)

    def check_fresh(self, now: _dt.datetime) -> None:
        """Refuse collateral that is past its next update: a revocation may be missing."""

        start, end = self.validity()
        if now > end:
            raise StaleCollateralError(
                f"collateral expired at {iso(end)} (nextUpdate); it is {iso(now)}",
                next_update=iso(end),
            )
        if now < start:
            raise StaleCollateralError(f"collateral is issued in the future ({iso(start)})")
