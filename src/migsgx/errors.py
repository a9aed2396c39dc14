"""One error root for everything migsgx raises.

Every error carries a stable ``code`` (a short lowercase string that scripts and
peers can match on) and keyword context.  Errors that cross a process boundary
are sent as ``{"code", "message"}`` and rebuilt with :func:`error_from_wire`, so
an enclave's failure arrives in the application as the same typed exception.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MigSGXError(Exception):
    """Root of all migsgx errors."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str = "", **context: Any) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.context = context

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.__class__, self.message, self.context))

    def __str__(self) -> str:
        return self.message

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


def _rebuild(cls: type[MigSGXError], message: str, context: dict[str, Any]) -> MigSGXError:
    return cls(message, **context)


# --- local misuse and configuration ------------------------------------------
class ConfigError(MigSGXError):
    """Bad configuration or arguments."""

    code = "config"


class StateDirError(ConfigError):
    """A platform or CA state directory is missing, incomplete or unsafe."""

    code = "state-dir"


class RecordDamagedError(ConfigError, ValueError):
    """A durable record (journal, held-tree record, checkpoint metadata) is damaged.

    A crash, a full disk or a forged file can leave one half-written or wrong;
    every parser of such a record says so with this error, never with whatever
    the decoder happened to raise.  Also a ``ValueError``: callers that skip
    unreadable records (``except ValueError``) keep doing so.
    """

    code = "record-damaged"


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


# --- enclave calls -------------------------------------------------------------
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


# --- wire ------------------------------------------------------------------------
class ProtocolError(MigSGXError):
    """The peer sent something the protocol does not allow."""

    code = "protocol"


class FrameError(ProtocolError):
    """A frame is malformed, truncated or oversize."""

    code = "frame"


class ConnectionClosedError(ProtocolError):
    """The peer closed the connection."""

    code = "closed"


class DataLinkError(ProtocolError):
    """A data connection did not prove that it belongs to the migration session."""

    code = "data-link"


class ImagePinError(ProtocolError):
    """An offered enclave image is not the one the control session announced."""

    code = "image-pin"


# --- migration -------------------------------------------------------------------
class MigrationError(MigSGXError):
    """The migration failed; the source goes on."""

    code = "migration"


class PolicyError(MigrationError):
    """The peer enclave does not satisfy the migration policy."""

    code = "policy"


class StreamError(MigrationError):
    """The state stream failed authentication or is incomplete."""

    code = "stream"


class PageStreamError(StreamError):
    """CRIU's page stream, as the agents relay it, failed authentication or is incomplete."""

    code = "page-stream"


class ReplayError(MigrationError):
    """This migration id was seen before."""

    code = "replay"


class SourceGoneError(MigrationError):
    """The source application ended during the migration: nothing moved, nothing runs."""

    code = "source-gone"


class CheckpointGateError(ReplayError):
    """The checkpoint has no committed gate on this host: aborted, restored, or pending."""

    code = "checkpoint-gate"


class CommittedError(MigrationError):
    """This enclave's state has moved to another host; it cannot run here again."""

    code = "committed"


class AwaitingDecisionError(MigrationError):
    """This enclave confirmed its load: only the source's decision ends the migration."""

    code = "awaiting-decision"


class InDoubtError(MigSGXError):
    """The outcome is not known here yet: nothing was lost, run ``migsgx recover``.

    Not a :class:`MigrationError`: a caller that treats those as "did not move,
    the source runs" must not treat this one so.
    """

    code = "in-doubt"


class LostAfterCommitError(MigSGXError):
    """The migration committed, and then the one copy of the enclave state was lost.

    From ``migrate``: the destination's enclave claimed the id, but it (or its
    host's platform service) was gone when the tree was attached; the application
    there runs without its enclave, as after a crash of a live enclave (the id was
    claimed, so the state must never be delivered again).  From ``recover``: the
    destination holds no loaded copy and never activated the id.  Nothing runs
    twice and nothing is in doubt.

    Not a :class:`MigrationError` (the source does not run) nor an
    :class:`InDoubtError` (``migsgx recover`` has nothing to resolve).
    """

    code = "lost-after-commit"


class SourceEnclaveLostError(MigSGXError):
    """Nothing moved and the source application runs, but a source enclave died
    before the decision: its state is gone, as after a crash of that enclave.

    From ``migrate`` and ``checkpoint``: no enclave of the migration (or
    checkpoint) decided COMMIT, and the enclave's process ended first, so no
    copy of its state exists anywhere and nothing can bring it back.  The
    others (if any) went back to the application with every write.  The
    context's ``lost`` names each one (index, MRENCLAVE, process, migration id).

    Not a :class:`MigrationError`: a caller that treats those as "the source
    runs as before" must not treat this one so; nor an :class:`InDoubtError`
    (``migsgx recover`` has nothing to resolve).
    """

    code = "source-enclave-lost"


class DirtyTrackingError(MigrationError):
    """The kernel's tracking of written enclave pages cannot be used."""

    code = "dirty-tracking"


class DirtyTrackingUnavailableError(DirtyTrackingError):
    """This kernel (or its configuration) offers no written-page tracking: live
    migration is not possible; stop-and-copy is the fallback."""

    code = "dirty-tracking-unavailable"


class DirtyTrackingLostError(DirtyTrackingError):
    """The tracking stopped answering during pre-copy; the rounds end, the source runs on."""

    code = "dirty-tracking-lost"


class LiveMigrationError(MigrationError):
    """Pre-copy failed or its end state did not verify."""

    code = "live"


class MemoryDigestError(LiveMigrationError):
    """The destination's enclave memory differs from the source's final memory."""

    code = "memory-digest"


class PostCopyError(MigrationError):
    """Post-copy of process pages (CRIU lazy pages) failed or cannot run here."""

    code = "post-copy"


class PostCopyUnavailableError(PostCopyError):
    """This host cannot serve or receive lazy pages (``fs.pipe-max-size`` too low, no
    userfaultfd): nothing was frozen; stop-and-copy is the fallback."""

    code = "post-copy-unavailable"


class SourceLostError(PostCopyError):
    """The source stopped serving process pages while the destination still needed
    them (the post-copy window): the destination tree was killed, never left running
    with missing pages."""

    code = "post-copy-source-lost"


class CriuError(MigSGXError):
    """CRIU failed or is not usable here."""

    code = "criu"


class CheckpointDamagedError(CriuError):
    """A checkpoint's files are not what was written: truncated, changed, missing."""

    code = "checkpoint-damaged"


# --- inspecting checkpoints ------------------------------------------------------
class InspectError(MigSGXError):
    """A checkpoint to inspect is malformed, truncated or not of a known kind."""

    code = "inspect"


class PlaintextFoundError(MigSGXError):
    """An inspected checkpoint holds bytes it must not (a canary, or an unsealed state)."""

    code = "plaintext-found"


_ALL: dict[str, type[MigSGXError]] = {}


def _collect(cls: type[MigSGXError]) -> None:
    _ALL[cls.code] = cls
    for sub in cls.__subclasses__():
        _collect(sub)


_collect(MigSGXError)


def error_from_wire(code: str, message: str) -> MigSGXError:
    """Rebuild a typed error sent by a peer; unknown codes become the root type."""

    cls = _ALL.get(code, MigSGXError)
    err = cls(message)
    return err


def register_error(cls: type[MigSGXError]) -> type[MigSGXError]:
    """Make an error class defined elsewhere known to :func:`error_from_wire`."""

    _ALL[cls.code] = cls
    return cls
