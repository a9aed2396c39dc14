"""The source runs again promptly, whatever step the tool is in when a fault comes.

Cells of a plain process (the kvstore example, real CRIU, two namespaced
hosts), each reached through a named point (``MIGSGX_FAULT``, no sleeping):

- ``tool.in-dump`` is CRIU's dump with the tree frozen, before it dumped any of
  it (its ``query-ext-files`` notification, which the tool answers).  A stall of
  the control connection there is held in the dump until the tool gives the dump
  up (at most ``source_dump.IN_DUMP_HOLD``, 20 s): the step the tool is inside
  does not use the connection, so only a liveness of the connection of its own
  (``_net.LivenessWatch``) notices the stall there; the kernel's bound counted
  from the connection's first use after the dump.  The cell checks that the dump
  was stopped (CRIU never reached ``dumped``) and why; the seconds from the
  fault to the source answering are figures (``fault-matrix``), not asserts.
- a client that connects (a new connection each time) while the tree is frozen:
  CRIU refused to dump a listener holding a connection not yet accepted
  (``In-flight connection``) and the migration failed.  The pid driver now gates
  the tree's listeners from before the freeze until the dump ended, as the
  container drivers do (``containers/gate.py``): the client's SYN waits, and it
  finds the application at the destination, every acknowledged write there.
- the tool killed there, the gate closed: the guardian opens it (the gate's
  ``ungate`` note, noted before it closed), so new clients reach the source again
  (without the note the gate stayed closed and the source answered nobody).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest
from bed_helpers import ask, end_copies, wait_until
from fault_helpers import (
    EXIT_OK,
    heal,
    loaded_app,
    no_images_left,  # noqa: F401  (autouse: after every cell, no images left in /dev/shm)
    stayed,
)

from migsgx.lab.testbed import AgentProcess, AppProcess, MigrateRun, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 187

#: Fault kind -> the tool's ``MIGSGX_FAULT`` (with ``MIGSGX_TRACE``: its steps on stderr).
STALLS = {"control connection stall inside CRIU's dump": "tool.in-dump:stall-control"}


@pytest.mark.parametrize("kind", list(STALLS))
def test_stall_inside_the_dump_stops_it(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], kind: str
) -> None:
    """The control connection stalls while CRIU dumps: the dump stops, the source runs."""

    app, digest = loaded_app(bed)
    try:
        run = bed.migrate(app.pid, agent, env={"MIGSGX_FAULT": STALLS[kind], "MIGSGX_TRACE": "1"})
    finally:
        heal(bed, "src")
    assert "Traceback" not in run.stderr, run.stderr
    assert "migsgx fault: tool.in-dump:stall-control" in run.stderr, run.stderr
    # Noticed inside the dump, which stopped: CRIU never completed it (before, it
    # ran on until the fault's hold ended, and the stall was noticed after it).
    assert "migsgx step: dumped" not in run.stderr, run.stderr
    assert "the control connection to the destination failed" in run.stderr, run.stderr
    stayed(bed, figures, kind, run, app, digest)


def test_client_connecting_during_the_freeze(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], tmp_path: Path
) -> None:
    """A client connects while the tree is frozen, then keeps writing: it moves (exit 0)."""

    app, _ = loaded_app(bed)
    go_on = tmp_path / "go-on"
    result: list[MigrateRun] = []
    tool = threading.Thread(
        target=lambda: result.append(
            bed.migrate(app.pid, agent, env={"MIGSGX_FAULT": f"tool.in-dump:wait-file={go_on}"})
        ),
        daemon=True,
    )
    tool.start()
    client = _Client(bed, app)
    early: socket.socket | None = None
    try:
        # CRIU holds the tree frozen (traced) at the fault point until go_on exists.
        wait_until(lambda: process_state(app.pid) == "t" or not tool.is_alive(), 60, "the freeze")
        assert tool.is_alive(), result[0].stderr if result else "the tool ended"
        early = client.attempt_while_frozen()
        client.start()
        go_on.touch()
        tool.join(90)
        assert result, "the tool did not end"
        run = result[0]
        client.more_after_the_move()
    finally:
        go_on.touch()
        client.stop()
        if early is not None:
            early.close()
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == EXIT_OK, run.stderr
    figures["freeze x client connecting (pid driver)"] = {
        "outcome": "moved", "exit": run.returncode, "acknowledged": len(client.acked),
    }  # fmt: skip
    wait_until(lambda: bed.runnable_copies(app) == {"src": 0, "dst": 1}, 20, "one copy, at dst")
    assert client.acked, "no write was acknowledged"
    for key, value in client.acked.items():
        assert ask(bed, app, "dst", f"GET {key}") == f"VALUE {value}", key
    end_copies(bed, app)


def test_tool_killed_inside_the_dump_leaves_no_gate_closed(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    """The tool dies while CRIU holds the tree frozen behind the gate: CRIU resumes the
    tree, the guardian opens the gate (its ``ungate`` note) and hands the enclave back,
    so new clients reach the source again (each ``ask`` is a new connection)."""

    app, digest = loaded_app(bed)
    run = bed.migrate(app.pid, agent, env={"MIGSGX_FAULT": "tool.in-dump:kill"})
    assert run.returncode == -9, run.stderr
    stayed(bed, figures, "inside the dump x kill -9 tool (gated)", run, app, digest,
           expected=-9)  # fmt: skip


class _Client:
    """Writes with a new connection each time, to the source, else the destination."""

    def __init__(self, bed: Testbed, app: AppProcess) -> None:
        self.bed, self.app = bed, app
        self.acked: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def attempt_while_frozen(self) -> socket.socket | None:
        """One connection attempt now (the tree frozen): gated, it times out; without
        the gate it completes and waits in the listener's queue (kept open)."""

        src = self.bed.net["src"].address
        try:
            return self.bed.net["dst"].connect(src, self.app.port, timeout=1.5)
        except OSError:
            return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def more_after_the_move(self) -> None:
        """Three more acknowledged writes, then stop."""

        wanted = len(self.acked) + 3
        wait_until(lambda: len(self.acked) >= wanted, 30, "writes acknowledged after the move")
        self.stop()

    def _put(self, at: str, key: str, value: str) -> bool:
        via = "dst" if at == "src" else "src"
        conn = self.bed.net[via].connect(self.bed.net[at].address, self.app.port, timeout=1.0)
        with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
            conn.settimeout(20.0)
            stream.write(f"PUT {key} {value}\n")
            stream.flush()
            return stream.readline().startswith("OK")

    def _loop(self) -> None:
        while not self._stop.is_set():
            key, value = f"c{secrets.token_hex(4)}", secrets.token_hex(4)
            for at in ("src", "dst"):
                with contextlib.suppress(OSError):
                    if self._put(at, key, value):
                        self.acked[key] = value
                        break
            else:
                time.sleep(0.05)
