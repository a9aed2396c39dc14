"""Process migration with real CRIU between two namespaced hosts, enclaves included.

One testbed (two hosts, platform services, an agent) serves the whole module;
tests that need a special agent (fault injection, strict launch control)
start their own.  Every test ends by checking that exactly one runnable copy
of the application exists.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from bed_helpers import (
    enclave_processes,
    finish,
    kvstore,
    scan_files,
    strict_destination,
    wait_until,
    workers,
)

from migsgx.agent.imageroom import fs_type
from migsgx.datapath.checkpoint import CheckpointIn
from migsgx.errors import ReplayError, SealError
from migsgx.host.client import EnclaveClient
from migsgx.lab.netns import Host
from migsgx.lab.testbed import AgentProcess, AppProcess, MigrateRun, Testbed
from migsgx.system.process import in_netns, kill_tree, process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 61

PHASE_KEYS = {
    "freeze", "enclave_dump", "criu_dump", "transfer", "restore", "enclave_load",
    "total", "downtime", "bytes",
}  # fmt: skip


def ask_src(bed: Testbed, app: AppProcess, line: str) -> str:
    return bed.ask(line, app.port, at="src", via="dst")


def ask_dst(bed: Testbed, app: AppProcess, line: str) -> str:
    return bed.ask(line, app.port, at="dst", via="src")


def restored_pid(bed: Testbed, app: AppProcess) -> int:
    procs = bed.copies(app)["dst"]
    assert len(procs) == 1, procs
    return procs[0][0]


# --- moves ---------------------------------------------------------------------------------------
def test_kvstore_moves_with_enclave_and_ordinary_state(bed: Testbed, agent: AgentProcess) -> None:
    app = kvstore(bed)
    for i in range(5):
        assert ask_src(bed, app, f"PUT key{i} {f'value-{i}'.encode().hex()}") == f"OK {i + 1}"
    assert ask_src(bed, app, "NOTE colour blue") == "OK"
    digest = ask_src(bed, app, "DIGEST")

    # By default no memory hint: the destination enclave faults its memory in as it loads.
    run = bed.migrate(app.pid, agent)
    assert run.returncode == 0, run.stderr
    assert run.stats is not None and set(run.stats) >= PHASE_KEYS
    assert run.stats["details"]["enclaves"] == 1
    assert run.stats["details"]["enclave_destination_stats"][0]["prefaulted_bytes"] == 0
    assert run.stats["bytes"] > run.stats["details"]["enclave_bytes"] > 0
    assert run.stats["downtime"] <= run.stats["total"]
    assert not os.path.exists(f"/proc/{app.pid}")  # CRIU killed the source

    assert ask_dst(bed, app, "DIGEST") == digest
    assert ask_dst(bed, app, "GET key3") == "VALUE " + b"value-3".hex()
    assert ask_dst(bed, app, "PUT after " + b"x".hex()) == "OK 6"  # an ECALL after the move
    state = json.loads(ask_dst(bed, app, "STATE").removeprefix("STATE "))
    assert state["notes"] == {"colour": "blue"}
    assert restored_pid(bed, app) == run.stats["details"]["restored_pid"]
    finish(bed, app, expect="dst")


def test_model_moves_with_its_secret_weights(bed: Testbed, agent: AgentProcess) -> None:
    app = bed.start_app(
        "model",
        ["--image", str(bed.image("model")), "--rows", "4096", "--cols", "1024",
         "--ordinary-mib", "32"],
    )  # fmt: skip
    digest = ask_src(bed, app, "DIGEST")
    prediction = ask_src(bed, app, "PREDICT")

    # CRIU's dump nicer than the enclave stream beside it: the same move.
    run = bed.migrate(app.pid, agent, args=("--criu-nice", "3", "--prefault-ahead"))
    assert run.returncode == 0, run.stderr
    assert run.stats is not None
    assert run.stats["details"]["enclave_bytes"] >= 4096 * 1024 * 4
    assert run.stats["details"]["page_bytes"] >= 32 << 20
    # The offer's hint (--prefault-ahead): the destination faulted the weights' memory in.
    destination = run.stats["details"]["enclave_destination_stats"][0]
    assert destination["prefaulted_bytes"] >= 4096 * 1024 * 4
    # ... and answered the handshake (so the source froze) only once it was in.
    assert destination["prefault_done_before_freeze"] is True

    assert ask_dst(bed, app, "DIGEST") == digest  # enclave weights and ordinary memory
    assert ask_dst(bed, app, "PREDICT") == prediction
    # The destination received CRIU's images into its work directory, and removed them
    # after the move (right after its answer, so the tool may be back first).
    work = bed.state("dst") / "agent" / "work"
    assert run.stats["details"]["destination_images_fs"] == fs_type(work)
    wait_until(lambda: not any(work.iterdir()), 10, "the session's directory removed")
    finish(bed, app, expect="dst")


def test_two_enclaves_and_four_threads_calling_them(bed: Testbed, agent: AgentProcess) -> None:
    app = kvstore(bed, "--enclaves", "2", "--workers", "4")
    wait_until(
        lambda: all(w["count"] > 20 for w in workers(bed, app, "src")), 20, "the workers to start"
    )
    run = bed.migrate(app.pid, agent)
    assert run.returncode == 0, run.stderr
    assert run.stats is not None and run.stats["details"]["enclaves"] == 2

    counts = [w["count"] for w in workers(bed, app, "dst")]
    wait_until(
        lambda: all(
            w["count"] > c + 20 for w, c in zip(workers(bed, app, "dst"), counts, strict=True)
        ),
        20,
        "the workers to carry on after the move",
    )
    final = workers(bed, app, "dst")
    assert all(w["alive"] and not w["errors"] for w in final), final
    ask_dst(bed, app, "STOP")
    # Each worker checks every value it reads back; the enclaves hold the last count.
    for i, worker in enumerate(workers(bed, app, "dst")):
        assert ask_dst(bed, app, f"WORKER {i}") == "VALUE " + str(worker["count"]).encode().hex()
    finish(bed, app, expect="dst")


# --- failures ------------------------------------------------------------------------------------
def check_source_runs_on(bed: Testbed, app: AppProcess, digest: str) -> None:
    assert process_state(app.pid) in ("S", "R")
    assert ask_src(bed, app, "DIGEST") == digest
    assert ask_src(bed, app, "PUT later " + b"y".hex()).startswith("OK")  # ECALLs work again
    assert bed.copies(app)["dst"] == []


def test_destination_agent_killed_during_transfer(bed: Testbed) -> None:
    # SIGKILL once 16 MiB of the enclave stream (about 48 MiB) came in.
    fault = f"agent.enclave-receive:kill-after-bytes={16 << 20}"
    doomed = bed.start_agent(env={"MIGSGX_FAULT": fault})
    app = kvstore(bed)
    ask_src(bed, app, "PUT k " + b"v".hex())
    digest = ask_src(bed, app, "DIGEST")

    run = bed.migrate(app.pid, doomed)
    assert run.returncode == 6, run.stderr
    # The enclave stream starts at the freeze, beside CRIU's dump to the same agent:
    # whichever of the two notices the agent's death first is the reason given (CRIU's
    # dump fails, CRIU itself dies when its page server goes away mid-stream, or the
    # sealed page relay to the agent loses its connection).
    reasons = ("enclave 0 did not migrate", "criu dump", "CRIU's page stream failed")
    assert any(reason in run.stderr for reason in reasons), run.stderr
    assert doomed.proc.wait(timeout=10) == -signal.SIGKILL
    check_source_runs_on(bed, app, digest)
    finish(bed, app, expect="src")


def _spans(run: MigrateRun) -> dict[str, dict[str, list[float]]]:
    assert run.stats is not None
    spans: dict[str, dict[str, list[float]]] = run.stats["timeline"]["spans"]
    return spans


def test_destination_enclaves_launch_and_attest_before_the_freeze(
    bed: Testbed, agent: AgentProcess
) -> None:
    """By default the destination enclaves launch and finish the attested handshake
    while the application still runs; ``--late-handshake`` does both inside the freeze."""

    for args, early in (((), True), (("--late-handshake",), False)):
        app = kvstore(bed, "--enclaves", "2")
        digest = ask_src(bed, app, "DIGEST")
        run = bed.migrate(app.pid, agent, args=args)
        assert run.returncode == 0, run.stderr
        spans = _spans(run)
        freeze = spans["tool"]["freeze"][0]
        for i in range(2):
            launched = spans[f"enclave{i}.destination_driver"]["launch"]
            attested = spans[f"enclave{i}.source_driver"]["handshake"][1]
            dumped = spans[f"enclave{i}.source_enclave"]["quiesce"][0]
            if early:
                assert launched[1] <= attested <= freeze <= dumped
            else:
                assert freeze <= launched[0] <= attested <= dumped
        assert ("early_handshake" in spans["tool"]) is early
        assert ask_dst(bed, app, "DIGEST") == digest
        finish(bed, app, expect="dst")


def test_destination_lost_during_the_early_handshake_never_freezes_the_source(
    bed: Testbed,
) -> None:
    # SIGKILL as soon as an enclave's data connection is authenticated: before the offer.
    doomed = bed.start_agent(env={"MIGSGX_FAULT": "agent.enclave-receive:kill-after-bytes=1"})
    app = kvstore(bed)
    ask_src(bed, app, "PUT k " + b"v".hex())
    digest = ask_src(bed, app, "DIGEST")

    run = bed.migrate(app.pid, doomed)
    assert run.returncode != 0
    assert "the handshake failed, the source runs on" in run.stderr
    assert doomed.proc.wait(timeout=10) == -signal.SIGKILL
    check_source_runs_on(bed, app, digest)
    finish(bed, app, expect="src")


def test_a_port_taken_at_the_destination_is_refused_before_the_freeze(
    bed: Testbed, agent: AgentProcess
) -> None:
    """The application listens on a port that something holds in the destination's
    namespace: ``begin`` is refused (``port-in-use``, exit 6) before anything froze or
    moved, instead of CRIU's "Can't bind inet socket" after the freeze; once the port
    is free the same application moves."""

    app = kvstore(bed)
    ask_src(bed, app, "PUT k " + b"v".hex())
    digest = ask_src(bed, app, "DIGEST")
    squatter = in_netns(
        f"/run/netns/{bed.host('dst').netns}",
        lambda: socket.create_server(("0.0.0.0", app.port)),
    )
    try:
        run = bed.migrate(app.pid, agent)
    finally:
        squatter.close()
    assert run.returncode == 6, run.stderr  # EXIT_MIGRATION: did not move, the source runs
    assert "destination: begin failed: [port-in-use]" in run.stderr
    assert f"tcp 0.0.0.0:{app.port}" in run.stderr
    assert "Can't bind" not in run.stderr  # CRIU never ran
    check_source_runs_on(bed, app, digest)
    digest = ask_src(bed, app, "DIGEST")
    run = bed.migrate(app.pid, agent)
    assert run.returncode == 0, run.stderr
    assert ask_dst(bed, app, "DIGEST") == digest
    finish(bed, app, expect="dst")


def test_criu_restore_failing_keeps_the_source(bed: Testbed) -> None:
    failing = bed.start_agent(env={"MIGSGX_FAULT": "agent.before-restore:corrupt"})
    app = kvstore(bed)
    ask_src(bed, app, "PUT k " + b"v".hex())
    ask_src(bed, app, "NOTE n 1")
    digest = ask_src(bed, app, "DIGEST")

    run = bed.migrate(app.pid, failing)
    assert run.returncode == 6, run.stderr  # EXIT_MIGRATION
    assert "restore" in run.stderr
    check_source_runs_on(bed, app, digest)
    assert json.loads(ask_src(bed, app, "STATE").removeprefix("STATE "))["notes"] == {"n": "1"}
    failing.stop()
    finish(bed, app, expect="src")


@pytest.mark.parametrize(
    ("action", "args"),
    [
        ("corrupt", ()),
        ("drop", ()),
        ("reorder", ()),
        ("truncate", ()),
        ("replay", ()),
        ("corrupt", ("--page-criu-tls",)),
    ],
)
def test_a_tampered_page_stream_keeps_the_source(
    bed: Testbed, action: str, args: tuple[str, ...]
) -> None:
    """Pages always travel protected (the sealed relay, or CRIU's TLS): a flipped byte,
    a dropped, reordered or replayed frame, or a stream cut before its last frame fails
    the migration, exit 6, and the source runs on."""

    tampering = bed.start_agent(env={"MIGSGX_FAULT": f"agent.page-stream:{action}"})
    app = kvstore(bed)
    ask_src(bed, app, "PUT k " + b"v".hex())
    digest = ask_src(bed, app, "DIGEST")

    run = bed.migrate(app.pid, tampering, args=list(args))
    assert run.returncode == 6, run.stderr  # EXIT_MIGRATION: it did not move
    assert "the source runs on" in run.stderr and "Traceback" not in run.stderr
    if not args:
        assert "page stream" in run.stderr
    check_source_runs_on(bed, app, digest)
    tampering.stop()
    finish(bed, app, expect="src")


def test_destination_enclave_load_failing(bed: Testbed, tmp_path: Path) -> None:
    """The destination platform refuses to launch the enclave (launch control)."""

    with strict_destination(bed, tmp_path / "strict") as strict:
        app = kvstore(bed)
        ask_src(bed, app, "PUT k " + b"v".hex())
        digest = ask_src(bed, app, "DIGEST")

        run = bed.migrate(app.pid, strict)
        assert run.returncode == 6, run.stderr
        assert "launch" in run.stderr
        check_source_runs_on(bed, app, digest)
        strict.stop()
        finish(bed, app, expect="src")


@pytest.mark.parametrize("point", ["tool.after-prepare", "tool.before-commit"])
def test_tool_dying_before_the_commit_point(bed: Testbed, agent: AgentProcess, point: str) -> None:
    """The guardian aborts the source enclaves and gives them back; the source runs on."""

    app = kvstore(bed)
    ask_src(bed, app, "PUT k " + b"v".hex())
    digest = ask_src(bed, app, "DIGEST")
    run = bed.migrate(
        app.pid,
        agent,
        env={"MIGSGX_FAULT": f"{point}:exit"},
        args=["--work-dir", str(bed.root / f"dump-{app.marker}")],
    )
    assert run.returncode == 70
    assert "resuming the source" in run.stderr  # the guardian's report
    wait_until(lambda: bed.copies(app)["dst"] == [], 15, "the destination to let go")
    check_source_runs_on(bed, app, digest)
    finish(bed, app, expect="src")


# The source application killed at each step before the commit: the cells of
# test_early_faults.py.


def test_source_killed_after_the_commit_point(bed: Testbed, agent: AgentProcess) -> None:
    app = kvstore(bed)
    ask_src(bed, app, "PUT k " + b"v".hex())
    digest = ask_src(bed, app, "DIGEST")

    run = bed.migrate(
        app.pid,
        agent,
        env={"MIGSGX_FAULT": "tool.after-commit:exit"},
        args=["--work-dir", str(bed.root / f"dump-{app.marker}")],  # the dead tool leaves it
    )
    assert run.returncode == 70  # the tool died right after the enclaves committed
    assert "the destination rolls forward" in run.stderr  # the guardian's report
    # The destination saw the COMMIT tokens and rolls forward on its own ...
    wait_until(lambda: bed.copies(app)["dst"] != [], 15, "the destination to roll forward")
    wait_until(lambda: bed.runnable_copies(app)["dst"] == 1, 15, "the destination to run")
    assert ask_dst(bed, app, "DIGEST") == digest
    # ... and the fenced source never runs again: the guardian, having delivered the
    # recorded decision and heard that the destination runs, removes it.
    wait_until(lambda: process_state(app.pid) in ("Z", "X", ""), 30, "the source to die")
    assert bed.runnable_copies(app)["src"] == 0
    finish(bed, app, expect="dst")


def test_plain_process_without_migration_control(bed: Testbed, agent: AgentProcess) -> None:
    """No enclaves and no cooperation: CRIU alone, through the same agent."""

    launcher = bed.host("src").spawn(
        ["unshare", "--pid", "--fork", "setsid", "sleep", "600"], stderr=None
    )
    wait_until(lambda: len(_tree(launcher.pid)) == 2, 10, "sleep to start")
    pid = _tree(launcher.pid)[1]
    run = bed.migrate(pid, agent)
    assert run.returncode == 0, run.stderr
    assert run.stats is not None and run.stats["details"]["enclaves"] == 0
    restored = run.stats["details"]["restored_pid"]
    assert process_state(restored) == "S"
    kill_tree(restored)


def _tree(pid: int) -> list[int]:
    from migsgx.system.process import tree_pids

    return tree_pids(pid)


# --- the canary -------------------------------------------------------------------------------
class Capture:
    """Every TCP payload crossing a host's eth0, searched for needles as it passes."""

    def __init__(self, host: Host, needles: dict[str, bytes]) -> None:
        self.needles = needles
        self.found: dict[str, int] = dict.fromkeys(needles, 0)
        self.payload_bytes = 0
        self._tails: dict[bytes, bytes] = {}
        self._keep = max(len(n) for n in needles.values()) - 1
        self._stop = threading.Event()
        self._last = time.monotonic()
        self.sock = in_netns(
            f"/run/netns/{host.netns}",
            lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)),
        )
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE
        self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(1 << 18)
        while True:
            try:
                n = self.sock.recv_into(buf)
            except TimeoutError:
                if self._stop.is_set():
                    return  # stopped, and nothing queued any more
                continue
            self._last = time.monotonic()
            self._packet(bytes(buf[:n]))

    def drain(self, idle: float = 0.3) -> None:
        """Wait until every packet queued so far was searched."""

        self._last = time.monotonic()
        while time.monotonic() - self._last < idle:
            time.sleep(0.05)

    def _packet(self, frame: bytes) -> None:
        if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            return
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from(">H", frame, 16)[0] or len(frame) - 14
        tcp = 14 + ihl
        payload = frame[tcp + (frame[tcp + 12] >> 4) * 4 : 14 + total]
        if not payload:
            return
        flow = frame[26:34] + frame[tcp : tcp + 4]
        data = self._tails.get(flow, b"") + payload
        for name, needle in self.needles.items():
            if needle in data:
                self.found[name] += 1
        self._tails[flow] = data[-self._keep :]
        self.payload_bytes += len(payload)

    def stop(self) -> int:
        """Stop; returns how many packets the kernel dropped (0: the capture is complete)."""

        self._stop.set()
        self._thread.join(10)
        stats = self.sock.getsockopt(263, 6, 8)  # SOL_PACKET, PACKET_STATISTICS
        self.sock.close()
        return int(struct.unpack("II", stats)[1])


