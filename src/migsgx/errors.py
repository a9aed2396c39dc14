"""One error root for everything migsgx raises.

Every error carries a stable ``code`` (a short lowercase string that scripts and
peers can match on) and keyword context.  Errors that cross a process boundary
are sent as ``{"code", "message"}`` and rebuilt with :func:`error_from_wire`, so
an enclave's failure arrives in the application as the same typed exception.

This module is where every error is imported from.  The root lives in
:mod:`._error_root`; the families of the platform and the enclaves in
:mod:`.errors_platform`, those of a migration in :mod:`.errors_migration`; the
local misuse family and the table of codes stay here.
"""

from __future__ import annotations

from ._error_root import MigSGXError
from .errors_migration import (
    AwaitingDecisionError,
    CheckpointDamagedError,
    CheckpointGateError,
    CommittedError,
    ConnectionClosedError,
    CriuError,
    DataLinkError,
    DecisionUnknownError,
    DirtyTrackingError,
    DirtyTrackingLostError,
    DirtyTrackingUnavailableError,
    FrameError,
    ImagePinError,
    InDoubtError,
    InspectError,
    LiveMigrationError,
    LostAfterCommitError,
    MemoryDigestError,
    MigrationError,
    PageStreamError,
    PlaintextFoundError,
    PolicyError,
    PostCopyError,
    PostCopyUnavailableError,
    ProtocolError,
    ReplayError,
    SourceEnclaveLostError,
    SourceGoneError,
    SourceLostError,
    StreamError,
)
from .errors_platform import (
    AttestationError,
    ClaimedBeforeError,
    CollateralError,
    CounterError,
    DebugEnclaveError,
    EnclaveBusyError,
    EnclaveError,
    EnclaveLostError,
    EnclaveMemoryError,
    FrozenError,
    GroupDecidedError,
    GroupUncheckedError,
    IdentityMismatchError,
    ImageError,
    ImageMeasurementError,
    ImageSignatureError,
    ImageUnsignedError,
    KeyRequestError,
    LaunchError,
    MigrationRefusedError,
    OutOfThreadSlotsError,
    PersistentStateError,
    PlatformAnswerLostError,
    PlatformError,
    QuoteFormatError,
    QuoteSignatureError,
    RecordConflictError,
    ReportMacError,
    RevokedError,
    RollbackError,
    SealError,
    StaleCollateralError,
    StoreFullError,
    TcbOutOfDateError,
    TcbStatusError,
    UnknownCAError,
    UnknownEcallError,
)

__all__ = [
    "AttestationError",
    "AwaitingDecisionError",
    "CheckpointDamagedError",
    "CheckpointGateError",
    "ClaimedBeforeError",
    "CollateralError",
    "CommittedError",
    "ConfigError",
    "ConnectionClosedError",
    "CounterError",
    "CriuError",
    "DataLinkError",
    "DebugEnclaveError",
    "DecisionUnknownError",
    "DirtyTrackingError",
    "DirtyTrackingLostError",
    "DirtyTrackingUnavailableError",
    "EnclaveBusyError",
    "EnclaveError",
    "EnclaveLostError",
    "EnclaveMemoryError",
    "FrameError",
    "FrozenError",
    "GroupDecidedError",
    "GroupUncheckedError",
    "IdentityMismatchError",
    "ImageError",
    "ImageMeasurementError",
    "ImagePinError",
    "ImageSignatureError",
    "ImageUnsignedError",
    "InDoubtError",
    "InspectError",
    "KeyRequestError",
    "LaunchError",
    "LiveMigrationError",
    "LostAfterCommitError",
    "MemoryDigestError",
    "MigSGXError",
    "MigrationError",
    "MigrationRefusedError",
    "OutOfThreadSlotsError",
    "PageStreamError",
    "PersistentStateError",
    "PlaintextFoundError",
    "PlatformAnswerLostError",
    "PlatformError",
    "PolicyError",
    "PostCopyError",
    "PostCopyUnavailableError",
    "ProtocolError",
    "QuoteFormatError",
    "QuoteSignatureError",
    "RecordConflictError",
    "RecordDamagedError",
    "ReplayError",
    "ReportMacError",
    "RevokedError",
    "RollbackError",
    "SealError",
    "SourceEnclaveLostError",
    "SourceGoneError",
    "SourceLostError",
    "StaleCollateralError",
    "StateDirError",
    "StoreFullError",
    "StreamError",
    "TcbOutOfDateError",
    "TcbStatusError",
    "UnknownCAError",
    "UnknownEcallError",
    "error_from_wire",
    "register_error",
]


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


_ALL: dict[str, type[MigSGXError]] = {}


def _collect(cls: type[MigSGXError]) -> None:
    _ALL.setdefault(cls.code, cls)  # (a subclass that keeps its parent's code is local)
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


# --- a checkpoint directory another tool works on ----------------------------
@register_error
class CheckpointBusyError(MigSGXError):
    """Another tool works on this checkpoint directory now (its checkpoint, a restore,
    or the guardian of either): nothing was done, nothing was touched."""

    code = "checkpoint-busy"


__all__ += ["CheckpointBusyError"]


# --- a source enclave that keeps another party's duplicate of its connection ------
@register_error
class HoldRefusedError(MigrationError):
    """A source enclave refused the migration's ``__mig_hold`` because it keeps a
    duplicate of another party's (``hold-kept``): the migration is rolled back before
    anything is decided, and the source runs on (exit 6)."""

    code = "hold-refused"


__all__ += ["HoldRefusedError"]
