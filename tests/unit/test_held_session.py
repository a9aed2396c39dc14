"""A session held without its tool: when it waits for the state again, and who may send it.

The destination agent's session object alone (no CRIU, no enclave process): a
held tree whose loaded copy died before it judged a decision, and the guardian's
``redeliver`` on a connection of its own.  The integration fault matrix runs the
same with real processes (``test_commit_faults.py``, window W2).
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from migsgx.agent import incoming_settle
from migsgx.agent.config import AgentHost
from migsgx.agent.incoming import IncomingMigration
from migsgx.agent.incoming_data import _Enclave
from migsgx.agent.protocol import AgentError
from migsgx.host.client import EnclaveInfo

SID = bytes(range(16))
INFO = EnclaveInfo(
    pid=7, mr_enclave=bytes(32), mr_signer=bytes(32), isv_prod_id=1, isv_svn=2,
    debug=True, memory_size=1 << 20, thread_slots=2, ecalls=("put",),
)  # fmt: skip


class Agent:
    """What a session asks of its agent: the sessions held in doubt, by id."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(io_timeout=5.0, commit_grace=0.1)
        self.held: dict[bytes, IncomingMigration] = {}

    def in_doubt(self) -> list[bytes]:
        return list(self.held)

    def find_session(self, mid: bytes, besides: Any = None) -> IncomingMigration | None:
        return self.held.get(mid)

    def hold(self, session: IncomingMigration) -> None:
        self.held[session.session_id] = session

    def discard(self, path: Path | None) -> None:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def _session(agent: Agent, peer: str) -> IncomingMigration:
    return IncomingMigration(cast(AgentHost, agent), socket.socket(), peer)


@pytest.fixture
def held() -> tuple[Agent, IncomingMigration]:
    """A tree held in doubt, its one loaded copy dead before its decision, no tool."""

    agent = Agent()
    target = _session(agent, "10.0.0.1")
    target.session_id = SID
    target.local_address = "127.0.0.1"
    target.root = 4242
    lost = _Enclave(0, INFO)
    lost.loaded.set()
    lost.decided.set()
    target.enclaves = [lost]
    agent.held[SID] = target
    return agent, target


def test_a_dead_copy_keeps_the_tree_only_once_the_tool_is_gone(
    held: tuple[Agent, IncomingMigration],
) -> None:
    _, target = held
    assert not target._copies_lost()  # the tool is there: it aborts or delivers again
    target.keep_lost = True
    assert target._copies_lost()
    target.root = None
    assert not target._copies_lost()  # nothing held: nothing waits


def test_the_guardian_gets_a_fresh_copy_and_the_session_key(
    held: tuple[Agent, IncomingMigration],
) -> None:
    agent, target = held
    target.keep_lost = True
    guardian = _session(agent, "10.0.0.1")
    reply = guardian._redeliver({"t": "redeliver", "session_id": SID, "index": 0})
    assert reply is not None and reply["data_key"] == target.data_key and reply["data_port"] > 0
    assert target.enclaves[0].engine is None and not target.enclaves[0].decided.is_set()
    # The fresh copy is still arriving: asked again, nothing more is replaced.
    again = guardian._redeliver({"t": "redeliver", "session_id": SID, "index": 0})
    assert again is not None and again["data_port"] == 0
    for sock in target._listeners:
        sock.close()


def test_only_the_host_that_began_it_may_send_the_state_again(
    held: tuple[Agent, IncomingMigration],
) -> None:
    agent, target = held
    target.keep_lost = True
    stranger = _session(agent, "10.0.0.9")
    with pytest.raises(AgentError, match="only from the host that began"):
        stranger._redeliver({"t": "redeliver", "session_id": SID, "index": 0})
    assert target.enclaves[0].decided.is_set()  # nothing replaced
    with pytest.raises(AgentError, match="no session held in doubt"):
        _session(agent, "10.0.0.1")._redeliver(
            {"t": "redeliver", "session_id": bytes(16), "index": 0}
        )


