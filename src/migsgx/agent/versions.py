"""Which control-protocol version a tool and an agent speak to each other (no I/O).

Hosts are upgraded one at a time, and a workload must move between an old and
a new host in both directions.  The control schema stays strict (a field it
does not list is a :class:`~migsgx.errors.FrameError`), so a field that a
version added may only travel in a session that negotiated that version.

Negotiation, in the first exchange (``docs/spec/agent-control.md``, section 7):

- the tool's ``hello`` offers the newest version it speaks (:data:`VERSION`);
- an agent answers ``welcome`` with the version of the session: the older of
  the offer and its own newest (:func:`agent_choice`); it refuses a tool older
  than the oldest it speaks (:data:`OLDEST`, or what the operator set with
  ``agent serve --min-protocol``) with ``err`` code ``protocol-version``;
- an agent of version 1 knows no negotiation: it refuses any offer but 1 with
  ``err`` code ``protocol``.  The tool then greets again, on a new connection,
  offering 1 (:func:`retry_offer`): that agent gets version 1's frames;
- the tool refuses a session whose version lacks something this migration
  needs (:data:`NEEDS`, :func:`check_needs`) before anything is frozen.

Within a session each side sends only the fields of its version
(:func:`for_version` leaves the newer ones out; each is optional, and its
absence means what it meant before the version that added it) and refuses a
newer one it receives (:func:`check_version`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from ..errors import MigrationError, ProtocolError, register_error

__all__ = [
    "MESSAGES_SINCE",
    "NEEDS",
    "OLDEST",
    "OVERLAPPED_ORDER",
    "SINCE",
    "VERSION",
    "ProtocolVersionError",
    "agent_choice",
    "check_needs",
    "check_version",
    "for_version",
    "retry_offer",
    "tool_accepts",
]

#: The newest version this code speaks; :data:`OLDEST` the oldest.
VERSION: Final = 2
OLDEST: Final = 1

#: Fields added after version 1: message -> field -> the version that added it.
#: Version 2: ``begin.memory_bytes`` (where the destination puts the images) and
#: ``images_ok.images_fs`` (the file system they went to, for the tool's figures).
SINCE: Final[Mapping[str, Mapping[str, int]]] = {
    "begin": {"memory_bytes": 2},
    "images_ok": {"images_fs": 2},
    # The source enclaves found dead with an ABORT delivery (to a version 1 agent the
    # delivery goes without it, as before: its copies wait for their decision).
    "deliver": {"source_lost": 2},
}

#: Requests added after version 1, and the version that added them.  Version 2:
#: ``refuse`` (a post-copy session that ended after the COMMIT: a fresh enclave
#: refuses the migration id, ``docs/spec/commit.md`` 2.2).
MESSAGES_SINCE: Final[Mapping[str, int]] = {"refuse": 2}

#: The version whose state table has the overlapped order (images and restore
#: before ``enclaves_done``: ``agent-control.md`` section 3); a version 1 agent
#: refuses an ``image`` in ``receiving``, so with it the tool keeps the sequential one.
OVERLAPPED_ORDER: Final = 2

#: What a migration may need of the destination agent, and the oldest version
#: that has it.  A need whose version the session lacks is refused at ``welcome``
#: (the source has not been touched).  Everything a migration can ask for today
#: came with version 1; a feature that an old agent would silently get wrong
#: (not merely leave out) comes with a new version and an entry here.
NEEDS: Final[Mapping[str, int]] = {
    "process": 1,  # a process tree (driver pid), pages on the page server
    "containers": 1,  # drivers runc, podman, containerd
    "page-relay": 1,  # sealed page frames relayed by the agents
    "post-copy": 1,  # --post-copy: CRIU lazy pages after the commit
    "preflight": 1,  # begin's spec and ports, checked before the freeze
}

#: How a version 1 agent refuses any other version (its ``err`` code).
_V1_REFUSAL: Final = "protocol"


@register_error
class ProtocolVersionError(MigrationError):
    """Tool and agent have no protocol version in common that this migration can use."""

    code = "protocol-version"


def agent_choice(offered: int, oldest: int = OLDEST, newest: int = VERSION) -> int:
    """The agent's side: the session's version for a ``hello`` offering ``offered``."""

    if offered < 1:
        raise ProtocolError(f"protocol version {offered} does not exist")
    if offered < oldest:
        raise ProtocolVersionError(
            f"the tool speaks control protocol versions up to {offered}, this agent "
            f"{_span(oldest, newest)}: upgrade migsgx on the source host"
        )
    return min(offered, newest)


def retry_offer(offered: int, err_code: str) -> int | None:
    """The tool's side: the version to offer again after ``hello`` was refused, or None.

    Only a version 1 agent refuses a valid offer with ``protocol``; it speaks
    version 1 alone.
    """

    return 1 if err_code == _V1_REFUSAL and offered > 1 else None


def tool_accepts(offered: int, answered: int) -> int:
    """The tool's side: the session's version from ``welcome`` (checked)."""

    if not 1 <= answered <= offered:
        raise ProtocolError(
            f"the agent answered protocol version {answered} to an offer of {offered}"
        )
    return answered


def check_needs(version: int, needs: Iterable[str], *, peer: str = "the agent") -> None:
    """Refuse a session of ``version`` that lacks one of ``needs`` (names of :data:`NEEDS`)."""

    missing = sorted(n for n in set(needs) if NEEDS[n] > version)
    if missing:
        wanted = max(NEEDS[n] for n in missing)
        raise ProtocolVersionError(
            f"{peer} speaks control protocol version {version}; this migration needs "
            f"{', '.join(missing)} (version {wanted}): upgrade migsgx on the destination "
            "host, or migrate without it; nothing moved"
        )


def for_version(msg: Mapping[str, Any], version: int) -> dict[str, Any]:
    """``msg`` as a peer of ``version`` reads it: the fields it does not know left out.

    A request the version does not have cannot be left out: that is a
    :class:`ProtocolVersionError` (the caller cannot do what it asked for).
    """

    kind = str(msg.get("t"))
    since = MESSAGES_SINCE.get(kind, 1)
    if since > version:
        raise ProtocolVersionError(
            f"the agent speaks control protocol version {version}, which has no {kind!r} "
            f"request (version {since}): upgrade migsgx on the destination host"
        )
    newer = SINCE.get(kind, {})
    return {k: v for k, v in msg.items() if newer.get(k, 1) <= version}


def check_version(msg: Mapping[str, Any], version: int) -> None:
    """Refuse a message or field that a session of ``version`` does not have (the schema
    stays strict)."""

    kind = str(msg.get("t"))
    if MESSAGES_SINCE.get(kind, 1) > version:
        raise ProtocolError(f"{kind!r} is not in control protocol version {version}")
    newer = SINCE.get(kind, {})
    extra = sorted(k for k in msg if newer.get(k, 1) > version)
    if extra:
        raise ProtocolError(
            f"{msg['t']}: field {', '.join(extra)} is not in control protocol version {version}"
        )


def _span(oldest: int, newest: int) -> str:
    return f"version {oldest}" if oldest == newest else f"versions {oldest} to {newest}"