@pytest.mark.parametrize(
    "mode",
    ["", "--live", "--post-copy", "--page-criu-tls"],
    ids=["pages-sealed", "pages-sealed-live", "post-copy", "page-criu-tls"],
)
def test_canary_is_in_no_image_stream_log_or_temp_file(
    bed: Testbed, tmp_path: Path, mode: str
) -> None:
    kept = bed.start_agent(args=["--keep-images"])
    secret = b"CANARY-" + secrets.token_hex(16).encode()
    ordinary = b"ORDINARY-" + secrets.token_hex(16).encode()
    # The secret enters enclave memory sealed: the application only sees ciphertext.
    with EnclaveClient.launch(
        bed.image("kvstore"), socket_path=bed.services["src"].socket
    ) as sealer:
        sealer.ecall.put("canary", secret)
        blob = sealer.ecall.seal_value("canary")
    app = kvstore(bed)
    assert ask_src(bed, app, f"UNSEAL canary {blob.hex()}") == "OK 1"
    assert ask_src(bed, app, f"NOTE plain {ordinary.decode()}") == "OK"
    digest = ask_src(bed, app, "DIGEST")

    needles = {"secret": secret, "ordinary": ordinary}
    capture = Capture(bed.host("dst"), needles)
    dump_dir = bed.root / f"tool-dump-{app.marker}"
    args = ["--keep-images", "--work-dir", str(dump_dir), *([mode] if mode else [])]
    run = bed.migrate(app.pid, kept, args=args)
    capture.drain()
    during = dict(capture.found)
    # The capture's own check: an answer carrying the note in clear crosses eth0.
    assert ordinary.decode() in ask_dst(bed, app, "STATE")
    capture.drain()
    assert capture.stop() == 0  # no packet dropped: every byte was searched
    assert run.returncode == 0 and run.stats is not None, run.stderr
    assert capture.payload_bytes > run.stats["bytes"]
    assert capture.found["ordinary"] > during["ordinary"]

    assert capture.found["secret"] == 0
    # The page stream is always encrypted: sealed frames (post-copy, --page-criu-tls: CRIU's TLS).
    assert during["ordinary"] == 0

    (tmp_path / "tool.out").write_text(run.stdout + run.stderr)
    hits = scan_files([bed.root, tmp_path, Path("/dev/shm")], needles)
    assert hits["secret"] == []
    if mode == "--post-copy":
        assert "post_copy_window" in run.stats
    if "post_copy_window" in run.stats:  # (--live too, where the host allows post-copy)
        # No page of the heap went into an image: it was pulled after the commit.
        assert run.stats["details"]["page_bytes"] == 0
        assert not any("pages-" in path for path in hits["ordinary"]), hits["ordinary"]
    else:
        # The file scan does see what it should: the note moved in the CRIU pages.
        assert any("pages-" in path for path in hits["ordinary"]), hits["ordinary"]

    assert ask_dst(bed, app, "DIGEST") == digest
    assert ask_dst(bed, app, "GET canary") == "VALUE " + secret.hex()
    kept.stop()
    finish(bed, app, expect="dst")


