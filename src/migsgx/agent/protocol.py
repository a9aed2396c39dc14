"""The control protocol between the migration tool and a destination agent (sans I/O).

Version 2 (:mod:`.versions`: which version a session speaks, and the fields
each added), one mutual-TLS connection per migration, request and answer in
lock step; every message is one frame of :mod:`migsgx.wire` (length-prefixed,
size-capped CBOR, checked against :data:`CONTROL`).  See ``docs/migration.md``.

Tool -> agent, in this order::

    hello          -> welcome
    begin          -> ready            (session: data and page-server ports, token;
                                        the driver that restores: pid, runc, podman;
                                        refused at once for an OCI specification or a
                                        listening port the restore would refuse)
    enclaves_done  -> enclaves_ready   (every incoming enclave verified and LOADED)
    image*, images_done -> images_ok   (the CRIU images without the pages)
    restore        -> restored         (the tree exists, SIGSTOPped: held)
    redeliver*     -> redelivery       (held, committed: a destination enclave lost
                                        before it claimed gets a fresh one, whose
                                        state comes again on a new data connection)
    resume         -> resumed          (enclaves committed, tree running, attached)

Overlapped (the tool's default, ``migrate --no-overlap-restore`` keeps the
order above): the images and the restore may come while the enclaves still
load, before ``enclaves_done``::

    image*, images_done -> images_ok   (in RECEIVING: images-early, then
                                        images-complete-early)
    restore        -> restored         (the tree held, its enclaves not all LOADED:
                                        held-loading; its record is not answered,
                                        so a restarted agent removes the tree)
    enclaves_done  -> enclaves_ready   (every enclave LOADED, alive; the record
                                        answered and fsync'd: held)

The commit point does not move: the source decides only after both
``restored`` and ``enclaves_ready`` were answered, and the tree stays stopped
until ``resume``.

A connection of its own may instead carry, after ``hello``, one ``deliver``
(-> ``delivered``): a source's recorded decision (COMMIT tokens or ABORT
frames) for a migration whose tool went away (``docs/spec/commit.md``); or
one ``redeliver {session_id, index}`` (-> ``redelivery {data_port,
data_key}``): a committed source enclave held by the source host's guardian
delivers its state again to a fresh enclave of a session held in doubt; or
one ``refuse {session_id, index}`` (-> ``redelivery {data_port, data_key}``):
for a post-copy session that ended here after the COMMIT, a fresh enclave
refuses the migration id for good (``docs/spec/commit.md``, 2.2).

``abort`` (-> ``aborted``) is allowed in every state before ``resumed``; any
failure is answered with ``err`` and ends the session.  :class:`SessionMachine`
is the table of which request may come in which state; anything else is a
:class:`~migsgx.errors.ProtocolError`.

Data connections (plain TCP to the session's data port) start with one
``data`` frame naming the session token and the enclave index; the enclave
migration stream follows, end-to-end protected by the enclaves themselves.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from ..errors import MigrationError, ProtocolError, register_error
from ..limits import MAX_IMAGE_BYTES
from ..wire import Schema
from .versions import VERSION

__all__ = [
    "CONTROL",
    "CONTROL_FRAME_MAX",
    "IMAGE_CHUNK",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_FILES",
    "PHASES",
    "VERSION",
    "AgentError",
    "PastCommitError",
    "RefusedError",
    "SessionMachine",
    "SessionState",
    "check_image_name",
    "enclave_indices",
    "plain_stats",
]

#: A control frame holds at most one image chunk plus a little framing.
CONTROL_FRAME_MAX: Final = 2 << 20
IMAGE_CHUNK: Final = 1 << 20
#: The images CRIU writes besides the pages are small (hundreds of KiB for a
#: Python process); these caps bound what a peer can make an agent store.
MAX_IMAGE_FILES: Final = 4096
MAX_ENCLAVES: Final = 64

#: The per-phase figures ``migsgx migrate --json`` prints (seconds, and bytes).
PHASES: Final = (
    "freeze",
    "enclave_dump",
    "criu_dump",
    "transfer",
    "restore",
    "enclave_load",
    "total",
    "downtime",
)

NONE = type(None)
NUMBER = (int, float)


@register_error
class AgentError(MigrationError):
    """The destination agent refused or failed a migration step."""

    code = "agent"


@register_error
class RefusedError(AgentError):
    """The destination agent answered a request with an error (and aborted its side)."""

    code = "agent-refused"


@register_error
class PastCommitError(AgentError):
    """A ``resume`` failed after the destination recorded it (a tree without enclaves).

    That record is the commit point of a migration without enclaves
    (``docs/spec/commit.md`` 4.3): the destination's tree is the copy from then
    on, whether or not it runs yet, so the tool must not give its source back;
    it ends in doubt, and whoever asks the destination again hears ``resumed``.
    """

    code = "agent-past-commit"


CONTROL = Schema(
    "agent-control",
    {
        # tool -> agent
        "hello": {"version": int, "host_id": str},
        "begin": {
            "session_id": bytes,  # this agent session (not an enclave's migration_id)
            "enclaves": list,  # [{"info": an enclave info (app-control.md, section 5)}]
            "pids": list,  # every pid of the dumped tree, as the source sees them
            "pidns": bool,  # the root is the init of its own pid namespace
            "tcp_close": bool,
            "page_tls": bool,  # the page server speaks TLS with the agent identities
            # Optional (absent: a process tree with CRIU's pages on the page server):
            "driver": (str, NONE),  # what migrates: "pid", "runc", "podman" (migsgx.containers)
            "target": (dict, NONE),  # the driver's description of it (e.g. {"id": ...})
            "page_server": (bool, NONE),  # whether the tool's CRIU connects to the page server
            "post_copy": (bool, NONE),  # process pages pulled lazily after the commit
            # The page connection carries sealed frames (docs/spec/pagestream.md), keys
            # from the session's data key; CRIU speaks plain on a local socket each side.
            "page_relay": (bool, NONE),
            # Checked before the source freezes (agent.preflight); the restore checks again:
            "spec": (dict, NONE),  # a container's OCI runtime specification
            "ports": (list, NONE),  # pid: [{"proto", "address", "port"}] it listens on
            # Where the destination puts the images (RAM if it has room; untrusted):
            "memory_bytes": (int, NONE),  # the tree's resident anonymous and shared memory
        },
        "enclaves_done": {},
        "image": {"name": str, "data": bytes},
        "images_done": {"files": int, "bytes": int},
        # Post-copy: the port the source's CRIU serves lazy pages on (at the tool's address).
        "restore": {"lazy_port": (int, NONE)},
        # Optional: the COMMIT tokens (one per enclave, b"" for none) delivered again.
        "resume": {"tokens": (list, NONE)},
        # The source committed, but enclave ``index``'s copy did not confirm that it runs.
        # On a connection of its own (after hello) it names the session held in doubt.
        "redeliver": {"index": int, "session_id": (bytes, NONE)},
        # On a connection of its own (after hello): a post-copy session that ended here
        # after the COMMIT (its tree killed, commit.md 6 item 5): enclave ``index``'s
        # migration id is refused for good by a fresh enclave (commit.md 2.2).
        "refuse": {"index": int, "session_id": bytes},
        # Optional: the source enclaves' ABORT frames, for destination enclaves past LOADED;
        # ``source_lost``: indices of enclaves whose source enclave died before it was asked
        # to decide (no frame can ever come: their copies end, commit.md section 5, W1).
        "abort": {"reason": str, "frames": (list, NONE), "source_lost": (list, NONE)},
        # On a connection of its own (after hello): a decision delivered again.  Optional
        # ``decision``: "abort" when the source host's store holds ABORT decisions (a held
        # tree whose loaded copy died undecided is then discarded: commit.md, 2).
        "deliver": {
            "session_id": bytes,
            "frames": list,
            "enclave_mids": (list, NONE),
            "decision": (str, NONE),
            # With "abort": as ``abort``'s ``source_lost`` (the guardian found them dead).
            "source_lost": (list, NONE),
        },
        # agent -> tool
        "welcome": {"version": int, "host_id": str},
        "ready": {"data_port": int, "page_port": int, "data_key": bytes},
        "enclaves_ready": {"stats": list},
        # images_fs: the file system the destination received them into (its figures).
        "images_ok": {"page_bytes": int, "seconds": NUMBER, "images_fs": (str, NONE)},
        "restored": {"pid": int, "seconds": NUMBER},
        "resumed": {"seconds": NUMBER, "attach_seconds": NUMBER, "pid": int},
        # Post-copy, after "resumed": the last page arrived (or "err" post-copy-source-lost).
        "window": {"seconds": NUMBER},
        # data_port 0: that enclave still waits (or decided); else a fresh one listens there.
        # data_key: on a connection of its own, the held session's (for the data connection).
        "redelivery": {"data_port": int, "data_key": (bytes, NONE)},
        "aborted": {"held": (bool, NONE)},  # held: kept in doubt (a copy past LOADED)
        # outcome: "resumed", "aborted", "waiting" (not all enclaves decided), "unknown",
        # "copy-lost" (a loaded copy died undecided: the tree waits for the state again),
        # "refusable" (a post-copy tree killed after it was held: ``refuse`` may follow).
        "delivered": {"outcome": str, "pid": int},
        "err": {"code": str, "message": str},
    },
)


class SessionState(enum.Enum):
    NEW = "new"
    GREETED = "greeted"
    RECEIVING = "receiving"
    LOADED = "loaded"
    IMAGES = "images"
    IMAGES_COMPLETE = "images-complete"
    #: The images while the enclaves still load (before ``enclaves_done``).
    EARLY_IMAGES = "images-early"
    EARLY_IMAGES_COMPLETE = "images-complete-early"
    #: Restored and stopped, the enclaves not all LOADED: never adopted after a restart.
    HELD_LOADING = "held-loading"
    HELD = "held"
    RESUMED = "resumed"
    ABORTED = "aborted"
    DELIVERED = "delivered"  # a connection that only delivered a decision


S = SessionState
_TABLE: Final[Mapping[SessionState, Mapping[str, SessionState]]] = {
    S.NEW: {"hello": S.GREETED},
    S.GREETED: {
        "begin": S.RECEIVING,
        "abort": S.ABORTED,
        "deliver": S.DELIVERED,
        "redeliver": S.DELIVERED,
        "refuse": S.DELIVERED,
    },
    S.RECEIVING: {
        "enclaves_done": S.LOADED,
        "image": S.EARLY_IMAGES,
        "images_done": S.EARLY_IMAGES_COMPLETE,
        "abort": S.ABORTED,
    },
    S.EARLY_IMAGES: {
        "image": S.EARLY_IMAGES,
        "images_done": S.EARLY_IMAGES_COMPLETE,
        "abort": S.ABORTED,
    },
    S.EARLY_IMAGES_COMPLETE: {
        "restore": S.HELD_LOADING,
        "enclaves_done": S.IMAGES_COMPLETE,
        "abort": S.ABORTED,
    },
    S.HELD_LOADING: {"enclaves_done": S.HELD, "abort": S.ABORTED},
    S.LOADED: {"image": S.IMAGES, "images_done": S.IMAGES_COMPLETE, "abort": S.ABORTED},
    S.IMAGES: {"image": S.IMAGES, "images_done": S.IMAGES_COMPLETE, "abort": S.ABORTED},
    S.IMAGES_COMPLETE: {"restore": S.HELD, "abort": S.ABORTED},
    S.HELD: {"resume": S.RESUMED, "abort": S.ABORTED, "redeliver": S.HELD},
    S.RESUMED: {},
    S.ABORTED: {},
    S.DELIVERED: {},
}


@dataclass
class SessionMachine:
    """Which request may come next; a request out of turn raises :class:`ProtocolError`."""

    state: SessionState = SessionState.NEW
    history: list[str] = field(default_factory=list)

    def advance(self, request: str) -> SessionState:
        allowed = _TABLE[self.state]
        if request not in allowed:
            raise ProtocolError(
                f"request {request!r} is not allowed in state {self.state.value}",
                state=self.state.value,
            )
        self.state = allowed[request]
        self.history.append(request)
        return self.state

    def fail(self) -> None:
        """An error ends the session: nothing is accepted afterwards."""

        self.state = SessionState.ABORTED

    @property
    def finished(self) -> bool:
        return self.state in (SessionState.RESUMED, SessionState.ABORTED, SessionState.DELIVERED)


def plain_stats(stats: Mapping[str, object]) -> dict[str, int | float | str | bool | None]:
    """An end's figures as the control protocol carries them: plain scalars only.

    ``enclaves_ready`` and ``migsgx migrate --json`` show an enclave transfer's
    figures; nested maps (the peer's own figures) stay out.
    """

    return {k: v for k, v in stats.items() if v is None or isinstance(v, int | float | str | bool)}


# CRIU names its images like ``core-1.img``, ``pagemap-1.img``, ``stats-dump``.
_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_image_name(name: str) -> str:
    """A plain file name (no path, no dot-files); anything else is a protocol error."""

    if not _IMAGE_NAME.fullmatch(name) or name in (".", ".."):
        raise ProtocolError(f"bad image file name {name!r}")
    return name


def enclave_indices(value: object, count: int, what: str = "source_lost") -> list[int]:
    """A peer's list of indices of a session's ``count`` enclaves; else a protocol error.

    ``True`` is an ``int`` to Python (``isinstance(True, int)``), and as an index
    it names enclave 1: a boolean is refused here, as :class:`~migsgx.wire.Schema`
    refuses one for an ``int`` field.
    """

    if not isinstance(value, list | tuple) or not all(
        type(i) is int and 0 <= i < count for i in value
    ):
        raise ProtocolError(f"{what}: indices of this session's enclaves")
    return list(value)
