"""EGETKEY and EREPORT of the emulated CPU.

Keys are derived from the host's root secret (its "fused key") and the fields
that SGX's key derivation mixes in: the key name, the requesting enclave's
identity as selected by the key policy, the requested ISVSVN and CPUSVN, the
masked ATTRIBUTES and MISCSELECT, and the 32-byte KEYID.  Like the CPU,
:class:`KeyDeriver` takes the *caller's* identity from who it is, never from
the request, so an enclave can only ever obtain its own keys; and it refuses
an ISVSVN or CPUSVN above the caller's current one (keys of the past are
reachable, keys of the future are not).

REPORTs are MACed with AES-CMAC under the *target's* report key, exactly the
key the target enclave obtains with EGETKEY(REPORT_KEY, KEYID), so only the
target (and the CPU) can verify them.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import replace

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import KeyRequestError, ReportMacError
from .structs import (
    KEYNAME_REPORT,
    KEYNAME_SEAL,
    KEYPOLICY_MRENCLAVE,
    KEYPOLICY_MRSIGNER,
    KEYPOLICY_NOISVPRODID,
    REPORT_DATA_SIZE,
    Attributes,
    KeyRequest,
    Report,
    ReportBody,
    TargetInfo,
)

KEY_SIZE = 16  # SGX keys are 128-bit
_KNOWN_POLICY = KEYPOLICY_MRENCLAVE | KEYPOLICY_MRSIGNER | KEYPOLICY_NOISVPRODID
# Attribute bits that every derivation includes whatever the mask says (INIT, DEBUG).
_MANDATORY_ATTR_MASK = 0x3


def _svn_le(a: bytes, b: bytes) -> bool:
    """CPUSVN ``a`` is not newer than ``b`` (component-wise, as the CPU checks)."""

    return all(x <= y for x, y in zip(a, b, strict=True))


class KeyDeriver:
    """The part of the CPU that holds the fused key."""

    def __init__(
        self,
        root_secret: bytes,
        cpu_svn: bytes = bytes(16),
        *,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if len(root_secret) < 32:
            raise ValueError("root secret must be at least 32 bytes")
        if len(cpu_svn) != 16:
            raise ValueError("CPUSVN must be 16 bytes")
        self._root = bytes(root_secret)
        self.cpu_svn = bytes(cpu_svn)
        self._random = random

    def _derive(self, label: bytes, material: bytes) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=label + material
        ).derive(self._root)

    def reattach_key(self) -> bytes:
        """The platform's own key for reattach tickets: the same after a restart."""

        return self._derive(b"migsgx platform reattach v1", b"")

    def egetkey(self, caller: ReportBody, request: KeyRequest) -> bytes:
        """The key ``caller`` gets for ``request``; raises :class:`KeyRequestError`."""

        if request.key_policy & ~_KNOWN_POLICY:
            raise KeyRequestError("unknown key policy bits")
        if request.key_name == KEYNAME_SEAL:
            if request.isv_svn > caller.isv_svn:
                raise KeyRequestError(
                    f"requested ISVSVN {request.isv_svn} is above the enclave's {caller.isv_svn}"
                )
            if not _svn_le(request.cpu_svn, self.cpu_svn):
                raise KeyRequestError("requested CPUSVN is above the platform's")
            if request.config_svn > caller.config_svn:
                raise KeyRequestError("requested CONFIGSVN is above the enclave's")
            mr_enclave = (
                caller.mr_enclave if request.key_policy & KEYPOLICY_MRENCLAVE else bytes(32)
            )
            mr_signer = caller.mr_signer if request.key_policy & KEYPOLICY_MRSIGNER else bytes(32)
            prod_id = 0 if request.key_policy & KEYPOLICY_NOISVPRODID else caller.isv_prod_id
            mask = request.attribute_mask
            attrs = Attributes(
                caller.attributes.flags & (mask.flags | _MANDATORY_ATTR_MASK),
                caller.attributes.xfrm & mask.xfrm,
            )
            material = (
                struct.pack("<HHHH", KEYNAME_SEAL, request.key_policy, prod_id, request.isv_svn)
                + struct.pack("<HI", request.config_svn, caller.misc_select & request.misc_mask)
                + request.cpu_svn
                + attrs.pack()
                + mr_enclave
                + mr_signer
                + request.key_id
            )
            return self._derive(b"migsgx-egetkey-seal-v1", material)
        if request.key_name == KEYNAME_REPORT:
            return self._report_key(
                caller.mr_enclave, caller.attributes, caller.config_svn, request.key_id
            )
        raise KeyRequestError(f"key name {request.key_name} is not available on this platform")

    def _report_key(
        self, mr_enclave: bytes, attributes: Attributes, config_svn: int, key_id: bytes
    ) -> bytes:
        material = (
            struct.pack("<HH", KEYNAME_REPORT, config_svn)
            + self.cpu_svn
            + attributes.pack()
            + mr_enclave
            + key_id
        )
        return self._derive(b"migsgx-egetkey-report-v1", material)

    def ereport(self, caller: ReportBody, target: TargetInfo, report_data: bytes) -> Report:
        """A REPORT of ``caller`` that only ``target`` can verify."""

        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report data must be {REPORT_DATA_SIZE} bytes")
        body = replace(caller, report_data=bytes(report_data), cpu_svn=self.cpu_svn)
        key_id = self._random(32)
        key = self._report_key(target.mr_enclave, target.attributes, target.config_svn, key_id)
        return Report(body, key_id, _cmac(key, body.pack()))

    def verify_report(self, verifier: ReportBody, report: Report) -> ReportBody:
        """Check a REPORT MACed for ``verifier`` (EGETKEY(REPORT) + CMAC, as the SDK does)."""

        key = self._report_key(
            verifier.mr_enclave, verifier.attributes, verifier.config_svn, report.key_id
        )
        if not hmac.compare_digest(_cmac(key, report.body.pack()), report.mac):
            raise ReportMacError("REPORT MAC does not verify for this enclave")
        return report.body


def _cmac(key: bytes, data: bytes) -> bytes:
    c = CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()
