"""What the source host asks of the destination agent without the tool, each on
a connection of its own (the guardian, ``migsgx recover``): a decision delivered
again (``deliver``), the state again to a fresh enclave of a session held in
doubt (``redeliver``), a refusal of a post-copy session that ended here
(``refuse``, ``docs/spec/commit.md`` 2.2); and the session a restarted agent
makes of a tree a dead one held (:meth:`_Recovery.adopt_held`).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any, Self

import cbor2

from ..containers import HostConfig, make_driver
from ..errors import LostAfterCommitError, MigSGXError
from ..host.appctl import info_from_wire
from ..host.client import EnclaveInfo
from ..sgx.counters import COUNTERS, CounterStore
from .config import AgentHost
from .held import HeldRecord, lost_detail
from .incoming_data import Reply, _Enclave
from .incoming_tree import _TreeSteps
from .protocol import AgentError, SessionState
from .refusal import ACCEPT_TIMEOUT as REFUSAL_WAIT
from .refusal import Refusal, refusable_note, serve_refusal
from .reservations import release_reservations
from .resumed import was_resumed

__all__: list[str] = []


class _Recovery(_TreeSteps):
    """The requests without the tool, and a tree adopted after a restart."""

    #: The refusals this session asked for (``refuse``): their listeners end with it.
    _refusals: list[Refusal]

    @classmethod
    def adopt_held(cls, agent: AgentHost, directory: Path, record: HeldRecord) -> Self:
        """A tree held by a dead agent, taken into a session held in doubt (:mod:`.held`).

        Its loaded copies ended with that agent: every enclave counts as lost
        before its decision, and the session waits for the state again from the
        source host (``redeliver`` on a connection of its own).  No tool will
        come back to it; an authentic decision that reaches a fresh copy ends
        it as usual.  A container is taken over from its engine (the driver's
        ``reclaim``: a :class:`ContainerError` unless the engine still knows it
        as the recorded tree), and then resumed or discarded by it as usual.
        """

        driver = make_driver(
            record.driver,
            HostConfig(agent.config.criu, agent.config.containers,
                       agent.config.platform_socket, agent.config.state),
        )  # fmt: skip
        restored = driver.reclaim(record.handle, record.root)
        session = cls(agent, socket.socket(), record.peer)  # no control connection
        session.tls.close()
        session.session_id = bytes.fromhex(record.session_id)
        session.session_dir = directory  # (its images went with the dead agent: swept)
        session.local_address = record.local
        session.enclaves = [
            _Enclave(i, EnclaveInfo(**info_from_wire(cbor2.loads(bytes.fromhex(item)))))
            for i, item in enumerate(record.enclaves)
        ]
        for enclave in session.enclaves:
            enclave.loaded.set()
            enclave.decided.set()  # (no copy: lost)
        session.driver = driver
        session.restored = restored
        session.root = record.root
        session._claim_fault_done = True  # the fault points are for the first agent
        session.machine.state = SessionState.HELD
        session.abort("adopted after the agent restarted", keep_lost=True)
        return session

    def _until_hung_up(self) -> None:
        """After ``refuse``: until the tool closes this connection (it makes its data
        connection first), or the refusal's own wait ends; then its listener ends."""

        with contextlib.suppress(OSError, MigSGXError):
            self.tls.settimeout(REFUSAL_WAIT)
            self.tls.recv(1)

    def _redeliver_request(self, msg: dict[str, Any]) -> Reply:
        """The same, on a connection of its own: the source's guardian, no tool.

        Only for a session held in doubt, and only from the host that began it
        (the data key of that session goes back on this mutual-TLS connection,
        as it went to the tool in ``ready``).
        """

        target = self.agent.find_session(msg["session_id"], besides=self)
        if target is None or target.session_id not in self.agent.in_doubt():
            raise AgentError("no session held in doubt for this migration")
        if target.peer != self.peer:
            raise AgentError("the state comes again only from the host that began the session")
        port = target.redeliver(msg["index"])
        return {"t": "redelivery", "data_port": port, "data_key": target.data_key}

    def _refuse_request(self, msg: dict[str, Any]) -> Reply:
        """A fresh enclave refuses the id of a post-copy session that ended here (2.2).

        Only for a session whose tree a restarted agent killed after it had
        answered ``restored`` (:mod:`.refusal`), and only from the host that
        began it.  The store refuses an id some enclave claimed, whatever this.
        """

        note = refusable_note(self.config.work_dir, msg["session_id"])
        if note is None:
            raise AgentError("no post-copy session of this migration ended here")
        if note["peer"] != self.peer:
            raise AgentError("a refusal comes only from the host that began the session")
        refusal = serve_refusal(note, msg["index"], msg["session_id"], self.config.platform_socket)
        self._refusals.append(refusal)  # (its listener ends with this session at the latest)
        return {"t": "redelivery", "data_port": refusal.port, "data_key": refusal.key}

    def _deliver_request(self, msg: dict[str, Any]) -> Reply:
        """A decision delivered again, on a connection of its own (``migsgx recover``)."""

        target = self.agent.find_session(msg["session_id"], besides=self)
        aborted = msg.get("decision") == "abort"
        if target is not None:
            if aborted and target.peer != self.peer:
                raise AgentError("an abort comes only from the host that began the session")
            lost = msg.get("source_lost") or [] if aborted else []
            return {
                "t": "delivered",
                **target.deliver(msg["frames"], source_aborted=aborted, lost=lost),
            }
        # No such session (it ended): a restarted agent found its tree with the ids
        # claimed (W3), or this host's platform store (its claims) says whether it ran.
        lost = lost_detail(self.config.work_dir, msg["session_id"])
        if lost is not None:
            return {"t": "delivered", "outcome": LostAfterCommitError.code, "pid": 0}
        if refusable_note(self.config.work_dir, msg["session_id"]) is not None:
            # A post-copy tree killed after it was held: no copy of it can ever run here;
            # the source may revoke its commit on a refusal (``refuse``, commit.md 2.2).
            return {"t": "delivered", "outcome": "refusable", "pid": 0}
        mids = msg.get("enclave_mids") or []
        if not mids:
            # A tree without enclaves: this agent's resume was its commit point.
            resumed = was_resumed(self.config.work_dir, msg["session_id"])
            return {"t": "delivered", "outcome": "resumed" if resumed else "unknown", "pid": 0}
        store = self.config.state / COUNTERS
        if not store.exists():  # (opening it would create it)
            return {"t": "delivered", "outcome": "unknown", "pid": 0}
        claims = CounterStore(store)
        if mids and all(isinstance(m, bytes) and claims.claimed_by_any(m) for m in mids):
            return {"t": "delivered", "outcome": "resumed", "pid": 0}
        # No session of this agent holds these arrivals: a name their dead enclaves
        # reserved must not refuse later arrivals.
        live = self.agent.live_arrivals()
        unclaimed = [m for m in mids if isinstance(m, bytes) and not claims.claimed_by_any(m)]
        with contextlib.suppress(MigSGXError, OSError):
            release_reservations(self.config.state, [m for m in unclaimed if m not in live])
        return {"t": "delivered", "outcome": "unknown", "pid": 0}
