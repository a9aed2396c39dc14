"""``migsgx migrate --runc ID --post-copy``: a runc container's memory follows after the commit.

Real runc (``checkpoint --lazy-pages``, ``restore --lazy-pages``), CRIU lazy
pages in mutual TLS, a bridged testbed: the kvstore app runs in a pod network
namespace of its own (its address and TCP connections move with it), a client
on the other host writes through one connection before, during and after the
move.  Every acknowledged write is there afterwards and no secret crosses the
wire or lands in a file; a failure before the commit point leaves the source
running (exit 6); the source's CRIU lost after it is exit 9 with the
destination container dead, never running with pages missing.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.register_assert_rewrite("bed_helpers", "fault_helpers")

from bed_helpers import Writer, migrate_throttled, scan_files, wait_until  # noqa: E402
from fault_helpers import recover, stop_guardian_of  # noqa: E402

from migsgx import _proc  # noqa: E402
from migsgx.agent.held import start_time  # noqa: E402
from migsgx.agent.source import NO_LAZY_WHY, POST_COPY_DRIVERS  # noqa: E402
from migsgx.cli import EXIT_MIGRATION  # noqa: E402
from migsgx.host.client import EnclaveClient  # noqa: E402
from migsgx.lab.containers import ContainerApp, ContainerLab  # noqa: E402
from migsgx.lab.testbed import AgentProcess, Testbed  # noqa: E402
from migsgx.sgx.counters import CounterStore  # noqa: E402
from migsgx.sgx.platform import COUNTERS  # noqa: E402
from migsgx.system.process import process_state  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
#: This module's subnet (no other module's testbed uses it).
BED_SUBNET = 87
BED_BRIDGED = True  # the pod's address moves between the hosts' bridge ports
BED_CONTAINERS = True  # the agent starts after the lab (it reads containers.toml)

#: Every frame on every interface of a host's network namespace, to a file, until SIGTERM.
CAPTURE = """
import signal, socket, sys
out = open(sys.argv[1], "wb", buffering=0)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)  # (a loaded machine)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    out.write(sock.recv(1 << 16))
"""


def check_source_runs_on(lab: ContainerLab, app: ContainerApp, writer: Writer) -> None:
    wait_until(lambda: lab.runnable_copies(app)["src"] == 1, 20, "the source to run")
    acked = len(writer.acked)
    wait_until(lambda: len(writer.acked) > acked + 5 or writer.error is not None, 30, "writes")
    writer.finish()
    assert writer.error is None, writer.error
    assert lab.runnable_copies(app) == {"src": 1, "dst": 0}
    assert app.name not in lab.containers("dst", "runc")
    assert lab.ask(app, f"GET w{writer.acked[-1]}", at="src") == f"VALUE {writer.acked[-1]:08x}"


def test_container_moves_with_post_copy_under_writes(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, tmp_path: Path
) -> None:
    secret = b"CANARY-" + secrets.token_hex(16).encode()
    ordinary = b"ORDINARY-" + secrets.token_hex(16).encode()
    # The secret enters enclave memory sealed: the app in the container sees ciphertext only.
    with EnclaveClient.launch(bed.image("kvstore"), socket_path=bed.services["src"].socket) as s:
        s.ecall.put("canary", secret)
        blob = s.ecall.seal_value("canary")
    app = lab.start_app("runc", "kvstore", own_address=True)
    assert lab.ask(app, f"UNSEAL canary {blob.hex()}", at="src") == "OK 1"
    assert lab.ask(app, f"NOTE plain {ordinary.decode()}", at="src") == "OK"
    wire = tmp_path / "src-wire.bin"
    capture = subprocess.Popen(
        bed.host("src").command([sys.executable, "-c", CAPTURE, str(wire)]),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
    writer = Writer(lab.connect(app, via="dst"))
    writer.start()
    try:
        wait_until(lambda: len(writer.acked) >= 5 or writer.error is not None, 20, "writes")
        run = bed.migrate(None, agent, args=["--runc", app.name, "--post-copy"])
        acked = len(writer.acked)
        wait_until(lambda: len(writer.acked) > acked + 5 or writer.error is not None, 30, "more")
    finally:
        writer.finish()
        capture.send_signal(signal.SIGTERM)
        capture.wait(10)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stats is not None
    assert run.stats["post_copy_window"] > 0  # the container ran before its last page came
    # An explicit --post-copy is never overruled by --live's size rule.
    assert run.stats["details"]["memory"]["path"] == "post-copy"
    assert run.stats["details"]["page_bytes"] == 0  # no page went before the commit
    assert run.stats["details"]["tcp_established"] is True
    assert writer.error is None  # not one failed request
    # Every acknowledged write is there, on the destination.
    conn = lab.connect(app, via="src")
    with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
        for n in writer.acked:
            stream.write(f"GET w{n}\n")
            stream.flush()
            assert stream.readline().strip() == f"VALUE {n:08x}"
    assert lab.ask(app, "GET canary", at="dst") == "VALUE " + secret.hex()
    assert lab.runnable_copies(app) == {"src": 0, "dst": 1}
    assert app.name not in lab.containers("src", "runc")
    # The wire: the clients' plain requests are there (the capture sees the traffic),
    # the page stream is TLS (the ordinary note in process memory is not), the
    # enclave secret nowhere; nor in any file of the hosts, the lab or /dev/shm.
    data = wire.read_bytes()
    assert b"PUT w1 " in data and len(data) > 1 << 20
    assert ordinary not in data
    assert secret not in data and secret.hex().encode() not in data
    assert scan_files([bed.root, lab.base, Path("/dev/shm")], {"secret": secret}) == {"secret": []}
    lab.remove(app)


@pytest.mark.parametrize("action", ["fail", "kill-criu"])
def test_failure_before_the_commit_point_leaves_the_container_running(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, action: str
) -> None:
    app = lab.start_app("runc", "kvstore", own_address=True)
    writer = Writer(lab.connect(app, via="dst"))
    writer.start()
    wait_until(lambda: len(writer.acked) >= 5 or writer.error is not None, 20, "writes")
    run = migrate_throttled(bed, None, agent, f"tool.before-commit:{action}", "--runc", app.name)
    assert run.returncode == 6, run.stderr[-3000:]
    check_source_runs_on(lab, app, writer)
    lab.remove(app)


def test_source_criu_lost_after_the_commit_point_is_exit_9(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    app = lab.start_app("runc", "kvstore", own_address=True)
    run = migrate_throttled(bed, None, agent, "tool.after-commit:kill-criu", "--runc", app.name)
    assert run.returncode == 9, run.stderr[-3000:]
    assert "inside the post-copy window" in run.stderr, run.stderr
    assert "destination tree was killed" in run.stderr, run.stderr
    # Neither copy runs: the destination's never ran with pages missing (it and its
    # container are gone), the source's gave its enclaves up at the commit point.
    wait_until(lambda: app.name not in lab.containers("dst", "runc"), 20, "dst to remove it")
    assert lab.runnable_copies(app) == {"src": 0, "dst": 0}, lab.copies(app)
    assert app.name not in lab.containers("src", "runc")
    lab.remove(app)


def test_tool_killed_while_runc_serves_pages(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    """The lazy checkpoint serves, no restore was asked: the guardian ends runc's CRIU
    (it would wait for a page connection forever), brings the address back, thaws."""

    app = lab.start_app("runc", "kvstore", own_address=True)
    writer = Writer(lab.connect(app, via="dst"))
    writer.start()
    wait_until(lambda: len(writer.acked) >= 5 or writer.error is not None, 20, "writes")
    run = bed.migrate(None, agent, args=["--runc", app.name, "--post-copy"],
                      env={"MIGSGX_FAULT": "tool.before-restore:kill"})  # fmt: skip
    assert run.returncode == -9, run.stderr[-3000:]
    check_source_runs_on(lab, app, writer)
    lab.remove(app)


def _processes(match: Callable[[list[bytes], int], bool]) -> list[int]:
    found = []
    for pid in _proc.pids():
        argv, parent = _proc.argv(pid), _proc.parent(pid)
        if argv and parent is not None and match(argv, parent):
            found.append(pid)
    return found


def test_recover_gives_the_container_back_with_its_address(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, tmp_path: Path
) -> None:
    """The tool and its guardian die after the enclaves decided ABORT, before anything
    was undone: the container is frozen, held by runc's CRIU, its pod's ``eth0`` down.
    One ``migsgx recover`` ends that CRIU, brings ``eth0`` up and thaws the container."""

    app = lab.start_app("runc", "kvstore", own_address=True)
    conn = lab.connect(app, via="dst")
    with conn.makefile("rw", encoding="utf-8", newline="\n") as stream:

        def ask(line: str) -> str:
            stream.write(line + "\n")
            stream.flush()
            return stream.readline().strip()

        assert ask("PUT before 01").startswith("OK")
        go = tmp_path / "go"
        journals = bed.state("src") / "agent" / "migrations"
        earlier = set(journals.glob("*.json"))
        runs: list[object] = []
        fault = f"tool.before-commit:fail,tool.after-abort:wait-file={go}"
        worker = threading.Thread(target=lambda: runs.append(bed.migrate(
            None, agent, args=["--runc", app.name, "--post-copy"],
            env={"MIGSGX_FAULT": fault},
        )), daemon=True)  # fmt: skip
        worker.start()

        def tool() -> list[int]:
            return _processes(lambda argv, _: b"migsgx" in argv and b"migrate" in argv
                              and app.name.encode() in argv)  # fmt: skip

        def guardians(parent: int) -> list[int]:
            return _processes(
                lambda argv, ppid: ppid == parent and b"migsgx.agent.guardian" in argv
            )

        wait_until(lambda: bool(lab.root_pid(app, "dst")), 60, "the destination to restore")
        wait_until(lambda: '"phase": "aborted"' in "".join(
            p.read_text() for p in set(journals.glob("*.json")) - earlier
        ), 60, "the abort decision")  # fmt: skip
        [pid] = [p for p in tool() if guardians(p)]
        for victim in (*guardians(pid), pid):
            os.kill(victim, signal.SIGKILL)
        worker.join(30)
        assert lab.runnable_copies(app)["src"] == 0  # frozen, stopped, held
        done = subprocess.run(
            bed.host("src").command([sys.executable, "-m", "migsgx", "recover",
                                     "--state", str(bed.state("src")), "--json"]),
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"stayed"' in done.stdout, done.stdout
        wait_until(lambda: lab.runnable_copies(app) == {"src": 1, "dst": 0}, 30, "the source")
        # Its address answers again: on the connection made before, and on a new one.
        assert ask("PING") == "PONG"
    assert lab.ask(app, "PING", at="src") == "PONG"
    wait_until(lambda: app.name not in lab.containers("dst", "runc"), 30, "dst to let go")
    lab.remove(app)


def _lazy_daemon_gone(record: dict[str, object]) -> bool:
    """The recorded lazy-pages daemon ended (a zombie of its dead parent's: ended too)."""

    lazy = record["lazy_pages"]
    assert isinstance(lazy, list) and len(lazy) == 2
    return start_time(lazy[0]) != lazy[1] or process_state(lazy[0]) in ("", "Z", "X")


#: The cells of the way back after window W2, per engine: (engine, guardian).
REVOKE_CELLS = [("runc", "alive"), ("runc", "killed"), ("podman", "alive"),
                ("containerd", "alive")]  # fmt: skip


def _post_copy_refused(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:  # fmt: skip
    """An engine without post-copy: ``migrate --ENGINE NAME --post-copy`` is refused
    before anything freezes (exit 6, the reason named), and the container runs on."""

    app = lab.start_app(engine, "kvstore")
    assert lab.ask(app, "PUT before 01", at="src").startswith("OK")
    run = bed.migrate(None, agent, args=[f"--{engine}", app.name, "--post-copy"])
    assert run.returncode == EXIT_MIGRATION, run.stderr[-3000:]
    assert NO_LAZY_WHY[engine] in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert lab.runnable_copies(app) == {"src": 1, "dst": 0}, lab.copies(app)
    assert app.name not in lab.containers("dst", engine)
    assert lab.ask(app, "GET before", at="src") == "VALUE 01"
    assert lab.ask(app, "PUT after 02", at="src").startswith("OK")
    lab.remove(app)


@pytest.mark.parametrize(("engine", "guardian"), REVOKE_CELLS,
                         ids=[f"{e}-guardian-{g}" for e, g in REVOKE_CELLS])  # fmt: skip
def test_a_post_copy_container_whose_agent_died_after_the_commit_runs_again_at_the_source(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess,
    figures: dict[str, dict[str, object]], engine: str, guardian: str,
) -> None:  # fmt: skip
    """Window W2 of a post-copy move of a container: the source committed, the
    destination agent dies as the COMMIT reaches its loaded copy
    (``agent.before-claim:kill``).  The restarted agent removes the container (its
    page window cannot be opened again) and keeps a note of the session; the
    guardian, or one ``migsgx recover`` once it is killed too, has the destination
    refuse the migration id and revokes the source enclaves' commit
    (``docs/spec/commit.md`` 2.2): the source container thaws, its address
    answers, every acknowledged write is there, nothing is left on the
    destination.  An engine whose checkpoint has no lazy-pages mode (podman,
    containerd: ``POST_COPY_DRIVERS``) never gets there: its ``--post-copy`` is
    refused before anything freezes, so no COMMIT of it exists to revoke: for those
    the cell shows that refusal (exit 6, the reason, the container on with every
    write, nothing on the destination).  Should such an engine gain post-copy, the
    refusal's asserts fail and the whole cell is due."""

    if engine not in POST_COPY_DRIVERS:
        _post_copy_refused(bed, lab, agent, engine)
        return
    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-claim:kill"})
    again = None
    app = lab.start_app(engine, "kvstore", own_address=True)
    app_pid = lab.root_pid(app, "src")
    assert app_pid
    writer = Writer(lab.connect(app, via="dst"))
    writer.start()
    try:
        wait_until(lambda: len(writer.acked) >= 5 or writer.error is not None, 20, "writes")
        started = time.monotonic()
        run = bed.migrate(None, doomed, args=[f"--{engine}", app.name, "--post-copy"])
        assert run.returncode == 7, run.stderr[-3000:]  # in doubt
        if guardian == "killed":
            stop_guardian_of(app_pid)  # SIGKILL: the enclaves hold their own connections
        assert doomed.proc.wait(timeout=30) == -9
        [path] = (bed.state("dst") / "agent" / "work").glob("*/held.json")
        record = json.loads(path.read_text())
        assert record["lazy_pages"] and record["answered"], record
        again = bed.start_agent(listen_port=doomed.port)
        wait_until(lambda: app.name not in lab.containers("dst", engine), 30,
                   "the destination container to be removed")  # fmt: skip
        wait_until(lambda: _lazy_daemon_gone(record), 30, "the lazy-pages daemon to end")
        log = again.log.read_text(errors="replace")
        assert "post-copy tree" in log and "is not adopted" in log, log
        result = recover(bed)
        if guardian == "killed":
            assert "revoked" in result.stdout, result.stdout + result.stderr
        # (the guardian retries by itself too: it may have revoked before recover asked)
        rows = json.loads(result.stdout)
        assert not {r["outcome"] for r in rows} & {"in-doubt", "lost"}, result.stdout
        assert result.returncode == 0, result.stderr
        check_source_runs_on(lab, app, writer)
        cell = figures.setdefault(
            f"decision written (post-copy) x kill -9 destination agent ({engine}, guardian "
            f"{guardian})",
            {"source_back_runs": []},
        )
        runs = cell["source_back_runs"]
        assert isinstance(runs, list)
        runs.append(round(time.monotonic() - started, 2))  # (a figure, not an assert)
        store = CounterStore(bed.state("src") / COUNTERS)
        assert [d.kind for d in store.decisions() if d.kind != "abort"][-1:] == ["revoked"]
        assert not list((bed.state("dst") / "agent" / "work").glob("*/held.json"))
        assert lab.copies(app)["dst"] == []
    finally:
        writer.finish()
        for agent in (doomed, again):
            if agent is not None:
                agent.stop()
    lab.remove(app)
