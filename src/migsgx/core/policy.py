"""Who may receive an enclave's state: the migration policy.

Both enclaves run the same check on ``(source, destination)``, each with its own
policy, after the peer's quote has been verified.  See ``docs/spec/handshake.md``,
section 7.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from ..errors import PolicyError
from ..sgx.structs import ReportBody

__all__ = ["IDENTITY_SIZE", "EnclaveIdentity", "MigrationPolicy", "PolicyMode"]

_IDENTITY: Final = struct.Struct(">32s32sHH")
IDENTITY_SIZE: Final = _IDENTITY.size


@dataclass(frozen=True)
class EnclaveIdentity:
    """The parts of an attested REPORT body that the migration protocol depends on."""

    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool = False

    def __post_init__(self) -> None:
        if len(self.mr_enclave) != 32 or len(self.mr_signer) != 32:
            raise ValueError("MRENCLAVE and MRSIGNER are 32 bytes")
        if not (0 <= self.isv_prod_id <= 0xFFFF and 0 <= self.isv_svn <= 0xFFFF):
            raise ValueError("ISVPRODID and ISVSVN are 16-bit values")

    @classmethod
    def from_report(cls, body: ReportBody) -> EnclaveIdentity:
        return cls(
            mr_enclave=bytes(body.mr_enclave),
            mr_signer=bytes(body.mr_signer),
            isv_prod_id=body.isv_prod_id,
            isv_svn=body.isv_svn,
            debug=body.attributes.debug,
        )

    def pack(self) -> bytes:
        """68 bytes, big-endian, as in stream headers (``docs/spec/stream.md``, section 2)."""

        return _IDENTITY.pack(self.mr_enclave, self.mr_signer, self.isv_prod_id, self.isv_svn)

    @classmethod
    def unpack(cls, data: bytes) -> EnclaveIdentity:
        """Inverse of :meth:`pack`; the debug flag is not in the packed form."""

        mr_enclave, mr_signer, prod_id, svn = _IDENTITY.unpack(data)
        return cls(mr_enclave, mr_signer, prod_id, svn)

    def describe(self) -> str:
        return (
            f"MRENCLAVE {self.mr_enclave.hex()[:16]}..., MRSIGNER {self.mr_signer.hex()[:16]}..., "
            f"ISVPRODID {self.isv_prod_id}, ISVSVN {self.isv_svn}"
            + (", DEBUG" if self.debug else "")
        )


class PolicyMode(enum.Enum):
    SAME_ENCLAVE = "same-enclave"
    SAME_SIGNER = "same-signer"


@dataclass(frozen=True)
class MigrationPolicy:
    """``same-enclave`` by default; ``same-signer`` lets a newer build of the same product in.

    Debug enclaves leak their memory to a debugger, so neither end may be one unless
    ``allow_debug`` says so (development only).
    """

    mode: PolicyMode = PolicyMode.SAME_ENCLAVE
    allow_debug: bool = False

    def check(self, source: EnclaveIdentity, destination: EnclaveIdentity) -> None:
        """Return if ``source`` may hand its state to ``destination``; raise PolicyError if not."""

        if not self.allow_debug:
            for role, ident in (("source", source), ("destination", destination)):
                if ident.debug:
                    raise PolicyError(
                        f"the {role} enclave is a debug enclave and the policy refuses debug"
                        " enclaves",
                        check="debug",
                        role=role,
                    )
        if self.mode is PolicyMode.SAME_ENCLAVE:
            if destination.mr_enclave != source.mr_enclave:
                raise PolicyError(
                    "MRENCLAVE differs: destination "
                    f"{destination.mr_enclave.hex()} is not source {source.mr_enclave.hex()}",
                    check="mr_enclave",
                )
            return
        if destination.mr_signer != source.mr_signer:
            raise PolicyError(
                "MRSIGNER differs: destination "
                f"{destination.mr_signer.hex()} is not source {source.mr_signer.hex()}",
                check="mr_signer",
            )
        if destination.isv_prod_id != source.isv_prod_id:
            raise PolicyError(
                f"ISVPRODID differs: destination {destination.isv_prod_id}, "
                f"source {source.isv_prod_id}",
                check="isv_prod_id",
            )
        if destination.isv_svn < source.isv_svn:
            raise PolicyError(
                f"destination ISVSVN {destination.isv_svn} is lower than source ISVSVN "
                f"{source.isv_svn} (a downgrade)",
                check="isv_svn",
            )
