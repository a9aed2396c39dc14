"""A runc container that owns its address keeps its clients' TCP connections across a move.

Real runc, CRIU (``--tcp-established``), a bridged testbed (both hosts' bridges
on one segment): the kvstore app runs in a pod network namespace of its own
with an address and MAC of its own; a client on the other host holds one TCP
connection to it and writes through it before, during and after a live move,
while another opens a new connection for every request (some of them are
half made when the source locks its network).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.register_assert_rewrite("bed_helpers", "fault_helpers")

from bed_helpers import Writer, wait_until  # noqa: E402
from fault_helpers import EXIT_IN_DOUBT, recover  # noqa: E402

from migsgx.lab.containers import ContainerApp, ContainerLab  # noqa: E402
from migsgx.lab.testbed import AgentProcess, Testbed  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
#: This module's subnet (no other module's testbed uses it).
BED_SUBNET = 93
BED_BRIDGED = True  # the pod's address moves between the hosts' bridge ports
BED_CONTAINERS = True  # the agent starts after the lab (it reads containers.toml)


class Dialer(threading.Thread):
    """A new connection for every request (handshakes in flight at the freeze)."""

    def __init__(self, lab: ContainerLab, app: ContainerApp) -> None:
        super().__init__(daemon=True)
        self.lab, self.app = lab, app
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                # A SYN sent while the address is locked is dropped and sent again at
                # 1, 3, 7, 15, 31, 63 s: under load the lock can outlast the 30 s default.
                conn = self.lab.connect(self.app, via="src", timeout=100)
                with conn:
                    reply = ask(conn, "PING")
            except (OSError, AssertionError) as exc:
                self.errors.append(repr(exc))
                continue
            if reply == "PONG":
                self.ok += 1
            else:
                self.errors.append(reply)


def ask(conn: socket.socket, line: str) -> str:
    conn.sendall(line.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        assert chunk, "the connection closed"
        data += chunk
    return data.decode().strip()


def test_client_connection_survives_a_live_move(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    app = lab.start_app("runc", "kvstore", own_address=True)
    pod_src = Path("/run/netns") / f"{lab.settings['src'].pod_netns_prefix}{app.name}"
    assert pod_src.exists()
    writer = Writer(lab.connect(app, via="dst"), pause=0.01)
    other = lab.connect(app, via="src")  # an idle connection from the source host
    dialer = Dialer(lab, app)
    writer.start()
    dialer.start()
    wait_until(lambda: writer.ok["before"] >= 5 or writer.error is not None, 20, "writes")
    writer.phase = "during"
    run = bed.migrate(None, agent, args=["--runc", app.name, "--live"])
    writer.phase = "after"
    wait_until(lambda: writer.ok["after"] >= 5 or writer.error is not None, 30, "writes after")
    ok_after = dialer.ok
    wait_until(lambda: dialer.ok > ok_after or bool(dialer.errors), 110, "a new connection after")
    writer.finish()
    dialer.stop.set()
    dialer.join(110)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stats is not None
    assert run.stats["details"]["tcp_established"] is True
    assert writer.error is None  # not one failed request
    assert dialer.errors == []  # nor a connection refused, reset or lost in a handshake
    assert writer.ok["before"] >= 5 and writer.ok["during"] >= 1 and writer.ok["after"] >= 5
    # Every acknowledged write is there, asked over the idle connection that also moved.
    for n in writer.acked:
        assert ask(other, f"GET w{n}") == f"VALUE {n:08x}"
    other.close()
    # The address left the source with the container; one runnable copy, on dst.
    assert not pod_src.exists()
    assert lab.runnable_copies(app) == {"src": 0, "dst": 1}
    assert app.name in lab.containers("dst", "runc")
    assert app.name not in lab.containers("src", "runc")
    lab.remove(app)


def _writes(conn: socket.socket, start: int, count: int) -> None:
    for n in range(start, start + count):
        assert ask(conn, f"PUT f{n} {n:08x}").startswith("OK")


def _check_source_kept(lab: ContainerLab, app: ContainerApp, conn: socket.socket) -> None:
    """The source runs on at its address; the client's connection still works."""

    _writes(conn, 100, 3)
    assert ask(conn, "GET f1") == f"VALUE {1:08x}"
    assert lab.runnable_copies(app) == {"src": 1, "dst": 0}
    assert app.name not in lab.containers("dst", "runc")
    dst_pod = Path("/run/netns") / f"{lab.settings['dst'].pod_netns_prefix}{app.name}"
    assert not dst_pod.exists()  # the destination gave the address up again


