"""Errors of a migration and of what carries it: the wire, the migration's
outcomes (failed, in doubt, lost), live and post-copy migration, CRIU, and
inspecting checkpoints.

Re-exported by :mod:`migsgx.errors`, where callers import them.
"""

from __future__ import annotations

from ._error_root import MigSGXError


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


class DecisionUnknownError(InDoubtError):
    """A source enclave's COMMIT reached its platform service, which went away before it
    answered: it may be recorded.  The enclave stays frozen, and aborts only once a
    platform service answered its abort (first decision wins), or commits if that
    service holds its COMMIT (``docs/spec/commit.md``, 1 rule 4)."""

    code = "decision-unknown"


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
