"""Intel's SGX extension of PCK certificates (OID 1.2.840.113741.1.13.1).

A PCK certificate says which platform it belongs to and at which TCB level the
platform was when it was issued; a DCAP verifier reads that here and matches it
against the TCB info of the collateral.  The layout is Intel's (*SGX PCK
Certificate and Certificate Revocation List Profile Specification*): a SEQUENCE
of (OID, value) pairs::

    PPID     .1    OCTET STRING (16)
    TCB      .2    SEQUENCE of (.2.1 .. .2.16 INTEGER component SVN,
                                .2.17 INTEGER PCESVN, .2.18 OCTET STRING CPUSVN (16))
    PCE-ID   .3    OCTET STRING (2)
    FMSPC    .4    OCTET STRING (6)
    SGX type .5    ENUMERATED (0 = standard)

DER comes from asn1crypto, so no encoder is written here.
"""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import core
from cryptography import x509

from ..errors import QuoteFormatError

SGX_EXTENSIONS = "1.2.840.113741.1.13.1"
_PPID = SGX_EXTENSIONS + ".1"
_TCB = SGX_EXTENSIONS + ".2"
_PCEID = SGX_EXTENSIONS + ".3"
_FMSPC = SGX_EXTENSIONS + ".4"
_SGX_TYPE = SGX_EXTENSIONS + ".5"
_PCESVN = _TCB + ".17"
_CPUSVN = _TCB + ".18"
COMPONENTS = 16
# The extension's OID as cryptography names it: it marks PCK certificates.
SGX_EXTENSIONS_OID = x509.ObjectIdentifier(SGX_EXTENSIONS)


class _Entry(core.Sequence):  # type: ignore[misc]
    _fields = [("id", core.ObjectIdentifier), ("value", core.Any)]


class _SgxType(core.Enumerated):  # type: ignore[misc]
    _map = {0: "standard", 1: "scalable", 2: "scalable-with-integrity"}


class _Entries(core.SequenceOf):  # type: ignore[misc]
    _child_spec = _Entry


@dataclass(frozen=True)
class PckExtension:
    """What a PCK certificate states about its platform."""

    ppid: bytes
    components: tuple[int, ...]
    pce_svn: int
    pce_id: bytes
    fmspc: bytes
    sgx_type: int = 0

    def __post_init__(self) -> None:
        if len(self.ppid) != 16 or len(self.pce_id) != 2 or len(self.fmspc) != 6:
            raise ValueError("PPID is 16 bytes, PCE-ID 2, FMSPC 6")
        if len(self.components) != COMPONENTS or not all(0 <= c <= 255 for c in self.components):
            raise ValueError("a TCB has 16 component SVNs of one byte each")
        if not 0 <= self.pce_svn <= 0xFFFF:
            raise ValueError("PCESVN is a 16-bit value")

    @property
    def cpu_svn(self) -> bytes:
        """The CPUSVN of the TCB, which is its 16 component SVNs as bytes."""

        return bytes(self.components)

    def to_der(self) -> bytes:
        tcb = [
            _Entry({"id": f"{_TCB}.{i + 1}", "value": core.Integer(svn)})
            for i, svn in enumerate(self.components)
        ]
        tcb.append(_Entry({"id": _PCESVN, "value": core.Integer(self.pce_svn)}))
        tcb.append(_Entry({"id": _CPUSVN, "value": core.OctetString(self.cpu_svn)}))
        entries = _Entries(
            [
                _Entry({"id": _PPID, "value": core.OctetString(self.ppid)}),
                _Entry({"id": _TCB, "value": _Entries(tcb)}),
                _Entry({"id": _PCEID, "value": core.OctetString(self.pce_id)}),
                _Entry({"id": _FMSPC, "value": core.OctetString(self.fmspc)}),
                _Entry({"id": _SGX_TYPE, "value": _SgxType(self.sgx_type)}),
            ]
        )
        return bytes(entries.dump())

    @classmethod
    def from_der(cls, der: bytes) -> PckExtension:
        try:
            top = {e["id"].dotted: e["value"] for e in _Entries.load(der)}
            tcb = {e["id"].dotted: e["value"] for e in _Entries.load(top[_TCB].dump())}
            return cls(
                ppid=_octets(top[_PPID]),
                components=tuple(_integer(tcb[f"{_TCB}.{i + 1}"]) for i in range(COMPONENTS)),
                pce_svn=_integer(tcb[_PCESVN]),
                pce_id=_octets(top[_PCEID]),
                fmspc=_octets(top[_FMSPC]),
                sgx_type=_sgx_type(top[_SGX_TYPE]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise QuoteFormatError("the PCK certificate's SGX extension is malformed") from exc


def _octets(value: core.Any) -> bytes:
    return bytes(core.OctetString.load(value.dump()).native)


def _integer(value: core.Any) -> int:
    return int(core.Integer.load(value.dump()).native)


def _sgx_type(value: core.Any) -> int:
    loaded = _SgxType.load(value.dump())
    for number, name in _SgxType._map.items():
        if loaded.native == name:
            return number
    raise ValueError("unknown SGX type")
