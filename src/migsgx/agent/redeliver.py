"""The state again, without the tool: the guardian's half of window W2.

A committed source enclave keeps its frozen state until it is released, and the
guardian holds its connection once the tool is gone.  When the destination's
loaded copy died before it judged the decision (the agent answers a delivery
with ``copy-lost`` and keeps the tree held), this delivers the state again
exactly as the tool would (``docs/spec/commit.md``, 2.1): the destination agent
is asked, over the agents' mutual-TLS channel, for a fresh enclave
(``redeliver {session_id, index}``); it answers with a data port and the held
session's data key; the source enclave runs a new attested handshake with the
same migration id (the same destination platform only), dumps its frozen state
again and, on the fresh copy's LOADED, issues a COMMIT token of that session.

What the guardian needs for it comes through its pipe from the tool (the
enclave's info and image files, which are not secret); the data key is asked
for when needed and kept in memory only.  Once the guardian is gone too,
``migsgx recover`` takes the enclaves' connections back from the enclaves
themselves (the duplicates they hold, :mod:`.holders`) and the journal names
the same info and image files: it then runs this very code (:class:`HeldSource`).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import cbor2

from ..datapath.outgoing import OutgoingEnclave
from ..errors import InDoubtError, MigSGXError, ProtocolError
from ..host.appctl import info_from_wire, info_to_wire
from ..host.client import EnclaveInfo
from .control import CONNECT_TIMEOUT, AgentConnection, ask_agent
from .datalink import open_data
from .enclave_ask import ask, not_answering
from .faults import fault
from .handback import commit_rest
from .holders import take_held
from .journal import Journal
from .source_host import hand_back
from .tls import AgentIdentity

__all__ = ["HeldEnclave", "HeldSource", "redeliver_state", "revoke_commits"]

CONTROL_TIMEOUT: Final = 30.0
#: Runtime call ids of a re-delivery: far from the tool's (2**40 on) and the
#: guardian's own, and drawn anew by each process that re-delivers, so that a
#: late answer to a call of a dead tool, guardian or recover is never taken.
_CALL_IDS: Final = 1 << 53


@dataclass
class HeldEnclave:
    """A committed source enclave's connection and what its offer names."""

    sock: socket.socket
    info: EnclaveInfo
    image_files: dict[str, bytes]
    mode: str = "pipelined"

    def describe(self) -> str:
        """One guardian pipe note's payload (hex CBOR; nothing in it is secret)."""

        wire = {"info": info_to_wire(self.info), "image_files": self.image_files,
                "mode": self.mode}  # fmt: skip
        return cbor2.dumps(wire).hex()

    def source_end(self, index: int, token: bytes) -> OutgoingEnclave:
        """The source end of enclave ``index`` on this connection, committed (``token``).

        Its runtime call ids are drawn anew (:data:`_CALL_IDS`), so that a late
        answer to a call of a dead tool, guardian or recover is never taken.
        """

        source = OutgoingEnclave(self.sock, self.info, self.image_files, mode=self.mode)
        source.link._ids = _CALL_IDS + (secrets.randbits(24) << 28) + index * (1 << 22)
        source.token = token
        source.index = index
        return source

    @classmethod
    def parse(cls, sock: socket.socket, payload: str) -> HeldEnclave:
        try:
            wire = cbor2.loads(bytes.fromhex(payload))
            files = wire["image_files"]
            if not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()
            ):
                raise ValueError("image files")
            return cls(sock, EnclaveInfo(**info_from_wire(wire["info"])), dict(files),
                       str(wire.get("mode") or "pipelined"))  # fmt: skip
        except (ValueError, KeyError, TypeError, cbor2.CBORDecodeError) as exc:
            raise ProtocolError(f"bad enclave note for the guardian: {exc}") from exc


def _ask(journal: Journal, identity: AgentIdentity, request: str, index: int) -> tuple[int, bytes]:
    """``redeliver`` for enclave ``index``: the data port and the data key."""

    reply = ask_agent(journal.to, identity, "guardian",
                      {"t": request, "session_id": journal.mid, "index": index}, "redelivery",
                      CONTROL_TIMEOUT)  # fmt: skip
    return int(reply["data_port"]), bytes(reply.get("data_key") or b"")


