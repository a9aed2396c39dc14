"""Container migration with real runc, podman, containerd and CRIU between two namespaced hosts.

The example kvstore app runs inside a container; its enclaves run on the
host, started by the host's platform service through the socket bind-mounted
into the container.  One testbed, container lab and agent serve the module;
every test ends by checking that exactly one runnable copy of the app exists
and removes its containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("bed_helpers")

from bed_helpers import scan_files, strict_destination, wait_until  # noqa: E402
from fault_helpers import recover, unstall  # noqa: E402

from migsgx.containers.imagefs import leftover_mounts  # noqa: E402
from migsgx.containers.podman import (  # noqa: E402
    PODMAN_ARCHIVE,
    PODMAN_CHECKPOINT,
    PODMAN_EXPORT_FILES,
)
from migsgx.host.client import EnclaveClient  # noqa: E402
from migsgx.lab.containers import ContainerApp, ContainerLab  # noqa: E402
from migsgx.lab.hosts import start_service  # noqa: E402
from migsgx.lab.testbed import AgentProcess, MigrateRun, Testbed  # noqa: E402
from migsgx.system.process import in_netns  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 62
BED_CONTAINERS = True  # the agent starts after the lab (it reads containers.toml)

ENGINES = ["runc", "podman", "containerd"]


def migrate(
    bed: Testbed,
    app: ContainerApp,
    agent: AgentProcess,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str = "src",
) -> MigrateRun:
    return bed.migrate(None, agent, args=[f"--{app.engine}", app.name, *args], env=env, name=name)


def finish(lab: ContainerLab, app: ContainerApp, *, expect: str) -> None:
    """Exactly one runnable copy, on ``expect``, and the engines agree; then remove it."""

    assert lab.runnable_copies(app) == {"src": int(expect == "src"), "dst": int(expect == "dst")}
    other = "dst" if expect == "src" else "src"
    assert app.name in lab.containers(expect, app.engine)
    assert app.name not in lab.containers(other, app.engine)
    lab.remove(app)


class Client(threading.Thread):
    """Keeps writing through the app while it moves; follows it to the other host."""

    def __init__(self, lab: ContainerLab, app: ContainerApp) -> None:
        super().__init__(daemon=True)
        self.lab, self.app = lab, app
        self.at = "src"
        self.acked = ""
        self.ok = {"src": 0, "dst": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        n = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            n += 1
            try:
                reply = self.lab.ask(self.app, f"PUT client {n:08x}", at=self.at)
                if reply.startswith("OK"):
                    self.acked = f"{n:08x}"
                    self.ok[self.at] += 1
                    continue
            except OSError:
                pass
            self.at = "dst" if self.at == "src" else "src"
            time.sleep(0.02)


# --- moves ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("live", [False, True], ids=["stop-and-copy", "live"])
@pytest.mark.parametrize("engine", ENGINES)
def test_container_moves_with_its_enclave(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str, live: bool
) -> None:
    app = lab.start_app(engine, "kvstore")
    for i in range(3):
        assert lab.ask(app, f"PUT key{i} {f'value-{i}'.encode().hex()}", at="src") == f"OK {i + 1}"
    assert lab.ask(app, "NOTE colour blue", at="src") == "OK"
    digest = lab.ask(app, "DIGEST", at="src")
    client = Client(lab, app)
    client.start()
    wait_until(lambda: client.ok["src"] > 5, 10, "the client to write")

    run = migrate(bed, app, agent, args=["--live"] if live else [])
    if run.returncode != 0:
        client.stop.set()
    assert run.returncode == 0, run.stderr
    wait_until(lambda: client.ok["dst"] > 5, 15, "the client to write on the destination")
    client.stop.set()
    client.join(10)
    assert run.returncode == 0, run.stderr
    assert run.stats is not None
    assert run.stats["details"]["driver"] == engine
    if live:  # the enclave's memory went in rounds while the client kept writing
        (enclave,) = run.stats["details"]["enclave_stats"]
        assert enclave["mode"] == "live" and enclave["rounds"][0]["pages"] > 0
    assert run.stats["details"]["enclaves"] == 1
    assert run.stats["details"]["enclave_bytes"] > 0
    assert run.stats["downtime"] <= run.stats["total"]

    # Networking in the restored container: the other host reaches it at dst's address.
    before = digest.split(" ", 1)[1].split(",")
    after = lab.ask(app, "DIGEST", at="dst").split(" ", 1)[1].split(",")
    assert len(after) == len(before) == 1
    assert lab.ask(app, "GET key1", at="dst") == "VALUE " + b"value-1".hex()
    assert lab.ask(app, "GET client", at="dst") == f"VALUE {client.acked}"  # nothing lost
    assert lab.ask(app, "PUT after " + b"x".hex(), at="dst").startswith("OK")  # an ECALL
    state = json.loads(lab.ask(app, "STATE", at="dst").removeprefix("STATE "))
    assert state["notes"] == {"colour": "blue"}
    pid = lab.root_pid(app, "dst")
    assert pid == run.stats["details"]["restored_pid"]
    finish(lab, app, expect="dst")


@pytest.mark.parametrize("engine", ENGINES)
def test_container_moves_there_and_back(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """A migrated-in container migrates again (its restore left nothing that holds it)."""

    back = bed.start_agent("src")
    app = lab.start_app(engine, "kvstore")
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    there = migrate(bed, app, agent)
    assert there.returncode == 0, there.stderr
    assert "stays" not in there.stderr, there.stderr  # the source was removed
    assert app.name not in lab.containers("src", engine)
    assert lab.ask(app, "PUT k2 " + b"w".hex(), at="dst") == "OK 2"
    run = migrate(bed, app, back, name="dst")
    assert run.returncode == 0, run.stderr
    assert lab.ask(app, "GET k2", at="src") == "VALUE " + b"w".hex()
    back.stop()
    finish(lab, app, expect="src")


def test_runc_container_moves_there_back_and_there_again(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    """Three moves of one runc container (found by a storm): the bundle the destination
    agent made for it goes when it leaves that host again.

    Before, the bundle stayed, and the third move was refused by the host it
    had left ("a bundle for ... exists on this host"), with no fault at all.
    """

    back = bed.start_agent("src")
    try:
        app = lab.start_app("runc", "kvstore")
        for i, (frm, to, target) in enumerate(
            [("src", "dst", agent), ("dst", "src", back), ("src", "dst", agent)]
        ):
            assert lab.ask(app, f"PUT k{i} " + b"v".hex(), at=frm) == f"OK {i + 1}"
            run = migrate(bed, app, target, name=frm)
            assert run.returncode == 0, run.stderr
            assert app.name not in lab.containers(frm, "runc")
            assert not (bed.state(frm) / "agent" / "runc" / app.name).exists()
            assert lab.ask(app, f"GET k{i}", at=to) == "VALUE " + b"v".hex()
    finally:
        back.stop()
    finish(lab, app, expect="dst")


def test_runc_source_platform_killed_before_the_images_says_it_stayed(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    """The source's platform service dies while the images are about to go (found by a
    storm): the container runs on with every write, and the tool says so, exit 6.

    Before, the roll-back was right but the tool ended with the enclave's own
    error (``enclave-lost``), exit 1, not the documented "did not move" (6).
    """

    app = lab.start_app("runc", "kvstore")
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    try:
        run = migrate(bed, app, agent,
                      env={"MIGSGX_FAULT": "tool.before-images:kill-source-platform"})  # fmt: skip
        assert "Traceback" not in run.stderr
        assert run.returncode == 6, run.stderr
    finally:
        bed.services["src"].stop()  # killed: a fresh one, as the host's supervisor would
        bed.services["src"] = start_service(bed.state("src"), prefix=bed.host("src").command([]))
    wait_until(lambda: lab.ask(app, "GET k", at="src") == "VALUE " + b"v".hex(), 30,
               "the container to answer with its write")  # fmt: skip
    finish(lab, app, expect="src")


@pytest.mark.parametrize("engine", ENGINES)
def test_container_moves_after_its_platform_service_restarted(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """The source's platform service was replaced by one with a new socket after the
    container, which mounts the socket file, started (found by a storm, seed 6: a
    ``kill-source-platform`` fault, the service started again, then the next move;
    a killed service's socket is now kept, see the next test, so here the service
    runs without a keeper, ``--keep-socket 0``, as one that ended would leave it):
    the container's bind mount still holds the old socket, which is gone, and CRIU
    records the mount as deleted.

    Before, the restore on the destination failed (``runc restore ... Failed to
    remove cgroup (will retry) | criu failed: type NOTIFY errno 0``; CRIU's log:
    ``Can't re-create deleted file .../enclave.sock: File exists``, as it makes a
    file in the place of a deleted mount's source, then removes it) and every later
    move failed the same way.  Now it moves, and the container reaches the
    destination's live socket, which stays where it is.
    """

    src = bed.host("src").command([])
    bed.services["src"].stop()
    bed.services["src"] = start_service(bed.state("src"), prefix=src,
                                        extra_args=["--keep-socket", "0"])  # fmt: skip
    app = lab.start_app(engine, "kvstore", platform_file=True)
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    # Killed (its enclaves live on), then started again: no socket was kept, a new one.
    restart_platform(bed, "src")
    pid = lab.root_pid(app, "src")
    assert pid is not None
    assert "/enclave.sock//deleted " in Path(f"/proc/{pid}/mountinfo").read_text()
    socket_dst = bed.services["dst"].socket
    before = socket_dst.stat().st_ino

    run = migrate(bed, app, agent)
    assert run.returncode == 0, run.stderr
    assert lab.ask(app, "GET k", at="dst") == "VALUE " + b"v".hex()
    pid = lab.root_pid(app, "dst")
    assert pid is not None
    assert socket_dst.stat().st_ino == before
    inside = Path(f"/proc/{pid}/root/run/migsgx/enclave.sock")
    assert inside.stat().st_ino == before
    assert "//deleted" not in Path(f"/proc/{pid}/mountinfo").read_text()
    finish(lab, app, expect="dst")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_container_with_the_socket_file_mounted_outlives_a_killed_platform_service(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """Issue 9: a container that bind-mounts the socket FILE (``--volume SOCKET:...``,
    as SGX deployments mount aesmd's) keeps launching enclaves after its platform
    service is killed (``kill -9``) and started again.

    Before, the restarted service bound a new socket inode; the container's mount
    kept the removed one and every launch from inside was refused
    (``ConnectionRefusedError``) until it moved.  Now a keeper holds the listening
    socket while no service runs and the restarted service takes the same one back:
    the same inode listens, the mount is never stale.
    """

    app = lab.start_app(engine, "kvstore", platform_file=True)
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    launched(lab, app, "src", "before")
    socket_src = bed.services["src"].socket
    kept = socket_src.stat()
    restart_platform(bed, "src")
    assert (socket_src.stat().st_ino, socket_src.stat().st_mode) == (kept.st_ino, kept.st_mode)
    launched(lab, app, "src", "after")
    assert lab.ask(app, "GET k", at="src") == "VALUE " + b"v".hex()
    assert lab.ask(app, f"PERSIST kept-{app.marker}", at="src").startswith("OK ")
    pid = lab.root_pid(app, "src")
    assert pid is not None
    assert "//deleted" not in Path(f"/proc/{pid}/mountinfo").read_text()
    assert Path(f"/proc/{pid}/root/run/migsgx/enclave.sock").stat().st_ino == kept.st_ino
    finish(lab, app, expect="src")


def restart_platform(bed: Testbed, host: str) -> None:
    """``kill -9`` of the host's platform service, then started again as its supervisor
    would (the storm's ``kill-source-platform``): it takes its kept socket back."""

    bed.services[host].process.kill()
    bed.services[host].stop()
    bed.services[host] = start_service(bed.state(host), prefix=bed.host(host).command([]))


def launched(lab: ContainerLab, app: ContainerApp, at: str, key: str) -> None:
    """The app launches a new enclave through the platform socket it sees, and uses it."""

    answer = lab.ask(app, f"LAUNCH {key} {key.encode().hex()}", at=at)
    assert re.fullmatch(r"OK \d+", answer), answer


@pytest.mark.parametrize("engine", ENGINES)
def test_running_container_reaches_its_restarted_platform_service(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """A platform service restarted under a running container strands nothing.

    Before, the container bind-mounted the socket file: the restarted service binds a
    new one, the container kept the old, removed one, and every launch from inside
    failed (``ConnectionRefusedError``) until the container moved away.  Now it
    bind-mounts the directory that holds only the socket: the new socket appears in
    it.  The enclave launched before the restart keeps working throughout; after a
    move the directory is the destination's, whose restart strands nothing either.
    """

    app = lab.start_app(engine, "kvstore")
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    launched(lab, app, "src", "before")
    restart_platform(bed, "src")
    launched(lab, app, "src", "after")
    assert lab.ask(app, "GET k", at="src") == "VALUE " + b"v".hex()
    assert lab.ask(app, f"PERSIST restarted-{app.marker}", at="src").startswith("OK ")
    pid = lab.root_pid(app, "src")
    assert pid is not None
    assert "//deleted" not in Path(f"/proc/{pid}/mountinfo").read_text()
    # What the container sees of the host: the socket alone, on a read-only mount.
    assert os.listdir(f"/proc/{pid}/root/run/migsgx") == ["enclave.sock"]
    options = [line.split()[5] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
               if line.split()[4] == "/run/migsgx"]  # fmt: skip
    assert options and all("ro" in o.split(",") for o in options), options

    run = migrate(bed, app, agent)
    assert run.returncode == 0, run.stderr
    assert lab.ask(app, "GET k", at="dst") == "VALUE " + b"v".hex()
    launched(lab, app, "dst", "moved")
    restart_platform(bed, "dst")
    pid = lab.root_pid(app, "dst")
    assert pid is not None
    inside = Path(f"/proc/{pid}/root/run/migsgx/enclave.sock")
    assert inside.stat().st_ino == bed.services["dst"].socket.stat().st_ino
    launched(lab, app, "dst", "restarted")
    assert lab.ask(app, "GET k", at="dst") == "VALUE " + b"v".hex()
    finish(lab, app, expect="dst")


def ledger(lab: ContainerLab, app: ContainerApp, at: str) -> dict[str, Any]:
    # Asked once: an unanswered request (the app died) is a failure, never asked again.
    answer = lab.ask(app, "ROWS", at=at)
    assert answer.startswith("ROWS "), answer
    return dict(json.loads(answer.removeprefix("ROWS ")))


@pytest.mark.parametrize("engine", ENGINES)
def test_sqlite_in_wal_mode_moves_under_a_write_loop(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """Held POSIX locks and the WAL's shared mapping move (CRIU's file locks); nothing lost."""

    # /tmp: the container's tmpfs (runc, podman) or its root file system's rw layer (containerd)
    args = ["--enclaves", "0", "--sqlite", "/tmp/ledger.db"]
    app = lab.start_app(engine, "kvstore", args, enclaves=False)
    acked = [int(lab.ask(app, f"ROW before-{i}", at="src").split()[1]) for i in range(20)]
    before = ledger(lab, app, "src")
    assert before["integrity"] == ["ok"] and before["max"] > len(acked)

    run = migrate(bed, app, agent)
    assert run.returncode == 0, run.stderr
    after = ledger(lab, app, "dst")
    assert after["integrity"] == ["ok"]
    assert set(acked) <= set(after["client"])
    # Ids grow by one per committed row: none missing, and every one committed before is there.
    assert after["count"] == after["max"] >= before["max"]
    assert int(lab.ask(app, "ROW after", at="dst").split()[1]) > after["max"]
    wait_until(lambda: ledger(lab, app, "dst")["max"] > after["max"] + 1, 15, "the write loop")
    finish(lab, app, expect="dst")


@pytest.mark.parametrize("engine", ENGINES)
def test_container_without_enclaves(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    app = lab.start_app(engine, "kvstore", ["--enclaves", "0"], enclaves=False)
    assert lab.ask(app, "NOTE plain yes", at="src") == "OK"
    run = migrate(bed, app, agent)
    assert run.returncode == 0, run.stderr
    assert run.stats is not None and run.stats["details"]["enclaves"] == 0
    assert run.stats["details"]["page_bytes"] == 0  # no page server: pages in the TLS channel
    state = json.loads(lab.ask(app, "STATE", at="dst").removeprefix("STATE "))
    assert state["notes"] == {"plain": "yes"}
    finish(lab, app, expect="dst")


def test_runc_container_with_a_network_namespace_of_its_own(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    """CRIU restores such a namespace with ``lo`` down; the driver brings it up."""

    app = lab.start_app("runc", "kvstore", ["--enclaves", "0"], enclaves=False, private_net=True)
    assert lab.ask(app, "NOTE inside yes", at="src") == "OK"
    run = migrate(bed, app, agent)
    assert run.returncode == 0, run.stderr
    assert lab.ask(app, "PING", at="dst") == "PONG"  # over lo inside the restored container
    finish(lab, app, expect="dst")


@pytest.mark.parametrize("engine", ["runc", "podman"])
def test_a_port_taken_at_the_destination_is_refused_before_the_freeze(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """A container in its host's network namespace restores into the destination's,
    where something may hold its port: ``begin`` is refused (``port-in-use``, exit 6)
    before the container froze, as for a process tree; once the port is free it moves.
    (One with a namespace of its own gets a fresh one there: nothing is announced.)"""

    app, digest = started(lab, engine)
    squatter = in_netns(
        f"/run/netns/{bed.host('dst').netns}",
        lambda: socket.create_server(("0.0.0.0", app.port)),
    )
    try:
        run = migrate(bed, app, agent)
    finally:
        squatter.close()
    assert run.returncode == 6, run.stderr  # did not move, the source runs
    assert "destination: begin failed: [port-in-use]" in run.stderr
    assert f"tcp 0.0.0.0:{app.port}" in run.stderr
    assert "Can't bind" not in run.stderr  # CRIU never ran
    check_source_runs_on(lab, app, digest)
    digest = lab.ask(app, "DIGEST", at="src")
    run = migrate(bed, app, agent)
    assert run.returncode == 0, run.stderr
    assert lab.ask(app, "DIGEST", at="dst") == digest
    finish(lab, app, expect="dst")


# --- failures ------------------------------------------------------------------------------------
def check_source_runs_on(lab: ContainerLab, app: ContainerApp, digest: str) -> None:
    assert lab.ask(app, "DIGEST", at="src") == digest
    assert lab.ask(app, "PUT later " + b"y".hex(), at="src").startswith("OK")  # ECALLs work
    assert lab.copies(app)["dst"] == []
    assert app.name not in lab.containers("dst", app.engine)
    assert not (bed_state_dst(lab) / "agent" / "runc" / app.name).exists()


def bed_state_dst(lab: ContainerLab) -> Path:
    return lab.bed.state("dst")


def started(lab: ContainerLab, engine: str) -> tuple[ContainerApp, str]:
    app = lab.start_app(engine, "kvstore")
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    return app, lab.ask(app, "DIGEST", at="src")


def test_destination_agent_killed_during_transfer(bed: Testbed, lab: ContainerLab) -> None:
    fault = f"agent.enclave-receive:kill-after-bytes={16 << 20}"
    doomed = bed.start_agent(env={"MIGSGX_FAULT": fault})
    app, digest = started(lab, "runc")
    run = migrate(bed, app, doomed)
    assert run.returncode == 6, run.stderr
    assert "enclave 0 did not migrate" in run.stderr
    assert doomed.proc.wait(timeout=10) != 0
    check_source_runs_on(lab, app, digest)
    finish(lab, app, expect="src")


@pytest.mark.parametrize("engine", ENGINES)
def test_restore_failing_keeps_the_frozen_source(
    bed: Testbed, lab: ContainerLab, engine: str
) -> None:
    failing = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-restore:corrupt"})
    app, digest = started(lab, engine)
    assert lab.ask(app, "NOTE n 1", at="src") == "OK"
    run = migrate(bed, app, failing)
    assert run.returncode == 6, run.stderr
    assert "restore" in run.stderr
    check_source_runs_on(lab, app, digest)  # thawed: it answers
    state = json.loads(lab.ask(app, "STATE", at="src").removeprefix("STATE "))
    assert state["notes"] == {"n": "1"}
    # Nothing marks the name as restoring any more (a mark left would refuse the next one).
    assert not list((bed.state("dst") / "agent").glob(f"*/{app.name}.owner"))
    failing.stop()
    finish(lab, app, expect="src")


def test_destination_enclave_load_failing(bed: Testbed, lab: ContainerLab, tmp_path: Path) -> None:
    """The destination platform refuses to launch the enclave (launch control)."""

    with strict_destination(bed, tmp_path / "strict", lab.settings["dst"].save) as strict:
        app, digest = started(lab, "runc")
        run = migrate(bed, app, strict)
        assert run.returncode == 6, run.stderr
        assert "launch" in run.stderr
        check_source_runs_on(lab, app, digest)
        strict.stop()
        finish(lab, app, expect="src")


@pytest.mark.parametrize("engine", ["runc", "containerd"])
def test_tool_dying_before_the_commit_point_thaws_the_container(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """The guardian aborts the enclaves, thaws the frozen source and gives the enclaves back."""

    app, digest = started(lab, engine)
    run = migrate(
        bed, app, agent,
        env={"MIGSGX_FAULT": "tool.before-commit:exit"},
        args=["--work-dir", str(bed.root / f"dump-{app.marker}")],
    )  # fmt: skip
    assert run.returncode == 70
    assert "resuming the source" in run.stderr  # the guardian's report
    wait_until(lambda: app.name not in lab.containers("dst", engine), 15, "dst to let go")
    wait_until(lambda: lab.runnable_copies(app)["src"] == 1, 15, "the source to thaw")
    check_source_runs_on(lab, app, digest)
    finish(lab, app, expect="src")


@pytest.mark.parametrize("engine", ENGINES)
def test_container_given_back_by_one_recover_after_the_tool_and_its_guardian_died(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """The tool kills its guardian and dies before the commit point, the tree held there.

    One ``migsgx recover`` gives the container back from the journal's notes: the
    enclaves abort, its cgroup thaws, its tasks continue, and the gate on its
    listeners opens (``ungate``), so clients reach it again.  Before, the gate's
    rule stayed in the host's firewall and the thawed container answered nobody
    (the storm's heal of stalled firewalls removed that rule too, and hid it).
    """

    app, digest = started(lab, engine)
    run = migrate(bed, app, agent,
                  env={"MIGSGX_FAULT": "tool.before-commit:kill-guardian-and-tool"})  # fmt: skip
    assert run.returncode == -9, run.stderr
    assert lab.runnable_copies(app)["src"] == 0  # frozen, nobody left to give it back
    journals = (bed.state("src") / "agent" / "migrations").glob("*.json")
    mid = max(journals, key=lambda p: p.stat().st_mtime).stem
    result = recover(bed)
    outcomes = {r["mid"]: r["outcome"] for r in json.loads(result.stdout)}
    assert outcomes[mid] == "stayed", result.stdout + result.stderr
    assert lab.runnable_copies(app)["src"] == 1
    wait_until(lambda: app.name not in lab.containers("dst", engine), 30, "dst to let go")
    check_source_runs_on(lab, app, digest)
    finish(lab, app, expect="src")


@pytest.mark.parametrize("engine", ENGINES)
def test_container_source_in_doubt_after_the_commit_goes_with_one_recover(
    bed: Testbed, lab: ContainerLab, engine: str
) -> None:
    """The destination stalls before it answers ``resume``: exit 7, in doubt (found by a storm).

    After one ``migsgx recover`` the committed source container is gone from its
    engine, as after a success, and can come back.  Before, its tasks stayed
    frozen (the recover's SIGKILL waits for a thaw under cgroup v1) and the
    engine kept its record, which refused the container's return (runc, and
    with the storm's ``--engine podman|containerd``, podman and containerd).
    """

    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-resume:stall"})
    back = bed.start_agent("src")
    try:
        app, digest = started(lab, engine)
        try:
            run = migrate(bed, app, doomed)
            assert run.returncode == 7, run.stderr
            wait_until(lambda: lab.runnable_copies(app)["dst"] == 1, 30, "the destination to run")
            assert lab.runnable_copies(app)["src"] == 0  # in doubt: nothing runs twice
        finally:
            unstall(bed, doomed)
        # (the module's earlier migrations left journals too: only this one's is judged)
        journals = (bed.state("src") / "agent" / "migrations").glob("*.json")
        mid = max(journals, key=lambda p: p.stat().st_mtime).stem
        result = recover(bed)
        outcomes = {r["mid"]: r["outcome"] for r in json.loads(result.stdout)}
        assert outcomes[mid] in ("moved", "done"), result.stdout
        assert app.name not in lab.containers("src", engine)
        assert lab.copies(app)["src"] == []  # nothing of the source left, frozen or not
        assert lab.ask(app, "DIGEST", at="dst") == digest
        again = migrate(bed, app, back, name="dst")
        assert again.returncode == 0, again.stderr
        assert lab.ask(app, "DIGEST", at="src") == digest
    finally:
        doomed.stop()
        back.stop()
    finish(lab, app, expect="src")


@pytest.mark.parametrize("engine", ["runc", "containerd"])
def test_failure_after_the_commit_point_leaves_the_source_frozen(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """Past the commit point the tool never thaws the source: the destination rolls forward."""

    app, digest = started(lab, engine)
    run = migrate(bed, app, agent, env={"MIGSGX_FAULT": "tool.after-commit:fail"})
    assert run.returncode == 6, run.stderr
    wait_until(lambda: lab.runnable_copies(app)["dst"] == 1, 15, "the destination to run")
    assert lab.ask(app, "DIGEST", at="dst") == digest
    assert lab.runnable_copies(app)["src"] == 0  # frozen and fenced, for an operator
    lab.remove_on(engine, app.name, "src")
    finish(lab, app, expect="dst")


def test_containerd_destination_without_the_image_refuses(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    """A destination never pulls: without the container's image it refuses, the source runs on."""

    app, digest = started(lab, "containerd")
    image = "localhost/migsgx-lab:1"
    lab.ctr("dst").remove_image(image)
    try:
        run = migrate(bed, app, agent)
        assert run.returncode == 6, run.stderr
        assert f"the container's image {image} is not on this host" in run.stderr
        check_source_runs_on(lab, app, digest)
    finally:
        lab.import_containerd_image("dst")
    finish(lab, app, expect="src")


# --- what a peer's configuration may not ask of the destination -------------------------------
def host_bind_mount(spec: dict[str, Any], lab: ContainerLab) -> None:
    secret = lab.base / "host-secret"  # a host directory no host granted (bind_sources)
    secret.mkdir(exist_ok=True)
    (secret / "canary").write_text("host only")
    spec["mounts"].append({"destination": "/mnt/host", "type": "bind", "source": str(secret),
                           "options": ["rbind", "ro"]})  # fmt: skip


def sys_admin(spec: dict[str, Any], lab: ContainerLab) -> None:
    for caps in spec["process"]["capabilities"].values():
        caps.append("CAP_SYS_ADMIN")


def host_ipc_namespace(spec: dict[str, Any], lab: ContainerLab) -> None:
    host = f"/proc/{os.getpid()}/ns/ipc"  # the machine's (this test runs in it)
    spec["linux"]["namespaces"] = [
        {"type": "ipc", "path": host} if ns["type"] == "ipc" else ns
        for ns in spec["linux"]["namespaces"]
    ]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        (host_bind_mount, "mounts[15].source"),
        (sys_admin, "process.capabilities.bounding"),
        (host_ipc_namespace, "linux.namespaces[1].path"),
    ],
    ids=["host-bind-mount", "cap-sys-admin", "host-ipc-namespace"],
)
def test_destination_refuses_what_its_host_did_not_grant(
    bed: Testbed,
    lab: ContainerLab,
    agent: AgentProcess,
    patch: Callable[[dict[str, Any], ContainerLab], None],
    field: str,
) -> None:
    """The source (a peer with the deployment's certificate) runs a container that asks for
    more than the destination grants; the destination refuses the configuration ``begin``
    announced, before the source froze or sent anything, nothing of it runs there, and the
    source runs on."""

    app = lab.start_app("runc", "kvstore", patch=lambda spec: patch(spec, lab))
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    digest = lab.ask(app, "DIGEST", at="src")
    run = migrate(bed, app, agent)
    assert run.returncode == 6, run.stderr
    assert "destination: begin failed: [container-spec]" in run.stderr
    assert f"the container's configuration is refused: {field}" in run.stderr
    check_source_runs_on(lab, app, digest)  # no container, bundle or process on dst
    assert not list((bed_state_dst(lab) / "agent" / "runc").glob(f"{app.name}*"))
    finish(lab, app, expect="src")


def test_destination_refuses_images_with_more_than_the_configuration(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    """CRIU gives restored threads the credentials in the images, not the configuration's.

    The source's container runs with CAP_SYS_ADMIN; then its bundle's configuration is
    rewritten without it (runc read it at the start), so the peer announces and sends a
    harmless configuration (``begin`` admits it) and images whose threads hold
    CAP_SYS_ADMIN: refused at the restore, which checks what arrived."""

    app = lab.start_app("runc", "kvstore", patch=lambda spec: sys_admin(spec, lab))
    config = Path(str(lab.runc("src").state(app.name)["bundle"])) / "config.json"  # type: ignore[index]
    spec = json.loads(config.read_text())
    for name, caps in spec["process"]["capabilities"].items():
        spec["process"]["capabilities"][name] = [c for c in caps if c != "CAP_SYS_ADMIN"]
    config.write_text(json.dumps(spec))
    digest = lab.ask(app, "DIGEST", at="src")
    run = migrate(bed, app, agent)
    assert run.returncode == 6, run.stderr
    assert "destination: restore failed: [container-spec]" in run.stderr
    assert "the container's configuration is refused: images/core-" in run.stderr
    assert "CAP_SYS_ADMIN beyond the configuration's bounding set" in run.stderr
    check_source_runs_on(lab, app, digest)
    finish(lab, app, expect="src")


# --- the canary -------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_canary_is_in_no_container_image_or_archive(
    bed: Testbed, lab: ContainerLab, tmp_path: Path, engine: str
) -> None:
    kept = bed.start_agent(args=["--keep-images"])
    secret = b"CANARY-" + secrets.token_hex(16).encode()
    ordinary = b"ORDINARY-" + secrets.token_hex(16).encode()
    # The secret enters enclave memory sealed: the app in the container sees ciphertext only.
    with EnclaveClient.launch(bed.image("kvstore"), socket_path=bed.services["src"].socket) as s:
        s.ecall.put("canary", secret)
        blob = s.ecall.seal_value("canary")
    app = lab.start_app(engine, "kvstore")
    assert lab.ask(app, f"UNSEAL canary {blob.hex()}", at="src") == "OK 1"
    assert lab.ask(app, f"NOTE plain {ordinary.decode()}", at="src") == "OK"
    dump_dir = tmp_path / "tool-dump"
    run = migrate(bed, app, kept, args=["--keep-images", "--work-dir", str(dump_dir)])
    assert run.returncode == 0, run.stderr
    (tmp_path / "tool.out").write_text(run.stdout + run.stderr)

    needles = {"secret": secret, "ordinary": ordinary}
    if engine == "podman":
        archive = dump_dir / PODMAN_ARCHIVE
        assert archive.stat().st_size > 1 << 20  # the exported checkpoint, kept
        assert scan_files([archive], needles) == {"secret": [], "ordinary": [str(archive)]}
    hits = scan_files([bed.root, tmp_path, lab.base, Path("/dev/shm")], needles)
    assert hits["secret"] == []
    # The scan sees what it should: the note moved in the container's CRIU pages.
    assert any("pages-" in p or PODMAN_ARCHIVE in p for p in hits["ordinary"]), hits["ordinary"]
    assert lab.ask(app, "GET canary", at="dst") == "VALUE " + secret.hex()

    # The same check as a command: ``migsgx inspect`` on what the tool dumped.
    paths = [dump_dir] + ([dump_dir / PODMAN_ARCHIVE] if engine == "podman" else [])
    for path in paths:
        code, report = inspect_json(path, secret, ordinary)
        assert code == 1, report  # the ordinary note is found: plaintext-found
        assert report["engine"] == engine
        assert report["kind"] == ("podman-archive" if path.suffix == ".tar" else "migration-images")
        assert report["scan"]["canaries"][secret.decode()] == []
        assert report["scan"]["canaries"][ordinary.decode()] != []
        assert report["processes"][0]["command"].startswith("python")
        assert report["criu"]["memory_bytes"] > 0
    kept.stop()
    finish(lab, app, expect="dst")


def inspect_json(path: Path, *canaries: bytes) -> tuple[int, dict[str, Any]]:
    args = [a for c in canaries for a in ("--canary", c.decode())]
    done = subprocess.run(
        [sys.executable, "-m", "migsgx", "inspect", "--json", str(path), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout) if done.stdout else {"err": done.stderr}


_FAULT_AT = re.compile(r"migsgx fault: (\S+) at ([0-9.]+)")


def check_no_dump_left(lab: ContainerLab, app: ContainerApp) -> None:
    """Nothing of a failed dump stays on the source host: no images tmpfs of the
    tool's under the lab, and no half checkpoint in podman's storage (its CRIU's
    ``checkpoint`` directory, the configurations it wrote for the archive)."""

    mounts = leftover_mounts(Path("/proc/self/mountinfo").read_text())
    assert [m for m, _ in mounts if m.is_relative_to(lab.base)] == []
    if app.engine == "podman":
        info = lab.podman("src").inspect(app.name)
        assert info is not None
        static = Path(str(info["StaticDir"]))
        checkpoint = static / PODMAN_CHECKPOINT
        assert not checkpoint.exists() or list(checkpoint.iterdir()) == []
        assert [f for f in PODMAN_EXPORT_FILES if (static / f).exists()] == []


@pytest.mark.parametrize(
    ("engine", "cut", "fault"),
    [
        ("runc", True, "flip-byte-in-dump"),
        ("runc", False, "flip-byte-in-dump"),
        ("podman", True, "flip-byte-in-dump"),
        ("podman", False, "flip-byte-in-dump"),
        ("containerd", True, "flip-byte-in-dump"),
        ("podman", True, "drop-in-dump"),
        ("containerd", True, "drop-in-dump"),
    ],
    ids=[
        "runc-cut", "runc-next-step", "podman-cut", "podman-next-step", "containerd-cut",
        "podman-dropped", "containerd-dropped",
    ],
)  # fmt: skip
def test_enclave_stream_failing_mid_dump_cuts_the_engines_criu(
    bed: Testbed,
    lab: ContainerLab,
    agent: AgentProcess,
    tmp_path: Path,
    engine: str,
    cut: bool,
    fault: str,
) -> None:
    """The enclave stream fails while the engine's own CRIU writes a 128 MiB container's
    pages (``flip-byte-in-dump``: the damaged byte goes on once 1 MiB of pages is
    written, and CRIU is held there until the failure reached the tool;
    ``drop-in-dump``: the stream's connection is shut down there instead).

    runc and containerd (the same ``runc checkpoint``) write into the tool's own
    image directory, podman into the container's directory in its storage: for
    the dump, either is a tmpfs of the tool's, and the cancel fills it up: CRIU's
    next write fails, its error path resumes the tasks, and the container thaws
    at once, with every acknowledged write; nothing of the dump stays.  With
    ``--work-dir`` (kept for the user: nothing is mounted over it) runc's dump
    runs to its end and stops at the next step; so does podman's when its
    checkpoint directory holds files (an earlier checkpoint of someone's: left
    as it is, nothing mounted over it).  After podman's cut, the same container
    migrates (podman's records came through whole).  Prints the seconds from the
    fault (the damaged byte or the drop) to the source answering.
    """

    app = lab.start_app(engine, "kvstore", ["--ballast", "128"])
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    digest = lab.ask(app, "DIGEST", at="src")
    args = [] if cut or engine == "podman" else ["--work-dir", str(tmp_path / "images")]
    kept = None
    if engine == "podman" and not cut:
        info = lab.podman("src").inspect(app.name)
        assert info is not None
        kept = Path(str(info["StaticDir"])) / PODMAN_CHECKPOINT / "someones.img"
        kept.parent.mkdir(exist_ok=True)
        kept.write_bytes(b"an earlier checkpoint")
    env = {"MIGSGX_FAULT": f"tool.enclave-stream:{fault}={1 << 20}"}
    run = migrate(bed, app, agent, args=args, env=env)
    assert run.returncode == 6, run.stderr
    assert "Traceback" not in run.stderr
    reason = "chunk failed authentication" if fault.startswith("flip") else "closed"
    assert "enclave 0 did not migrate" in run.stderr and reason in run.stderr, run.stderr
    how = re.search(r"stopped early \(([^)]*)\)", run.stderr)
    assert how is not None, run.stderr
    assert how.group(1) == ("its image directory filled up" if cut else "step refused"), how
    # (from the damaged byte or the drop, CRIU held mid-dump)
    [at] = [t for p, t in _FAULT_AT.findall(run.stderr) if p.endswith(":mid-dump")]
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError):  # (not answering yet: frozen)
            if lab.ask(app, "DIGEST", at="src") == digest:
                break
        assert time.monotonic() < deadline, "the source never ran again"
        time.sleep(0.02)
    back = time.monotonic() - float(at)
    figure = {"engine": engine, "cut": cut, "fault": fault, "back_seconds": round(back, 3)}
    print("container-dump-cut " + json.dumps(figure))
    wait_until(lambda: app.name not in lab.containers("dst", engine), 15, "dst to let go")
    check_source_runs_on(lab, app, digest)
    if kept is not None:
        assert kept.read_bytes() == b"an earlier checkpoint"
        # (podman's CRIU wrote this dump's images beside it, and podman leaves them)
        shutil.rmtree(kept.parent)
    check_no_dump_left(lab, app)
    if engine == "podman" and cut and fault.startswith("flip"):
        # podman's records came through the cut whole: the same container moves now.
        again = lab.ask(app, "DIGEST", at="src")
        moved = migrate(bed, app, agent)
        assert moved.returncode == 0, moved.stderr
        assert lab.ask(app, "DIGEST", at="dst") == again
        finish(lab, app, expect="dst")
        return
    finish(lab, app, expect="src")


def test_tool_killed_while_the_fault_holds_criu_leaves_no_criu_stopped(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess
) -> None:
    """``kill-in-dump`` stops runc's CRIU mid-dump (SIGSTOP), as ``flip-byte-in-dump`` does
    until the tool's cancel, and the tool kills itself right then, so no cancel comes.
    Its guardian continues the CRIU it was told of (else CRIU stays stopped with the
    container's tasks seized, and the container frozen, for good), gives the source
    back, and the images tmpfs goes: the source answers with every write, the
    destination lets go."""

    app = lab.start_app("runc", "kvstore", ["--ballast", "128"])
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    digest = lab.ask(app, "DIGEST", at="src")
    argv = [sys.executable, "-m", "migsgx", "migrate", "--to", agent.target,
            "--state", str(bed.state("src")), "--runc", app.name]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "MIGSGX_FAULT": f"tool.enclave-stream:kill-in-dump={1 << 20}"}  # fmt: skip
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    tool = subprocess.Popen(bed.net["src"].command(argv), env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert tool.stderr is not None
        seen = []
        for line in tool.stderr:
            seen.append(line)
            if "tool.enclave-stream:mid-dump at" in line:
                break  # (the tool kills itself right there, CRIU stopped)
        assert tool.wait(timeout=60) == -9, "".join(seen)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError):  # (not answering yet: frozen)
            if lab.ask(app, "DIGEST", at="src") == digest:
                break
        assert time.monotonic() < deadline, "the source never ran again (CRIU left stopped?)"
        time.sleep(0.05)
    wait_until(lambda: app.name not in lab.containers("dst", "runc"), 30, "dst to let go")
    wait_until(
        lambda: not [m for m, pid in leftover_mounts(Path("/proc/self/mountinfo").read_text())
                     if pid == tool.pid],
        30, "the guardian to unmount the dead tool's images tmpfs",
    )  # fmt: skip
    check_source_runs_on(lab, app, digest)
    finish(lab, app, expect="src")


@pytest.mark.parametrize("engine", ["runc", "podman"])
def test_corrupted_enclave_stream_stops_the_container_dump(
    bed: Testbed, lab: ContainerLab, agent: AgentProcess, engine: str
) -> None:
    """One flipped bit 1 MiB into the enclave stream while the engine dumps a 128 MiB container.

    The container dump stops at its next step (``containers/frozen.py``) instead
    of running to its end, and the container thaws: exit 6, the enclave's reason,
    every write.  Prints the seconds from the fault (the enclave's data connection
    open) to the source answering.
    """

    app = lab.start_app(engine, "kvstore", ["--ballast", "128"])
    assert lab.ask(app, "PUT k " + b"v".hex(), at="src") == "OK 1"
    digest = lab.ask(app, "DIGEST", at="src")
    run = migrate(bed, app, agent, env={"MIGSGX_FAULT": f"tool.enclave-stream:flip-byte={1 << 20}"})
    assert run.returncode == 6, run.stderr
    assert "Traceback" not in run.stderr
    assert "chunk failed authentication" in run.stderr, run.stderr  # the destination's reason
    assert "dump was stopped early" in run.stderr, run.stderr
    [(_, at)] = _FAULT_AT.findall(run.stderr)[:1]
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError):  # (not answering yet: frozen)
            if lab.ask(app, "DIGEST", at="src") == digest:
                break
        assert time.monotonic() < deadline, "the source never ran again"
        time.sleep(0.02)
    back = time.monotonic() - float(at)
    how = re.search(r"stopped early \(([^)]*)\)", run.stderr)
    figure = {"engine": engine, "back_seconds": round(back, 3), "how": how and how.group(1)}
    print("container-dump-cancel " + json.dumps(figure))
    wait_until(lambda: app.name not in lab.containers("dst", engine), 15, "dst to let go")
    check_source_runs_on(lab, app, digest)
    check_no_dump_left(lab, app)
    finish(lab, app, expect="src")