def test_a_fresh_copy_whose_state_never_came_may_be_replaced(
    held: tuple[Agent, IncomingMigration], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guardian died between ``redelivery`` and its data connection: not for ever."""

    _, target = held
    target.keep_lost = True
    monkeypatch.setattr(incoming_settle, "REDELIVER_ACCEPT", 0.2)
    first = target.redeliver(0)
    assert first > 0
    assert target.enclaves[0].decided.wait(10)  # counted lost once the listener gave up
    assert target._copies_lost()
    second = target.redeliver(0)
    assert second > 0
    for sock in target._listeners:
        sock.close()


def test_an_abort_from_the_host_that_began_it_ends_the_wait_for_the_state(
    held: tuple[Agent, IncomingMigration], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source host's store says ABORT: no state comes again, so the dead copy keeps
    no tree.  Said by another address, it is refused and changes nothing."""

    agent, target = held
    target.keep_lost = True
    monkeypatch.setattr(incoming_settle, "DELIVER_WAIT", 0.2)  # (no settling thread here)
    stranger = _session(agent, "10.0.0.9")
    abort = {"t": "deliver", "session_id": SID, "frames": [b""], "decision": "abort"}
    with pytest.raises(AgentError, match="only from the host that began"):
        stranger._deliver_request(abort)
    assert target._copies_lost() and not target.source_aborted
    target.deliver([b""], source_aborted=True)
    assert not target._copies_lost()  # the tree is no longer kept for the state


@pytest.mark.parametrize("in_ram", [True, False])
def test_a_held_tree_drops_its_spent_images_in_ram_and_keeps_its_records(
    held: tuple[Agent, IncomingMigration], tmp_path: Path, in_ram: bool
) -> None:
    """The tree is restored: images received into RAM (``--images-in-ram``) are spent and
    go when it is held; its records stay for a restarted agent.  Images in the work
    directory share the session's directory with the records, and stay with them."""

    _, target = held
    records = tmp_path / "work" / SID.hex()
    records.mkdir(parents=True)
    (records / "held.json").write_text("{}")
    images = tmp_path / "shm" / "migsgx-dump-1-2-ab" if in_ram else records
    images.mkdir(parents=True, exist_ok=True)
    (images / "pages-1.img").write_bytes(b"pages")
    target.session_dir, target.images_dir = records, images
    target.keep_lost = True
    target._hold("the control connection was lost")
    assert (records / "held.json").exists()
    assert (images / "pages-1.img").exists() is not in_ram
    target._refilled.set()  # (its settle thread waits for the state again)


def test_a_refusal_is_served_only_for_a_noted_session_and_its_host(tmp_path: Path) -> None:
    """``refuse`` makes this host's store refuse a migration id for good: only for a
    post-copy session a restarted agent ended after it was held (its note), and only
    for the host that began it.  The listener it opens takes one data connection
    from that host and nothing of the state."""

    import cbor2

    from migsgx.agent.datalink import CHALLENGE_SIZE, HELLO_SIZE
    from migsgx.agent.held import HeldRecord
    from migsgx.agent.refusal import mark_refusable
    from migsgx.host.appctl import info_to_wire

    agent = Agent()
    agent.config = SimpleNamespace(io_timeout=5.0, commit_grace=0.1, work_dir=tmp_path,
                                   platform_socket=tmp_path / "none.sock")  # fmt: skip
    ask = {"t": "refuse", "session_id": SID, "index": 0}
    with pytest.raises(AgentError, match="no post-copy session"):
        _session(agent, "127.0.0.1")._refuse_request(ask)
    record = HeldRecord(SID.hex(), 0, 0, "pid", "127.0.0.1", "127.0.0.1",
                        [cbor2.dumps(info_to_wire(INFO)).hex()])  # fmt: skip
    mark_refusable(tmp_path / SID.hex(), record)
    with pytest.raises(AgentError, match="only from the host that began"):
        _session(agent, "10.0.0.9")._refuse_request(ask)
    with pytest.raises(Exception, match="no such enclave"):
        _session(agent, "127.0.0.1")._refuse_request({**ask, "index": 1})
    reply = _session(agent, "127.0.0.1")._refuse_request(ask)
    assert reply["t"] == "redelivery" and reply["data_port"] > 0 and len(reply["data_key"]) == 32
    # A connection without the data key's proof is dropped: no offer is read.
    with socket.create_connection(("127.0.0.1", reply["data_port"]), timeout=5) as conn:
        conn.recv(CHALLENGE_SIZE)
        conn.sendall(bytes(HELLO_SIZE))  # (no MAC under the key)
        conn.settimeout(5)
        assert conn.recv(64) == b""
    # And the delivery of a decision for it says so.
    delivered = _session(agent, "127.0.0.1")._deliver_request(
        {"t": "deliver", "session_id": SID, "frames": [b"t"]}
    )
    assert delivered["outcome"] == "refusable"