def test_restore_failing_leaves_the_source_at_its_address(bed: Testbed, lab: ContainerLab) -> None:
    failing = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-restore:corrupt"})
    app = lab.start_app("runc", "kvstore", own_address=True)
    conn = lab.connect(app, via="dst")
    _writes(conn, 1, 3)
    run = bed.migrate(None, failing, args=["--runc", app.name, "--live"])
    assert run.returncode == 6, run.stderr
    _check_source_kept(lab, app, conn)
    conn.close()
    failing.stop()
    lab.remove(app)


def test_tool_dying_before_the_commit_point_unlocks_the_source(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    """The guardian brings the source's network back (``netup``) and thaws it."""

    app = lab.start_app("runc", "kvstore", own_address=True)
    conn = lab.connect(app, via="dst")
    _writes(conn, 1, 3)
    run = bed.migrate(None, agent, env={"MIGSGX_FAULT": "tool.before-commit:exit"},
                      args=["--runc", app.name])  # fmt: skip
    assert run.returncode == 70
    assert "resuming the source" in run.stderr
    wait_until(lambda: app.name not in lab.containers("dst", "runc"), 15, "dst to let go")
    wait_until(lambda: lab.runnable_copies(app)["src"] == 1, 15, "the source to thaw")
    _check_source_kept(lab, app, conn)
    conn.close()
    lab.remove(app)


def test_a_destination_takes_no_address_it_was_not_given(bed: Testbed, lab: ContainerLab) -> None:
    """An agent without the address in its pod_addresses refuses at ``begin``."""

    narrow = replace(lab.settings["dst"], pod_addresses=())
    narrow.save(bed.state("dst"))
    try:
        strict = bed.start_agent()
    finally:
        lab.settings["dst"].save(bed.state("dst"))
    app = lab.start_app("runc", "kvstore", own_address=True)
    conn = lab.connect(app, via="dst")
    _writes(conn, 1, 3)
    run = bed.migrate(None, strict, args=["--runc", app.name])
    assert run.returncode == 6
    assert f"refused: {app.extra['address']}/24 is not one of this host's pod_addresses" in (
        run.stderr
    )
    _check_source_kept(lab, app, conn)
    conn.close()
    strict.stop()
    lab.remove(app)


def test_a_restarted_agent_adopts_a_held_container_that_owns_its_address(
    bed: Testbed, lab: ContainerLab
) -> None:
    """The destination agent dies as the COMMIT reaches its loaded copy (W2): the
    restarted agent adopts the container held in the pod namespace it took, and
    after one ``migsgx recover`` the container runs at its address there, with
    every write (its pod namespace opened by the adopted session, as by the first)."""

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-claim:kill"})
    restarted: AgentProcess | None = None
    app = lab.start_app("runc", "kvstore", own_address=True)
    try:
        conn = lab.connect(app, via="dst")
        _writes(conn, 1, 3)
        conn.close()
        digest = lab.ask(app, "DIGEST", at="src")
        run = bed.migrate(None, doomed, args=["--runc", app.name])
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert doomed.proc.wait(timeout=30) == -9
        restarted = bed.start_agent(listen_port=doomed.port)
        assert "adopted the tree" in restarted.log.read_text(errors="replace")
        again = recover(bed)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "moved" in {r["outcome"] for r in json.loads(again.stdout)}, again.stdout
        wait_until(lambda: lab.runnable_copies(app)["dst"] == 1, 60, "the destination to run")
        assert lab.runnable_copies(app)["src"] == 0  # committed: frozen and fenced
        lab.remove_on("runc", app.name, "src")  # (gives its address up there)
        assert lab.ask(app, "DIGEST", at="dst") == digest
        assert lab.ask(app, "PUT after " + b"x".hex(), at="dst").startswith("OK")
    finally:
        for agent in (doomed, restarted):
            if agent is not None:
                agent.stop()
        lab.remove(app)