def redeliver_state(
    journal: Journal,
    identity: AgentIdentity,
    held: Mapping[int, HeldEnclave],
    frames: Sequence[bytes],
) -> list[bytes]:
    """Deliver the state of every lost copy again; the decision frames to deliver now.

    ``frames`` are the recorded COMMIT tokens (one per enclave).  An enclave
    whose copy still waits keeps its token; a fresh copy gets a token of its
    own session.  Raises :class:`InDoubtError` when a copy could not be
    replaced (nothing changed: the decision stands, a later attempt may work).
    """

    out = list(frames)
    for index, frame in enumerate(frames):
        enclave = held.get(index)
        if enclave is None:
            raise InDoubtError(f"enclave {index}: the guardian does not hold it")
        try:
            port, key = _ask(journal, identity, "redeliver", index)
            if not port:
                continue  # that copy still waits (or decided): its token goes again
            peer = socket.create_connection((journal.to[0], port), timeout=CONNECT_TIMEOUT)
        except (MigSGXError, OSError) as exc:
            raise InDoubtError(f"enclave {index}: no fresh copy: {exc}") from exc
        source = enclave.source_end(index, bytes(frame))  # committed: the recorded token
        source._finished = True  # a failed attempt never asks it to abort (it cannot)
        try:
            peer.settimeout(None)
            open_data(peer, key, journal.mid, index)
            fault("recover.redeliver")
            out[index] = source.redeliver(peer)
        except (MigSGXError, OSError) as exc:
            if source.token is None or source.token == bytes(frame):
                raise InDoubtError(
                    f"enclave {index}: delivering the state again failed: {exc}"
                ) from exc
            # The fresh copy loaded and a token of its session exists, but it did not
            # confirm on the data connection: that token goes over TLS instead.
            out[index] = source.token
        finally:
            with contextlib.suppress(OSError):
                peer.close()
    return out


