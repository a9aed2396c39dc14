"""What a roll-back, its guardian and ``migsgx recover`` write must be true.

Real parts: CRIU, two namespaced hosts with their platform services and agents,
separate enclave processes, the ``kvstore`` application; faults through the
fault points, never sleeps.

* **An abort the roll-back could not confirm** (``tool.abort-enclave``): the
  roll-back's ``__mig_abort`` is lost on the enclave's connection (``drop``),
  and the enclave is also stopped (``drop-and-stop``).  The tool asks again; a
  return is an abort and the source runs again (exit 6).  No answer: the
  journal names the enclave (``unconfirmed``), the source stays stopped (exit
  7), and the guardian, or ``migsgx recover`` once the guardian is gone, gives
  it back only once the enclave aborted.  Before, the failure was logged, the
  journal said ``aborted`` and the tool handed the application a connection to
  an enclave still frozen in its migration (exit 6, its calls hung).
* **``recover`` beside a live guardian** (``guardian.aborted:wait-file``): the
  guardian saw every enclave abort and is held before it gives the source back;
  ``recover`` waits on its pidfd and says so, gives nothing back itself, and
  reports the guardian's hand-back.  Before, it gave the source back at once (a
  second SIGCONT and a second ABORT delivery beside the guardian's).
* **A gate that could not be opened** (the namespace it was closed in not
  reachable from where ``recover`` runs): it stays noted, ``recover`` says so
  (exit 7, ``closed_gates`` with the manual command), and the next ``recover``
  that reaches it opens it.  Before, the journal ended ``done`` and nothing ever
  tried again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from bed_helpers import end_copies, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    EXIT_OK,
    fault_time,
    loaded_app,
    migrate_with,
    no_images_left,  # noqa: F401
    only_copy,
    record_back,
    recover,
    source_answers,
    stayed,
    stop_guardian_of,
)

from migsgx.agent.journal import Journal
from migsgx.lab.testbed import AgentProcess, MigrateRun, Testbed
from migsgx.system.process import process_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 139

LOST = (
    "roll-back x the abort lost on the enclave's connection",
    "tool.before-commit:fail,tool.abort-enclave:drop",
)
STOPPED = (
    "roll-back x the abort lost, the enclave stopped",
    "tool.before-commit:fail,tool.abort-enclave:drop-and-stop",
)


def _new_journal(bed: Testbed, before: set[Path]) -> Path:
    (path,) = set((bed.state("src") / "agent" / "migrations").glob("*.json")) - before
    return path


def _journals(bed: Testbed) -> set[Path]:
    return set((bed.state("src") / "agent" / "migrations").glob("*.json"))


def test_an_abort_lost_on_its_connection_is_asked_again_before_the_source_runs(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]]
) -> None:
    app, digest = loaded_app(bed)
    try:
        run = migrate_with(bed, app, agent, LOST[1])
        assert "Traceback" not in run.stderr, run.stderr
        assert "abort failed" not in run.stderr and "not confirmed" not in run.stderr, run.stderr
        stayed(bed, figures, LOST[0], run, app, digest)
        figures[LOST[0]]["outcome"] = "stayed: asked again, the enclave aborted, then thawed"
    finally:
        end_copies(bed, app)


@pytest.mark.parametrize("finisher", ["guardian", "recover"])
def test_an_abort_not_confirmed_keeps_the_source_stopped_until_the_enclave_aborts(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], finisher: str
) -> None:
    app, digest = loaded_app(bed)
    before = _journals(bed)
    enclave = 0
    try:
        run = migrate_with(bed, app, agent, STOPPED[1])
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "did not confirm the abort" in run.stderr and "Traceback" not in run.stderr
        path = _new_journal(bed, before)
        journal = Journal.load(path)
        assert (journal.phase, journal.unconfirmed) == ("aborted", [0]), journal.data
        enclave = int(journal.holders[0][0])  # type: ignore[index]
        assert process_state(enclave) in ("T", "t")  # (the fault stopped it: frozen, silent)
        assert process_state(app.pid) in ("T", "t"), "the source thawed beside a frozen enclave"
        said = ""
        if finisher == "recover":
            stop_guardian_of(app.pid)
            held = recover(bed)
            assert held.returncode == EXIT_IN_DOUBT, held.stdout + held.stderr
            (result,) = [r for r in json.loads(held.stdout) if r["mid"] == journal.data["mid"]]
            assert result["outcome"] == "in-doubt" and "enclave 0" in result["detail"], result
            assert process_state(app.pid) in ("T", "t")
        t_fault = fault_time(run.stderr, last=True)
        os.kill(enclave, signal.SIGCONT)  # (it answers again: the abort asked goes through)
        if finisher == "recover":
            again = recover(bed)
            assert again.returncode == EXIT_OK, again.stdout + again.stderr
            said = again.stdout
        back = source_answers(bed, app, digest, run.stderr + said)
        wait_until(lambda: Journal.load(path).phase == "done", 40, "the journal done")
        assert Journal.load(path).unconfirmed == []
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the destination to let go")
        cell = f"{STOPPED[0]}; then SIGCONT, the {finisher} finishes"
        record_back(figures, cell, run, back - t_fault)
        figures[cell]["outcome"] = "stayed (exit 7 until the enclave aborted), every write"
        only_copy(bed, app, "src", digest)
    finally:
        if enclave:
            with contextlib.suppress(ProcessLookupError):
                os.kill(enclave, signal.SIGCONT)
        end_copies(bed, app)


def test_recover_beside_a_guardian_giving_the_source_back_waits_for_it(
    bed: Testbed,
    agent: AgentProcess,
    figures: dict[str, dict[str, object]],
    tmp_path: Path,
) -> None:
    app, digest = loaded_app(bed)
    before = _journals(bed)
    go = tmp_path / "go"
    fault = f"tool.before-commit:kill,guardian.aborted:wait-file={go}"
    runs: list[MigrateRun] = []
    # (the tool's stderr stays open in its guardian, held at the fault: it runs aside)
    tool = threading.Thread(target=lambda: runs.append(migrate_with(bed, app, agent, fault)))
    tool.start()
    try:
        wait_until(lambda: _journals(bed) - before, 60, "the migration's journal")
        path = _new_journal(bed, before)
        wait_until(lambda: Journal.load(path).phase == "aborted", 60, "the guardian's aborts")
        argv = [sys.executable, "-m", "migsgx", "recover", "--state", str(bed.state("src")),
                "--json"]  # fmt: skip
        proc = subprocess.Popen(
            bed.host("src").command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        lines: list[str] = []
        assert proc.stderr is not None
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
        reader.start()
        try:
            wait_until(lambda: any("waiting for its guardian" in line for line in lines)
                       or proc.poll() is not None, 60, "recover to say it waits")  # fmt: skip
            assert proc.poll() is None, "".join(lines)  # (it waits; before: it gave back)
            assert process_state(app.pid) in ("T", "t")  # (nothing given back by recover)
        finally:
            go.write_text("go")
        out, _ = proc.communicate(timeout=120)
        reader.join(10)
        tool.join(120)
        (run,) = runs
        assert run.returncode == -9, run.stderr
        assert proc.returncode == EXIT_OK, out + "".join(lines)
        (result,) = [r for r in json.loads(out) if r["mid"] == Journal.load(path).data["mid"]]
        assert result["outcome"] == "stayed" and "the guardian (pid" in result["detail"], result
        source_answers(bed, app, digest, run.stderr)
        wait_until(lambda: bed.copies(app)["dst"] == [], 30, "the destination to let go")
        figures["guardian gives the source back, held x migsgx recover"] = {
            "outcome": "stayed: recover waited for the guardian, gave nothing back itself",
            "exit": run.returncode, "recover": proc.returncode,
        }  # fmt: skip
        only_copy(bed, app, "src", digest)
    finally:
        go.write_text("go")
        tool.join(180)
        end_copies(bed, app)


# --- a gate that stays closed -----------------------------------------------------------------
PORT = 7013
#: The tree: a listener in a network namespace of its own (``unshare --net``), with a
#: keeper in the same namespace that outlives it (its pid printed first).
_TREE = textwrap.dedent(
    f"""
    import socket, subprocess, sys
    keeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    print(keeper.pid, flush=True)
    s = socket.socket(); s.bind(("0.0.0.0", {PORT})); s.listen(8)
    print("ready", flush=True)
    sys.stdin.readline()
    """
)
#: The tool's part: the tree's gate closed and noted.
_GATED = textwrap.dedent(
    """
    import sys
    from migsgx.containers.gate import ListenerGate
    gate = ListenerGate.of_tree(int(sys.argv[1]))
    gate.close()
    print(gate.note(), flush=True)
    """
)


def _gated(pid: int) -> bool:
    rule = ["-p", "tcp", "--syn", "--dport", str(PORT), "-j", "DROP"]
    check = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "iptables", "-w", "-C",
                            "INPUT", *rule], capture_output=True, check=False)  # fmt: skip
    return check.returncode == 0


def _recover(state: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "migsgx", "recover", "--state", str(state), "--json"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_a_gate_recover_cannot_reach_stays_noted_and_the_next_recover_opens_it(
    require_root: None, tmp_path: Path
) -> None:
    """The tree's root (the noted ``/proc/PID``) ended; its namespace lives on in a
    keeper no path of the note's reaches, so ``recover`` cannot open the gate.  Once
    the namespace is named (``ip netns attach``), the next ``recover`` reaches it."""

    tree = subprocess.Popen(["unshare", "--net", sys.executable, "-c", _TREE],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    keeper, name = 0, f"migsgx-truth-{os.getpid()}"
    try:
        assert tree.stdout is not None and tree.stdin is not None
        keeper = int(tree.stdout.readline())
        assert tree.stdout.readline().strip() == "ready"
        gated = [sys.executable, "-c", _GATED, str(tree.pid)]
        note = subprocess.run(gated, capture_output=True, text=True, check=True).stdout.strip()
        assert note.startswith(f"ungate /proc/{tree.pid}/ns/net ") and _gated(keeper), note
        tree.stdin.write("\n")
        tree.stdin.flush()
        tree.wait(10)  # (the root ends; the keeper holds its namespace and the rule)
        (tmp_path / "agent").mkdir()
        journal = Journal.start(tmp_path / "agent", os.urandom(16), ("10.0.0.2", 7070), 1, "-")
        journal.update(tool_pid=2**22 + 1, phase="aborted", undo=[note])
        blind = _recover(tmp_path)
        assert blind.returncode == EXIT_IN_DOUBT, blind.stdout + blind.stderr
        assert "Traceback" not in blind.stderr
        (result,) = json.loads(blind.stdout)
        (closed,) = result["closed_gates"]
        assert closed["ports"] == [PORT] and "nsenter --net=" in closed["message"], closed
        assert f"--dport {PORT} -j DROP" in closed["message"]
        assert _gated(keeper)
        assert Journal.load(journal.path).phase == "done"
        assert Journal.load(journal.path).closed_gates == [note]
        subprocess.run(["ip", "netns", "attach", name, str(keeper)], check=True)
        seeing = _recover(tmp_path)
        assert seeing.returncode == EXIT_OK, seeing.stdout + seeing.stderr
        assert json.loads(seeing.stdout)[0]["closed_gates"] == []
        assert not _gated(keeper), "the gate stayed closed"
        assert Journal.load(journal.path).closed_gates == []
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        tree.kill()
        tree.wait()
        if keeper:
            with contextlib.suppress(ProcessLookupError):
                os.kill(keeper, signal.SIGKILL)
