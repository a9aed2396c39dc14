"""Errors of the platform and the enclaves: images, launch, keys, attestation,
sealing, counters and the platform store's claims, and enclave calls.

Re-exported by :mod:`migsgx.errors`, where callers import them.
"""

from __future__ import annotations

from ._error_root import MigSGXError


# --- enclave images ------------------------------------------------------------
class ImageError(MigSGXError):
    """The enclave image is malformed."""

    code = "image"


class ImageSignatureError(ImageError):
    """The enclave image's signature does not verify."""

    code = "image-signature"


class ImageUnsignedError(ImageError):
    """The enclave image carries no signature."""

    code = "image-unsigned"


class ImageMeasurementError(ImageError):
    """The enclave image does not match the measurement its author signed."""

    code = "image-measurement"


# --- platform, keys, attestation ----------------------------------------------
class PlatformError(MigSGXError):
    """The platform refused or failed an operation."""

    code = "platform"


class LaunchError(PlatformError):
    """The enclave could not be launched."""

    code = "launch"


class KeyRequestError(PlatformError):
    """EGETKEY refused the key request."""

    code = "key-request"


class AttestationError(MigSGXError):
    """Attestation evidence did not verify."""

    code = "attestation"


class ReportMacError(AttestationError):
    """The REPORT's MAC does not verify for this target enclave."""

    code = "report-mac"


class QuoteFormatError(AttestationError):
    """The quote is malformed."""

    code = "quote-format"


class UnknownCAError(AttestationError):
    """The quote's certificate chain does not lead to a trusted provisioning CA."""

    code = "unknown-ca"


class QuoteSignatureError(AttestationError):
    """A signature in the quote does not verify."""

    code = "quote-signature"


class IdentityMismatchError(AttestationError):
    """The attested enclave is not the one the policy expects."""

    code = "identity-mismatch"


class DebugEnclaveError(AttestationError):
    """A debug enclave where a production enclave is required."""

    code = "debug-enclave"


class RevokedError(AttestationError):
    """The attesting platform's PCK certificate, or its TCB level, is revoked."""

    code = "revoked"


class TcbStatusError(AttestationError):
    """The platform's TCB status is not one the migration policy accepts."""

    code = "tcb-status"


class TcbOutOfDateError(TcbStatusError):
    """The platform's TCB is out of date (a microcode or TCB recovery is due)."""

    code = "tcb-out-of-date"


class CollateralError(AttestationError):
    """Verification collateral (TCB info, QE identity, CRLs) is missing or malformed."""

    code = "collateral"


class StaleCollateralError(CollateralError):
    """Verification collateral is past its nextUpdate (or not yet valid)."""

    code = "collateral-stale"


class SealError(MigSGXError):
    """Sealed data could not be opened (wrong host, enclave, policy, or tampered)."""

    code = "unseal"


class CounterError(PlatformError):
    """A monotonic counter operation failed."""

    code = "counter"


class StoreFullError(CounterError):
    """A platform store refused to grow: the owner's quota or the host's cap is reached."""

    code = "store-full"


class RecordConflictError(CounterError):
    """A persistent record changed since the caller read it (compare-and-set failed)."""

    code = "record-conflict"


# --- claims and migration groups (the platform store) -------------------------
class ClaimedBeforeError(CounterError):
    """The migration id was claimed on this host before: this copy must never run."""

    code = "claimed"


class MigrationRefusedError(ClaimedBeforeError):
    """The migration id was refused for good on this host: no copy of it may ever run here.

    A destination host's claim store refuses an id (``docs/spec/commit.md``,
    section 2.2) so that the committed source may run again on proof of it; a
    claim after that would make a second copy.
    """

    code = "refused"


class GroupDecidedError(CounterError):
    """Another enclave of the same migration (its group) decided the other way first.

    A group's first decision is the whole migration's: once one of its enclaves
    committed, no other may record an abort (it must commit too), and once one
    aborted, none may commit (``docs/spec/commit.md``, section 1.1).
    """

    code = "group-decided"


class GroupUncheckedError(CounterError):
    """An abort in a migration group could not be checked against the group's decision.

    The platform store did not answer (gone, unreadable, full): another enclave
    of the group may have committed, and an abort then would split the
    application between the hosts.  Nothing changed; the enclave stays frozen
    until an abort (or a roll-forward) can be checked.
    """

    code = "group-unchecked"


# --- enclave calls -------------------------------------------------------------
class EnclaveError(MigSGXError):
    """An ECALL failed inside the enclave."""

    code = "enclave"


class OutOfThreadSlotsError(EnclaveError):
    """Every thread slot of the enclave is busy (SGX_ERROR_OUT_OF_TCS)."""

    code = "out-of-tcs"


class UnknownEcallError(EnclaveError):
    """The enclave declares no such ECALL."""

    code = "unknown-ecall"


class EnclaveLostError(EnclaveError):
    """The enclave process is gone or its channel broke."""

    code = "enclave-lost"


class PlatformAnswerLostError(EnclaveLostError):
    """A request reached the platform service, which went away before it answered.

    It may or may not have been applied.  To a peer it is the ``enclave-lost``
    it always was (same code); only the enclave itself tells it from a request
    that was never sent (``docs/spec/commit.md``, 1 rule 4).
    """


class EnclaveBusyError(EnclaveError):
    """The enclave does not admit ECALLs now (quiesced or migrating)."""

    code = "enclave-busy"


class EnclaveMemoryError(EnclaveError):
    """An access outside the enclave's declared memory."""

    code = "enclave-memory"


class PersistentStateError(EnclaveError):
    """The enclave's persistent state is not open, not usable here, or was moved."""

    code = "persistent"


class FrozenError(EnclaveBusyError):
    """Seal and counter operations wait for a migration or checkpoint to end."""

    code = "frozen"


class RollbackError(SealError):
    """Sealed data or a persistent record is older than the newest one (or newer)."""

    code = "rollback"
