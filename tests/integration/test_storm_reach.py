"""Faults the storm counts must happen, and a peer that goes away must not hold a session.

* ``migsgx migrate --live``: the ``tool.after-handshake`` fault fires at its place
  (every enclave's pre-copy handshake done, no round yet, nothing frozen).  Before,
  only the early handshake of a stop-and-copy migration reached it: under
  ``--live`` the fault did nothing, the migration moved, and the storm counted the
  fault as tested.  Now the storm fails a migration whose fault did not fire.
* A peer of the destination agent that ends the images (``images_done``), asks
  ``restore`` and hangs up without ever opening its page connection: the agent
  noticed only when its page listener's accept gave up (the I/O time limit,
  300 s), holding the session's work directory all that while.  Now the wait for
  the page connection has its own bound and ends at once with the control
  connection.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_fixtures import wait_until

from migsgx.agent.protocol import VERSION, AgentError
from migsgx.agent.server import Agent, AgentConfig
from migsgx.agent.source import AgentConnection
from migsgx.agent.tls import issue_agent_identity
from migsgx.lab.storm import Storm, as_json
from migsgx.lab.storm_faults import parse
from migsgx.lab.testbed import Testbed
from migsgx.sgx.ca import ProvisioningCA

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 191
LOOPBACK = "127.0.0.1"


# --- --live: the handshake's fault point is reached -------------------------------------------
def test_a_live_migration_reaches_its_handshake_fault(bed: Testbed) -> None:
    storm = Storm(bed, 0, engine="pid", options=["--live"])
    try:
        out = storm.one(0, parse("tool.after-handshake:drop-data"))
    finally:
        storm.target.remove()
    assert out.points == {"tool.after-handshake": True}, as_json(out)
    assert out.failures == [], as_json(out)
    # The data connections dropped after the handshake: the rounds fail, nothing was
    # frozen, the source runs on with every write.
    assert (out.outcome, out.exit) == ("stayed", 6), as_json(out)


# --- a peer that hangs up before its page connection ---------------------------------------------
@pytest.fixture(scope="module")
def agent_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A destination agent in this process on loopback (no platform service: no
    enclave is announced), with the default I/O time limit (300 s)."""

    root = tmp_path_factory.mktemp("storm-reach")
    ProvisioningCA.init(root / "ca")
    identity = issue_agent_identity(root / "ca", root / "dst", "dst", [LOOPBACK])
    agent = Agent(
        AgentConfig(
            state=root / "dst", listen=(LOOPBACK, 0), platform_socket=root / "no-platform.sock",
            identity=identity, work_dir=root / "work", subreaper=False,
        )
    )  # fmt: skip
    _, port = agent.bind()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    yield root, port
    agent.shutdown()
    thread.join(5)


def _begun(root: Path, port: int) -> tuple[AgentConnection, Path]:
    """A session begun for a process tree whose pages come to a page server (CRIU's
    TLS); its work directory."""

    identity = issue_agent_identity(root / "ca", root / "src", "src", [LOOPBACK])
    conn = AgentConnection((LOOPBACK, port), identity, 60.0)
    conn.call({"t": "hello", "version": VERSION, "host_id": "src"}, "welcome")
    mid = secrets.token_bytes(16)
    conn.call(
        {"t": "begin", "session_id": mid, "enclaves": [], "pids": [], "pidns": True,
         "tcp_close": True, "page_tls": True},
        "ready",
    )  # fmt: skip
    work = root / "work" / mid.hex()
    assert work.is_dir()
    return conn, work


def test_a_peer_gone_before_its_page_connection_frees_the_session_at_once(
    agent_root: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    conn, work = _begun(*agent_root)
    with caplog.at_level(logging.WARNING, logger="migsgx"):
        conn.send({"t": "images_done", "files": 0, "bytes": 0})
        conn.send({"t": "restore"})
        conn.close()  # no page connection ever came
        # (a bound well under the I/O time limit the agent waited before)
        assert wait_until(lambda: not work.exists(), 30), "the work directory is still held"
    assert "hung up before its page connection" in caplog.text


def test_a_peer_that_never_opens_its_page_connection_is_refused_within_the_step_bound(
    agent_root: tuple[Path, int],
) -> None:
    conn, work = _begun(*agent_root)
    try:
        with pytest.raises(AgentError, match="no page connection within"):
            conn.call({"t": "images_done", "files": 0, "bytes": 0}, "images_ok")
    finally:
        conn.close()
    assert wait_until(lambda: not work.exists(), 30), "the work directory is still held"
