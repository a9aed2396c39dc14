"""Checkpoints, restores and live moves attacked as an unlucky operator would, with real CRIU.

Two tools at work on one checkpoint directory at once: a second ``migsgx
restore`` while the first holds its activated enclaves, a ``restore`` while the
checkpoint itself has not committed, a ``migsgx recover --checkpoint`` while a
restore holds its tree.  Each must leave the other alone: exactly one runnable
copy with every acknowledged write.  Also: the restore's tool and its guardian
both killed after the activation; a ``recover`` killed after its aborts, then
one more; a canary in a checkpoint with persistent state, searched in every
file the checkpoint and the restore leave; ``--live`` with workers writing: one
byte of an enclave stream flipped inside a pre-copy round, the tool or the
source enclave killed between two rounds.
Each step is reached through a fault hook (``wait-file``), never by a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.register_assert_rewrite("bed_helpers")

from bed_helpers import (  # noqa: E402
    ask,
    finish,
    kvstore,
    scan_files,
    start_workers,
    wait_until,
    workers,
    workers_carry_on,
    workers_kept_every_write,
)

from migsgx import _proc  # noqa: E402
from migsgx.lab.testbed import AgentProcess, AppProcess, Testbed  # noqa: E402
from migsgx.system.process import kill_tree  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 197


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "migsgx", *args]


def cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _argv(*args), capture_output=True, text=True, timeout=90,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@dataclass
class Held:
    """A tool started in the background, held at a fault point (``wait-file``)."""

    proc: subprocess.Popen[bytes]
    log: Path
    go: Path

    def reached(self, point: str) -> None:
        wait_until(lambda: f"migsgx fault: {point}" in self.text() or self.proc.poll() is not None,
                   60, f"the tool to reach {point}")  # fmt: skip
        assert f"migsgx fault: {point}" in self.text(), self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def release(self) -> int:
        self.go.touch()
        return self.proc.wait(90)

    def end(self) -> None:
        """Passed or failed: let it go on, and wait for it (bounded; then killed)."""

        self.go.touch()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Case:
    bed: Testbed
    app: AppProcess
    ck: Path
    digest: str
    tmp: Path
    tools: list[Held] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return str(self.bed.services["src"].socket)

    def restore_args(self) -> list[str]:
        return ["restore", "--dir", str(self.ck), "--netns", self.bed.host("src").netns,
                "--platform-socket", self.socket]  # fmt: skip

    def restore(self) -> subprocess.CompletedProcess[str]:
        return cli(*self.restore_args())

    def held(self, name: str, point: str, *args: str, then_fail: bool = False) -> Held:
        go = self.tmp / f"go-{name}"
        log = self.tmp / f"{name}.err"
        action = "wait-file-then-fail" if then_fail else "wait-file"
        env = {**os.environ, "MIGSGX_FAULT": f"{point}:{action}={go}",
               "MIGSGX_PLATFORM_SOCKET": self.socket}  # fmt: skip
        with log.open("wb") as err:
            proc = subprocess.Popen(_argv(*args), stdout=subprocess.DEVNULL, stderr=err,
                                    stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        held = Held(proc, log, go)
        self.tools.append(held)
        held.reached(point)
        return held

    def checkpoint(self) -> None:
        done = cli("checkpoint", str(self.app.pid), "--dir", str(self.ck))
        assert done.returncode == 0, done.stderr
        wait_until(lambda: not os.path.exists(f"/proc/{self.app.pid}"), 10, "the source to end")

    def recover(self) -> tuple[int, dict[str, str]]:
        done = cli("recover", "--checkpoint", str(self.ck), "--json",
                   "--platform-socket", self.socket)  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr
        [resolution] = json.loads(done.stdout)
        return done.returncode, resolution

    def one_copy_with_every_write(self, within: float = 15) -> None:
        wait_until(lambda: self.bed.runnable_copies(self.app)["src"] == 1, within, "one copy")
        assert ask(self.bed, self.app, "src", "DIGEST") == self.digest
        assert ask(self.bed, self.app, "src", "PUT after 01").startswith("OK")  # ECALLs work
        assert self.bed.runnable_copies(self.app) == {"src": 1, "dst": 0}


@pytest.fixture
def case(bed: Testbed, tmp_path: Path) -> Iterator[Case]:
    app = kvstore(bed)
    assert ask(bed, app, "src", f"PUT kept {secrets.token_hex(32)}").startswith("OK")
    c = Case(bed, app, tmp_path / "ck", ask(bed, app, "src", "DIGEST"), tmp_path)
    try:
        yield c
    finally:
        for tool in c.tools:
            tool.end()
        _end_copies(bed, app)


def _end_copies(bed: Testbed, app: AppProcess) -> None:
    for procs in bed.copies(app).values():
        for pid, _ in procs:
            kill_tree(pid)


def _no_traceback(run: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, run.stderr


# --- two tools on one checkpoint directory --------------------------------------------------------
def test_a_second_restore_leaves_an_activated_restore_alone(case: Case) -> None:
    """Restore A activated its enclaves (the gate is consumed; they hold the only copy)
    and has not continued its tree; restore B of the same directory runs meanwhile.

    Before: B took A's stopped tree for a dead attempt's leftover and killed it, then
    failed at the consumed gate; A could not continue its tree, its enclaves ended
    with it: no copy left.  Now B refuses at once (another tool works here)."""

    case.checkpoint()
    first = case.held("restore-a", "restore.activated", *case.restore_args())
    second = case.restore()
    _no_traceback(second)
    assert second.returncode != 0, second.stdout
    assert first.release() == 0, first.text()
    case.one_copy_with_every_write()


def test_a_restore_during_the_checkpoint_leaves_its_source_alone(case: Case) -> None:
    """The checkpoint tool is in CRIU's ``post-dump``, the source fenced, no gate committed;
    an operator runs ``restore`` on the directory; the checkpoint then rolls back.

    Before: the restore killed the fenced source (it names the checkpoint's source) and
    failed at the pending gate; the roll-back found no source, its enclave ended with
    it: exit 8, every write gone.  Now the restore refuses while the checkpoint's tool
    lives, and the roll-back gives the source back with every write (exit 6)."""

    ckpt = case.held("checkpoint", "ckpt.before-commit",
                     "checkpoint", str(case.app.pid), "--dir", str(case.ck),
                     then_fail=True)  # fmt: skip
    early = case.restore()
    _no_traceback(early)
    assert early.returncode != 0, early.stdout
    assert ckpt.release() == 6, ckpt.text()
    case.one_copy_with_every_write()


def test_recover_leaves_a_running_restore_alone(case: Case) -> None:
    """``migsgx recover --checkpoint`` while a restore holds its restored tree (stopped,
    enclaves loaded, not activated).

    Before: recover read the journal of the dead checkpoint tool, found the gates
    committed, killed the held tree as a dead restore's leftover (``restorable``), and
    the live restore then failed (exit 1).  Now recover says ``in-progress`` and the
    restore ends well."""

    case.checkpoint()
    first = case.held("restore-a", "restore.held", *case.restore_args())
    code, found = case.recover()
    assert code == 0 and found["outcome"] == "in-progress", found
    assert first.release() == 0, first.text()
    case.one_copy_with_every_write()


def test_a_recover_killed_after_its_aborts_then_one_more_recover(case: Case) -> None:
    """The checkpoint tool and its guardian ``kill -9`` before the commit (``kill-guardian``:
    the enclave keeps its state on its duplicate); the first ``recover --checkpoint``
    is killed right after the enclave answered its abort (the gate gone), before the
    hand-back.  One more recover hands the enclave back: one copy, every write, and
    the checkpoint never restores."""

    done = cli("checkpoint", str(case.app.pid), "--dir", str(case.ck),
               env={"MIGSGX_FAULT": "ckpt.before-commit:kill-guardian"})  # fmt: skip
    assert done.returncode == 70, done.stderr
    first = cli("recover", "--checkpoint", str(case.ck), "--json", "--platform-socket",
                case.socket, env={"MIGSGX_FAULT": "recover.abort-answered:exit"})  # fmt: skip
    assert first.returncode == 70 and "migsgx fault: recover.abort-answered" in first.stderr
    code, found = case.recover()
    assert code == 0 and (found["decision"], found["outcome"]) == ("abort", "stayed"), found
    case.one_copy_with_every_write()
    back = case.restore()
    _no_traceback(back)
    assert back.returncode != 0, back.stdout
    assert case.bed.runnable_copies(case.app) == {"src": 1, "dst": 0}


def _restore_guardian(tool: int) -> int:
    """The guardian the restore tool ``tool`` started (its child)."""

    found = [
        pid for pid in _proc.pids()
        if b"migsgx.agent.guardian" in _proc.argv(pid) and b"--restore" in _proc.argv(pid)
        and _proc.parent(pid) == tool
    ]  # fmt: skip
    assert len(found) == 1, found
    return found[0]


def test_restore_tool_and_guardian_killed_after_the_activation(case: Case) -> None:
    case.checkpoint()
    first = case.held("restore-a", "restore.activated", *case.restore_args())
    guardian = _restore_guardian(first.proc.pid)
    for pid in (guardian, first.proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    first.proc.wait(30)
    wait_until(lambda: not _proc.alive(guardian), 10, "the guardian to die")
    case.recover()  # (one recover, whatever it says)
    case.one_copy_with_every_write(within=3)  # (after the recover: no start to wait for)


# --- the canary, planted in a checkpoint with persistent state ---------------------------------
def test_canary_in_a_persistent_checkpoint_is_in_no_file(case: Case) -> None:
    """A secret enters the enclave sealed (the application sees ciphertext only), beside
    a persistent state; checkpoint, then restore.  The secret is in no file of the
    checkpoint directory (images, enclave files, metadata, journal, logs), of either
    host's state (platform store, service and enclave logs), of ``/dev/shm`` or of the
    cell's temporary directory, at either moment; the control: an ordinary note the
    application holds is found in CRIU's page images."""

    bed = case.bed
    secret = b"CANARY-" + secrets.token_hex(16).encode()
    ordinary = b"ORDINARY-" + secrets.token_hex(16).encode()
    from migsgx.host.client import EnclaveClient

    with EnclaveClient.launch(bed.image("kvstore"), socket_path=case.socket) as sealer:
        sealer.ecall.put("canary", secret)
        blob = sealer.ecall.seal_value("canary")
    assert ask(bed, case.app, "src", f"PERSIST p-{secrets.token_hex(6)}") == "OK 1"
    assert ask(bed, case.app, "src", f"UNSEAL canary {blob.hex()}").startswith("OK")
    assert ask(bed, case.app, "src", f"NOTE plain {ordinary.decode()}") == "OK"
    case.digest = ask(bed, case.app, "src", "DIGEST")
    needles = {"secret": secret, "secret-hex": secret.hex().encode(), "ordinary": ordinary}
    roots = [case.tmp, bed.root, Path("/dev/shm")]

    case.checkpoint()
    hits = scan_files(roots, needles)
    assert hits["secret"] == [] and hits["secret-hex"] == [], hits
    assert any("pages-" in path for path in hits["ordinary"]), hits["ordinary"]
    back = case.restore()
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()
    hits = scan_files(roots, needles)
    assert hits["secret"] == [] and hits["secret-hex"] == [], hits
    # (asked last: the answer puts the plaintext into the application, by design)
    assert ask(bed, case.app, "src", "GET canary") == "VALUE " + secret.hex()


# --- live: one flipped byte inside a pre-copy round ----------------------------------------------
def test_a_flipped_byte_in_a_precopy_round_leaves_the_writers_running(
    bed: Testbed, agent: AgentProcess
) -> None:
    """``--live`` with workers writing through their enclave; one bit of the enclave
    stream flipped at 8 MiB (inside round 0 of about 48 MiB).  The destination's
    stream refuses it; the move does not happen (exit 6); the application was never
    quiesced: its workers carry on without an error, and keep every write.  (Before,
    ``tool.enclave-stream`` never fired with ``--live``: the move went through, exit 0,
    and the fault counted as tested.)"""

    app = start_workers(bed, "--workers", "2", "--max-calls", "100000")
    try:
        flip = {"MIGSGX_FAULT": f"tool.enclave-stream:flip-byte={8 << 20}"}
        run = bed.migrate(app.pid, agent, args=["--live"], env=flip)
        assert "migsgx fault: tool.enclave-stream:flip-byte=" in run.stderr, run.stderr
        assert run.returncode == 6, run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        workers_carry_on(bed, app, "src", "the workers to carry on")
        assert all(not w["errors"] for w in workers(bed, app, "src"))
        workers_kept_every_write(bed, app, "src")
        finish(bed, app, expect="src")
    finally:
        _end_copies(bed, app)


# --- live: a party killed between two pre-copy rounds ---------------------------------------------
def _live_held(bed: Testbed, app: AppProcess, agent: AgentProcess, tmp: Path) -> Held:
    """``migrate --live`` of ``app``, held after its first pre-copy round (``wait-file``)."""

    go, log = tmp / "go-live", tmp / "live.err"
    argv = _argv("migrate", str(app.pid), "--to", agent.target, "--state", str(bed.state("src")),
                 "--json", "--live")  # fmt: skip
    env = {**os.environ, "MIGSGX_FAULT": f"tool.precopy-round:wait-file={go}"}
    with log.open("wb") as err:
        proc = subprocess.Popen(bed.host("src").command(argv), stdout=subprocess.DEVNULL,
                                stderr=err, stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    held = Held(proc, log, go)
    held.reached("tool.precopy-round")
    return held


def test_the_tool_killed_between_precopy_rounds_leaves_the_writers_running(
    bed: Testbed, agent: AgentProcess, tmp_path: Path
) -> None:
    """``--live``, workers writing; the tool ``kill -9`` after round 0 (nothing quiesced).
    The side channel closes, the enclave aborts on its own; the application never
    stopped: its workers carry on without an error, keep every write, and nothing
    runs on the destination."""

    app = start_workers(bed, "--workers", "2", "--max-calls", "100000")
    live: Held | None = None
    try:
        live = _live_held(bed, app, agent, tmp_path)
        live.proc.kill()
        assert live.proc.wait(30) == -signal.SIGKILL
        workers_carry_on(bed, app, "src", "the workers to carry on")
        assert all(not w["errors"] for w in workers(bed, app, "src"))
        wait_until(lambda: bed.copies(app)["dst"] == [], 20, "nothing on the destination")
        workers_kept_every_write(bed, app, "src")
        finish(bed, app, expect="src")
    finally:
        if live is not None:
            live.end()
        _end_copies(bed, app)


def test_the_source_enclave_killed_between_precopy_rounds_is_named(
    bed: Testbed, agent: AgentProcess, tmp_path: Path
) -> None:
    """``--live``; the source enclave ``kill -9`` after round 0: its state is gone, as in
    its crash.  The tool says so (exit 11, naming it), the application answers, and
    nothing runs on the destination."""

    app = start_workers(bed, "--workers", "2", "--max-calls", "100000")
    live: Held | None = None
    try:
        live = _live_held(bed, app, agent, tmp_path)
        state = json.loads(ask(bed, app, "src", "STATE").removeprefix("STATE "))
        [enclave] = state["enclave_pids"]
        os.kill(enclave, signal.SIGKILL)
        code = live.release()
        assert code == 11, live.text()
        assert "Traceback" not in live.text() and "[source-enclave-lost]" in live.text()
        assert ask(bed, app, "src", "PING") == "PONG"
        wait_until(lambda: bed.copies(app)["dst"] == [], 20, "nothing on the destination")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
    finally:
        if live is not None:
            live.end()
        _end_copies(bed, app)
