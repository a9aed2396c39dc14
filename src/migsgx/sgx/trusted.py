"""The trusted seam: what code inside an enclave may ask of its platform.

As on real SGX, an enclave asks the CPU and its architectural enclaves for its
own keys (EGETKEY), REPORTs (EREPORT), quotes (through the quoting enclave),
monotonic counters and the trusted attestation roots, always about itself.
:class:`TrustedServices` is that request surface.  The emulator
(:mod:`migsgx.sgx.platform`) implements it; a hardware back end (Gramine with
DCAP: ``/dev/attestation/user_report_data``, ``quote``, ``keys/``) is a new class
that implements it too.  Enclave code imports this module, never the emulator.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from ..errors import ReportMacError
from .store_types import Decision, RecordUpdate
from .structs import KEYNAME_REPORT, KeyRequest, Report, ReportBody, TargetInfo

if TYPE_CHECKING:
    from cryptography import x509  # (a type only: the agent imports this seam, not X.509)

__all__ = ["TrustedServices", "counter_owner", "target_info_of", "verify_report_locally"]


@runtime_checkable
class TrustedServices(Protocol):
    """What enclave code can ask of its platform; always about itself."""

    @property
    def identity(self) -> ReportBody: ...

    def get_key(self, request: KeyRequest) -> bytes: ...

    def report(self, target: TargetInfo, report_data: bytes) -> Report: ...

    def quote(self, report_data: bytes) -> bytes: ...

    def trusted_roots(self) -> list[x509.Certificate]: ...

    def collateral(self) -> list[bytes]:
        """The verification collateral (``docs/spec/collateral.md``) as last published,
        one file per trusted root."""
        ...

    def counter_create(self, initial: int = 0) -> tuple[str, int]: ...

    def counter_read(self, counter_id: str) -> int: ...

    def counter_increment(self, counter_id: str, by: int = 1) -> int: ...

    def counter_destroy(self, counter_id: str) -> None: ...

    def claim_migration(self, migration_id: bytes) -> bool: ...

    def migration_claimed(self, migration_id: bytes) -> bool: ...

    def refuse_migration(self, migration_id: bytes) -> bool:
        """Refuse ``migration_id`` on this host for good (``docs/spec/commit.md``, 2.2).

        False if it was refused before; :class:`~migsgx.errors.ClaimedBeforeError`
        if an enclave claimed it (then it cannot be refused).
        """
        ...

    def persist_read(self, name: str) -> bytes | None: ...

    def persist_update(self, name: str, update: RecordUpdate) -> None: ...

    def decide(
        self, decision: Decision, retire: Sequence[tuple[str, RecordUpdate]] = ()
    ) -> Decision: ...

    def persist_transaction(
        self, changes: Sequence[tuple[str, RecordUpdate]], *, claim: bytes | None = None
    ) -> None: ...

    def revoke_commit(
        self, migration_id: bytes, reopen: Sequence[tuple[str, RecordUpdate]] = ()
    ) -> Decision:
        """This enclave's COMMIT of ``migration_id`` becomes ``revoked``, with ``reopen``.

        One atomic update (``docs/spec/commit.md``, section 2.2); only a commit
        of this enclave's owner; a revoked one is returned as it is.
        """
        ...


def target_info_of(body: ReportBody) -> TargetInfo:
    """TARGETINFO naming the enclave ``body`` describes (sgx_self_target)."""

    return TargetInfo(
        mr_enclave=body.mr_enclave,
        attributes=body.attributes,
        config_svn=body.config_svn,
        misc_select=body.misc_select,
        config_id=body.config_id,
    )


def counter_owner(body: ReportBody) -> bytes:
    """Counters belong to MRSIGNER + product id, so an enclave update keeps them.

    A debug build of the same product is another owner: it must never read or
    move a production enclave's counters or migration claims.
    """

    kind = b"D" if body.attributes.debug else b"S"
    return kind + body.mr_signer + body.isv_prod_id.to_bytes(2, "little")


def verify_report_locally(services: TrustedServices, report: Report) -> ReportBody:
    """sgx_verify_report: check a REPORT targeted at the calling enclave."""

    key = services.get_key(KeyRequest(KEYNAME_REPORT, key_id=report.key_id))
    mac = CMAC(algorithms.AES(key))
    mac.update(report.body.pack())
    if not hmac.compare_digest(mac.finalize(), report.mac):
        raise ReportMacError("REPORT MAC does not verify for this enclave")
    return report.body