# --- checkpoint to a directory and back -------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migsgx", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_checkpoint_to_a_directory_and_restore_elsewhere(bed: Testbed, tmp_path: Path) -> None:
    app = kvstore(bed, "--enclaves", "0")
    assert ask_src(bed, app, "NOTE kept yes") == "OK"
    done = run_cli("checkpoint", str(app.pid), "--dir", str(tmp_path / "ck"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["enclaves"] == 0
    wait_until(lambda: not os.path.exists(f"/proc/{app.pid}"), 10, "the source to end")

    back = run_cli("restore", "--dir", str(tmp_path / "ck"), "--netns", bed.host("dst").netns)
    assert back.returncode == 0, back.stderr
    state = json.loads(ask_dst(bed, app, "STATE").removeprefix("STATE "))
    assert state["notes"] == {"kept": "yes"}
    finish(bed, app, expect="dst")


def test_checkpoint_with_enclaves_restores_exactly_once(bed: Testbed, tmp_path: Path) -> None:
    app = kvstore(bed)
    assert ask_src(bed, app, f"PUT kept {secrets.token_hex(32)}").startswith("OK")
    digest = ask_src(bed, app, "DIGEST")
    ck = tmp_path / "ck"
    done = run_cli("checkpoint", str(app.pid), "--dir", str(ck))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["enclaves"] == 1
    wait_until(lambda: not os.path.exists(f"/proc/{app.pid}"), 10, "the source to end")
    assert sorted(p.name for p in ck.glob("enclave-0.*")) == [
        "enclave-0.image", "enclave-0.json", "enclave-0.key", "enclave-0.state",
    ]  # fmt: skip

    socket_path = str(bed.services["src"].socket)
    netns = bed.host("src").netns
    back = run_cli("restore", "--dir", str(ck), "--netns", netns, "--platform-socket", socket_path)
    assert back.returncode == 0, back.stderr
    assert ask_src(bed, app, "DIGEST") == digest
    assert ask_src(bed, app, "PUT after 01").startswith("OK")

    # The enclave state in the directory was claimed by that restore: never again.
    again = CheckpointIn(ck, 0, socket_path)
    with pytest.raises(ReplayError, match="restores only once"):
        again.load()  # refused before a byte of state is loaded
    finish(bed, app, expect="src")


def test_checkpoint_of_enclaves_does_not_open_on_another_host(bed: Testbed, tmp_path: Path) -> None:
    app = kvstore(bed)
    ck = tmp_path / "ck"
    done = run_cli("checkpoint", str(app.pid), "--dir", str(ck))
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not os.path.exists(f"/proc/{app.pid}"), 10, "the source to end")
    elsewhere = CheckpointIn(ck, 0, bed.services["dst"].socket)
    with pytest.raises(SealError, match="another host"):
        elsewhere.load()


def inspect_json(*args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "migsgx", "inspect", "--json", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout) if done.stdout else {"stderr": done.stderr}


def tree_state(root: Path) -> list[tuple[str, int, int]]:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))]