def revoke_commits(
    journal: Journal,
    identity: AgentIdentity,
    held: Mapping[int, HeldEnclave],
    kinds: Sequence[str],
) -> None:
    """Undo every committed enclave's commit on the destination's refusal (commit.md, 2.2).

    For a post-copy session that ended on the destination after the COMMIT
    (its tree killed: it can never run).  Per enclave still ``commit``
    (``kinds``, from this host's store; ``revoked`` ones are skipped: a retry),
    the destination agent is asked ``refuse {session_id, index}``; a fresh
    enclave there refuses the id in its claim store for good and proves it, and
    the source enclave revokes its commit and runs on.  Raises
    :class:`InDoubtError` at the first that fails (the agent has no such
    session: its tree may still run; or the store refused: an enclave claimed).
    """

    # All or none is asked: a tree gets its enclaves back only all together.
    unheld = [i for i, k in enumerate(kinds) if k != "revoked" and (k != "commit" or i not in held)]
    if unheld:
        raise InDoubtError(f"enclave(s) {unheld}: not held, or not committed")
    for index, kind in enumerate(kinds):
        if kind == "revoked":
            continue
        # The control connection stays open until the revocation ends: the
        # destination's refusal listener ends with it.
        control = AgentConnection(journal.to, identity, CONTROL_TIMEOUT)
        try:
            control.greet("guardian")  # (an agent of version 1 has no refuse: refused here)
            reply = control.call(
                {"t": "refuse", "session_id": journal.mid, "index": index}, "redelivery"
            )
            key = bytes(reply.get("data_key") or b"")
            peer = socket.create_connection(
                (journal.to[0], int(reply["data_port"])), timeout=CONNECT_TIMEOUT
            )
        except (MigSGXError, OSError) as exc:
            control.close()
            raise InDoubtError(f"enclave {index}: the destination does not refuse: {exc}") from exc
        # (a committed enclave: its recorded token is not needed)
        source = held[index].source_end(index, b"committed")
        try:
            peer.settimeout(None)
            open_data(peer, key, journal.mid, index)
            source.revoke(peer)
        except (MigSGXError, OSError) as exc:
            raise InDoubtError(f"enclave {index}: the commit was not revoked: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                peer.close()
            control.close()  # (only now: the destination's listener ends with it)


@dataclass
class HeldSource:
    """The committed source enclaves' connections, held by whoever carries the decision.

    The guardian (its duplicates of the tool's connections) or ``migsgx
    recover`` (connections taken back from the enclaves).  Both deliver the
    state again by :func:`redeliver_state`, and release the enclaves once the
    destination runs or can never run: each holds a duplicate of its own
    connection, so no end of file would end it.
    """

    enclaves: dict[int, HeldEnclave]

    @classmethod
    def take_back(cls, journal: Journal, hung: dict[int, int] | None = None) -> HeldSource | None:
        """The connections the journal's source enclaves hold, taken back from them.

        For ``migsgx recover`` once the tool and the guardian are both gone (the
        caller checked that, and that no other recover is at it).  Only from the
        recorded enclave processes (:func:`.holders.take_held`); an enclave
        whose offer the journal does not name is left alone, one that does not
        answer goes into ``hung`` (position: pid).  None if none could be taken.
        """

        taken = take_held(journal.holders, hung)
        described = journal.enclaves
        enclaves: dict[int, HeldEnclave] = {}
        for index, sock in taken.items():
            try:
                enclaves[index] = HeldEnclave.parse(sock, described[index])
            except (IndexError, MigSGXError):
                sock.close()
        return cls(enclaves) if enclaves else None

    def redeliver(
        self, journal: Journal, identity: AgentIdentity, frames: list[bytes]
    ) -> list[bytes]:
        return redeliver_state(journal, identity, self.enclaves, frames)

    def revoke(self, journal: Journal, identity: AgentIdentity, kinds: Sequence[str]) -> str:
        """Revoke the commits on the destination's refusal, then hand the source back.

        The fenced tree continues and the application gets its enclaves (now
        live again) back, as after an abort; a note for the outcome's detail.
        """

        revoke_commits(journal, identity, self.enclaves, kinds)
        return hand_back(journal, [self.enclaves[i].sock for i in sorted(self.enclaves)])

    def roll_forward(self, indexes: list[int]) -> None:
        """The undecided ones commit: another enclave of the migration did (``commit_rest``)."""

        commit_rest({i: e.sock for i, e in self.enclaves.items()}, indexes)

    def release(self) -> list[str]:
        """Committed enclaves wipe themselves and exit (any other refuses: nothing happens).

        Each asked within the bound (:mod:`.enclave_ask`).  One that does not
        answer (stopped, or busy) is not released for certain: it keeps its
        committed state, frozen, and the duplicate of its connection that lets
        ``migsgx recover`` take it back; its release stays asked on the
        connection, and it wipes and exits once it reads it.  Nothing here
        closes, forgets or kills it on that timeout (a committed copy is
        never dropped on one).  Returns one note per such enclave, for the log
        and the resolution's detail; the caller keeps the journal's ``holders``.
        """

        unreleased = []
        for index, enclave in sorted(self.enclaves.items()):
            answer = ask(enclave.sock, "__mig_release", [])
            if answer.state == "hung":
                unreleased.append(
                    f"{not_answering(index, enclave.info.pid, '__mig_release')}: it keeps its "
                    "committed state, frozen, until it answers and wipes itself (its release "
                    "is asked already); run migsgx recover again then"
                )  # fmt: skip
            elif (
                answer.msg is not None
                and answer.msg.get("t") == "err"
                and not _not_committed(answer.msg)
            ):
                # It could not release now (one whose COMMIT's answer was lost reads its
                # decision from its platform service first, which may be down): not
                # released, so asked again, never counted as done.
                why = str(answer.msg.get("message", ""))[:200]
                unreleased.append(
                    f"enclave {index} (pid {enclave.info.pid}) could not release its state "
                    f"({answer.msg.get('code', '')}: {why}): it keeps it, frozen; run migsgx "
                    "recover again once its platform service answers"
                )  # fmt: skip
        return unreleased

    def close(self) -> None:
        for enclave in self.enclaves.values():
            with contextlib.suppress(OSError):
                enclave.sock.close()


def _not_committed(reply: dict[str, object]) -> bool:
    """The enclave's answer that it never committed: nothing of ours to release there."""

    return "only a committed source is released" in str(reply.get("message", ""))
