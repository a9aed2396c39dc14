"""Sans-I/O protocol core of enclave state migration.

- :mod:`.handshake`: mutual attestation and key agreement (``docs/spec/handshake.md``);
- :mod:`.stream`: the authenticated chunk stream of enclave state (``docs/spec/stream.md``);
- :mod:`.manifest`: what a transfer carries, section by section (``docs/spec/stream.md``);
- :mod:`.commit`: the exactly-once hand-over (``docs/spec/handshake.md``, section 9);
- :mod:`.seen`: the record of accepted migration ids that makes activation happen once;
- :mod:`.policy`: which enclave may receive the state.

None of these modules imports os, socket, subprocess or threading
(``tests/unit/test_layers.py``); the data path that moves the bytes is
:mod:`migsgx.datapath`.
"""

from .commit import (
    CommitError,
    CommitState,
    Committed,
    DestinationCommit,
    InMemorySeenIds,
    LoadConfirmed,
    SeenMigrationIds,
    SourceCommit,
)
from .handshake import Handshake
from .handshake_terms import (
    NEED_DATA,
    Attester,
    HandshakeComplete,
    HandshakeState,
    KeyConfirmationError,
    LocalProtocolError,
    NeedData,
    PeerAborted,
    ReportDataError,
    Role,
    SessionKeys,
    Verifier,
)
from .manifest import MANIFEST_LABEL, Manifest, Section
from .policy import EnclaveIdentity, MigrationPolicy, PolicyMode
from .stream import StreamHeader, StreamOpener, StreamSealer, StreamSummary
from .stream_channel import StreamChannel

__all__ = [
    "MANIFEST_LABEL",
    "NEED_DATA",
    "Attester",
    "CommitError",
    "CommitState",
    "Committed",
    "DestinationCommit",
    "EnclaveIdentity",
    "Handshake",
    "HandshakeComplete",
    "HandshakeState",
    "InMemorySeenIds",
    "KeyConfirmationError",
    "LoadConfirmed",
    "LocalProtocolError",
    "Manifest",
    "MigrationPolicy",
    "NeedData",
    "PeerAborted",
    "PolicyMode",
    "ReportDataError",
    "Role",
    "Section",
    "SeenMigrationIds",
    "SessionKeys",
    "SourceCommit",
    "StreamChannel",
    "StreamHeader",
    "StreamOpener",
    "StreamSealer",
    "StreamSummary",
    "Verifier",
]