def test_inspect_shows_a_checkpoint_then_its_spent_enclave(bed: Testbed, tmp_path: Path) -> None:
    """``migsgx inspect``: identities and sealing of the enclave, the canary scan, read-only."""

    secret = b"CANARY-" + secrets.token_hex(16).encode()
    socket_path = str(bed.services["src"].socket)
    with EnclaveClient.launch(bed.image("kvstore"), socket_path=socket_path) as sealer:
        sealer.ecall.put("canary", secret)
        blob = sealer.ecall.seal_value("canary")
    app = kvstore(bed)
    assert ask_src(bed, app, f"UNSEAL canary {blob.hex()}") == "OK 1"
    ck = tmp_path / "ck"
    done = run_cli("checkpoint", str(app.pid), "--dir", str(ck))
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not os.path.exists(f"/proc/{app.pid}"), 10, "the source to end")

    before = tree_state(ck)
    state = bed.state("src")
    code, report = inspect_json(str(ck), "--canary", secret.decode(), "--state", str(state))
    assert code == 0, report
    assert tree_state(ck) == before  # nothing written, nothing touched
    assert report["kind"] == "migsgx-checkpoint" and report["committed"] is True
    assert report["processes"][0]["command"].startswith("python")
    assert report["criu"]["memory_bytes"] > 0
    (enclave,) = report["enclaves"]
    from migsgx.sgx.image import EnclaveImage

    image = EnclaveImage.load(bed.image("kvstore"))
    assert enclave["mrenclave"] == image.measure().hex()
    assert enclave["mrsigner"] == image.sigstruct.mr_signer.hex()
    assert enclave["isv_svn"] == image.manifest.svn
    assert enclave["status"] == "restorable"
    assert enclave["sealed"]["state_bytes"] > 0
    assert report["scan"] == {
        "canaries": {secret.decode(): []}, "sealed_frames": report["scan"]["sealed_frames"],
        "plaintext_suspects": [], "clean": True,
    }  # fmt: skip
    assert report["scan"]["sealed_frames"] > 2

    netns = bed.host("src").netns
    back = run_cli("restore", "--dir", str(ck), "--netns", netns, "--platform-socket", socket_path)
    assert back.returncode == 0, back.stderr
    code, report = inspect_json(str(ck), "--state", str(state))
    assert code == 0, report
    assert report["enclaves"][0]["status"].startswith("spent")
    assert ask_src(bed, app, "GET canary") == "VALUE " + secret.hex()
    finish(bed, app, expect="src")


# --- metrics -----------------------------------------------------------------------------------
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(bed: Testbed, agent: AgentProcess) -> Samples:
    """The agent's metrics over HTTP from the other host, parsed by prometheus_client."""

    from prometheus_client.parser import text_string_to_metric_families

    line = next(ln for ln in agent.log.read_text().splitlines() if "metrics on http://" in ln)
    host, _, port = line.rsplit("http://", 1)[1].removesuffix("/metrics").rpartition(":")
    with bed.net["src"].connect(host, int(port), timeout=10) as sock:
        sock.sendall(f"GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_agent_metrics_during_and_after_a_migration(bed: Testbed, tmp_path: Path) -> None:
    """Scraped while the restored tree is held (in doubt), then after the commit.

    The default, overlapped order holds the tree in doubt once every enclave
    LOADED (``enclaves_done``; before, in ``held-loading``, the source cannot
    decide): the gate is there."""

    gate = tmp_path / "go-on"
    dst = bed.host("dst")
    watched = bed.start_agent(
        args=["--metrics", f"{dst.address}:0"],
        env={"MIGSGX_FAULT": f"agent.enclaves-loaded:wait-file={gate}"},
    )
    app = kvstore(bed)
    assert ask_src(bed, app, "PUT k " + b"v".hex()) == "OK 1"
    before = scrape(bed, watched)
    assert before[("migsgx_migrations_in_doubt", ())] == 0
    assert before[("migsgx_migrations_total", (("driver", "pid"), ("outcome", "committed")))] == 0

    result: dict[str, MigrateRun] = {}
    mover = threading.Thread(target=lambda: result.update(run=bed.migrate(app.pid, watched)))
    mover.start()
    wait_until(lambda: scrape(bed, watched)[("migsgx_migrations_in_doubt", ())] == 1, 60,
               "the restored tree to be held")  # fmt: skip
    during = scrape(bed, watched)
    assert during[("migsgx_migrations_in_progress", ())] == 1
    assert during[("migsgx_enclaves_incoming", (("host", watched_host(bed)),))] == 1
    assert during[("migsgx_migration_phase_seconds_count", (("phase", "images"),))] == 1
    assert during[("migsgx_migration_bytes_total", (("kind", "enclave"),))] > 0
    gate.touch()
    mover.join(120)
    assert result["run"].returncode == 0, result["run"].stderr
    after = scrape(bed, watched)
    assert after[("migsgx_migrations_total", (("driver", "pid"), ("outcome", "committed")))] == 1
    assert after[("migsgx_migrations_in_doubt", ())] == 0
    assert after[("migsgx_migrations_in_progress", ())] == 0
    for phase in ("enclave_receive", "images", "restore", "resume"):
        assert after[("migsgx_migration_phase_seconds_count", (("phase", phase),))] == 1
    assert after[("migsgx_migration_bytes_total", (("kind", "images"),))] > 0
    received = [v for (n, labels), v in after.items() if n == "migsgx_enclaves_received_total"]
    assert received == [1.0]
    assert ask_dst(bed, app, "GET k") == "VALUE " + b"v".hex()
    watched.stop()
    finish(bed, app, expect="dst")


def watched_host(bed: Testbed) -> str:
    from migsgx.agent.tls import AgentIdentity

    return AgentIdentity.of_state(bed.state("dst")).host_id()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_fails_clearly_and_leaves_nothing(
    bed: Testbed, tmp_path: Path, damage: str
) -> None:
    """Half a page image, or one flipped bit: a clear error, nothing left, the next works."""

    app = kvstore(bed)
    assert ask_src(bed, app, f"PUT kept {secrets.token_hex(32)}").startswith("OK")
    digest = ask_src(bed, app, "DIGEST")
    ck = tmp_path / "ck"
    done = run_cli("checkpoint", str(app.pid), "--dir", str(ck))
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not os.path.exists(f"/proc/{app.pid}"), 10, "the source to end")
    intact = tmp_path / "intact"
    shutil.copytree(ck, intact)
    pages = max(ck.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = bytearray(pages.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    pages.write_bytes(bytes(data))

    socket_path = str(bed.services["src"].socket)
    netns = bed.host("src").netns
    before = enclave_processes(bed, "src")
    back = run_cli("restore", "--dir", str(ck), "--netns", netns, "--platform-socket", socket_path)
    assert back.returncode == 1, back.stderr
    assert "[checkpoint-damaged]" in back.stderr and "pages-" in back.stderr
    assert "Traceback" not in back.stderr
    assert bed.copies(app) == {"src": [], "dst": []}
    wait_until(lambda: enclave_processes(bed, "src") <= before, 15, "no enclave left")
    # The intact copy restores (the abstract socket name is free again), exactly once.
    back = run_cli(
        "restore", "--dir", str(intact), "--netns", netns, "--platform-socket", socket_path
    )
    assert back.returncode == 0, back.stderr
    assert ask_src(bed, app, "DIGEST") == digest
    finish(bed, app, expect="src")
