"""What the fault-matrix modules share: a loaded kvstore, the fault's time, the checks.

A cell migrates the kvstore example with one fault injected at a named step
(``MIGSGX_FAULT``), then checks: exactly one runnable copy, on the side the
outcome names, holding every acknowledged write; where the source stays, the
seconds from the fault to the source answering again (a figure, not an assert).
After every cell (:func:`no_images_left`, autouse where imported): no images
directory of a tool the cell ran is left in ``/dev/shm``, whichever party died.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from bed_helpers import ask, end_copies, kvstore, wait_until

from migsgx import _proc
from migsgx.agent.dumpdirs import scratch_base
from migsgx.lab.hosts import start_service
from migsgx.lab.storm_checks import heal
from migsgx.lab.testbed import AgentProcess, AppProcess, MigrateRun, Testbed
from migsgx.system.process import kill_tree, process_state

__all__ = [
    "EXIT_CRASH",
    "EXIT_IN_DOUBT",
    "EXIT_LOST_AFTER_COMMIT",
    "EXIT_MOVED_NOT",
    "EXIT_OK",
    "EXIT_SOURCE_ENCLAVE_LOST",
    "EXIT_SOURCE_GONE",
    "DestinationFault",
    "ask",
    "destination_fault",
    "enclave_lost",
    "fault_time",
    "guardians_of",
    "heal",
    "loaded_app",
    "migrate_with",
    "no_images_left",
    "only_copy",
    "record_back",
    "recover",
    "source_answers",
    "stayed",
    "stop_guardian_of",
]

EXIT_OK, EXIT_MOVED_NOT, EXIT_IN_DOUBT, EXIT_CRASH = 0, 6, 7, 70
EXIT_SOURCE_GONE, EXIT_LOST_AFTER_COMMIT, EXIT_SOURCE_ENCLAVE_LOST = 8, 10, 11
_FAULT_AT = re.compile(r"migsgx fault: (\S+) at ([0-9.]+)")


def loaded_app(bed: Testbed, *args: str) -> tuple[AppProcess, str]:
    """A kvstore (``args`` after its image) with acknowledged writes; their digest."""

    app = kvstore(bed, *args)
    for i in range(3):
        assert ask(bed, app, "src", f"PUT k{i} {f'v{i}'.encode().hex()}") == f"OK {i + 1}"
    return app, ask(bed, app, "src", "DIGEST")


@dataclass
class DestinationFault:
    """A cell whose fault is set in the destination agent (``doomed``), as it runs.

    ``t0``: when the application was loaded, for the cell's ``seconds``.
    """

    bed: Testbed
    doomed: AgentProcess
    app: AppProcess
    digest: str
    t0: float = field(default_factory=time.monotonic)
    restarted: AgentProcess | None = None
    platform_restarted: bool = False

    def seconds(self) -> float:
        """Seconds since the application was loaded (a figure of the cell)."""

        return round(time.monotonic() - self.t0, 3)

    def restart_agent(self) -> AgentProcess:
        """A fresh destination agent on the doomed one's port (it died of the fault)."""

        self.restarted = self.bed.start_agent(listen_port=self.doomed.port)
        return self.restarted

    def restart_platform(self) -> None:
        """A fresh platform service on the destination (the fault killed it)."""

        self.bed.services["dst"].stop()
        self.bed.services["dst"] = start_service(
            self.bed.state("dst"), prefix=self.bed.host("dst").command([])
        )
        self.platform_restarted = True

    def source_back_seconds(self) -> float:
        """Seconds from the fault (the doomed agent's mark) until the source answered again
        with every acknowledged write."""

        t_fault = fault_time(self.doomed.log.read_text(errors="replace"))
        return round(source_answers(self.bed, self.app, self.digest) - t_fault, 3)


@contextlib.contextmanager
def destination_fault(
    bed: Testbed,
    fault: str,
    *,
    restart_platform: bool = False,
    stop_guardian: bool = False,
) -> Iterator[DestinationFault]:
    """The prologue and epilogue of a cell with the destination agent's fault ``fault``.

    Before: an agent with ``MIGSGX_FAULT=fault`` and a loaded kvstore.  After,
    passed or failed: both agents stopped (the doomed one, and the one
    :meth:`~DestinationFault.restart_agent` started); the destination's platform
    service started afresh if ``restart_platform`` (the fault killed it) and the
    cell did not already; the tool's guardian stopped if ``stop_guardian`` (a cell
    that ends in doubt leaves it retrying); every copy of the application ended.
    """

    doomed = bed.start_agent(env={"MIGSGX_FAULT": fault})
    app, digest = loaded_app(bed)
    cell = DestinationFault(bed, doomed, app, digest)
    try:
        yield cell
    finally:
        for agent in (doomed, cell.restarted):
            if agent is not None:
                agent.stop()
        if restart_platform and not cell.platform_restarted:
            cell.restart_platform()
        if stop_guardian:
            stop_guardian_of(app.pid)
        end_copies(bed, app)


def fault_time(*texts: str, last: bool = False) -> float:
    """When the fault fired (``migsgx fault: ... at T``): the first, or the ``last``, mark."""

    for text in texts:
        found = _FAULT_AT.findall(text)
        if found:
            return float(found[-1 if last else 0][1])
    tails = "\n---\n".join(text[-3000:] for text in texts)
    raise AssertionError(f"the fault point was never reached; the tool said:\n{tails}")


def source_answers(bed: Testbed, app: AppProcess, digest: str, tool: str = "") -> float:
    """Poll the source until it answers with every acknowledged write; when it did.

    ``tool`` (the tool's stderr) goes into the failure, with what the source last said.
    """

    deadline = time.monotonic() + 60
    last = ""
    while True:
        try:
            last = ask(bed, app, "src", "DIGEST")
            if last == digest:
                return time.monotonic()
        except Exception as exc:  # not answering yet (stopped or its enclave not back)
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            log = app.log.read_text(errors="replace")[-2000:]
            raise AssertionError(
                f"the source never ran again; last answer {last!r}, process state "
                f"{process_state(app.pid)!r}\n--- tool ---\n{tool[-4000:]}\n--- app ---\n{log}"
            )
        time.sleep(0.02)


def enclave_lost(run: MigrateRun | subprocess.CompletedProcess[str], *indices: int) -> None:
    """The tool said that the source enclaves ``indices`` died before the decision:
    exit 11 (``source-enclave-lost``), each named with its measurement, no traceback."""

    assert run.returncode == EXIT_SOURCE_ENCLAVE_LOST, run.stderr
    assert "[source-enclave-lost]" in run.stderr and "Traceback" not in run.stderr, run.stderr
    for index in indices or (0,):
        assert f"enclave {index} (MRENCLAVE " in run.stderr, run.stderr
    assert "nothing can bring it back" in run.stderr, run.stderr


def only_copy(bed: Testbed, app: AppProcess, at: str, digest: str) -> None:
    """Exactly one runnable copy, on ``at``, with every acknowledged write; then stop it."""

    other = "dst" if at == "src" else "src"
    wait_until(lambda: bed.runnable_copies(app)[other] == 0, 20, f"no runnable copy on {other}")
    assert bed.runnable_copies(app) == {at: 1, other: 0}
    assert ask(bed, app, at, "DIGEST") == digest
    assert ask(bed, app, at, "PUT after " + b"x".hex()).startswith("OK")  # ECALLs work
    end_copies(bed, app)


def recover(bed: Testbed, fault: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``migsgx recover --json`` on the source host (``MIGSGX_FAULT=fault`` if given)."""

    argv = [sys.executable, "-m", "migsgx", "recover",
            "--state", str(bed.state("src")), "--json"]  # fmt: skip
    env = {**os.environ, "MIGSGX_FAULT": fault} if fault else None
    return subprocess.run(
        bed.host("src").command(argv), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip


def unstall(bed: Testbed, agent: AgentProcess) -> None:
    """Undo an ``agent.*:stall`` fault of the destination ``agent`` (its firewall rules)."""

    for chain, side in (("INPUT", "--dport"), ("OUTPUT", "--sport")):
        subprocess.run(
            bed.host("dst").command(
                ["iptables", "-D", chain, "-p", "tcp", side, str(agent.port), "-j", "DROP"]
            ),
            capture_output=True, timeout=10,
        )  # fmt: skip


def stayed(
    bed: Testbed,
    figures: dict[str, dict[str, object]],
    cell: str,
    run: MigrateRun,
    app: AppProcess,
    digest: str,
    *,
    expected: int = EXIT_MOVED_NOT,
    fault_log: str = "",
    last: bool = True,
) -> None:
    """The migration did not happen: the tool exits ``expected``, the source answers
    again with every acknowledged write, the destination lets go, one copy runs.

    The seconds from the fault (its mark in ``fault_log``, else in the tool's
    stderr: the ``last`` one, or the first) to the source answering go to
    ``figures`` (:func:`record_back`).
    """

    assert run.returncode == expected, run.stderr
    t_fault = fault_time(fault_log or run.stderr, last=last)
    record_back(figures, cell, run, source_answers(bed, app, digest, run.stderr) - t_fault)
    wait_until(lambda: bed.copies(app)["dst"] == [], 20, "the destination to let go")
    only_copy(bed, app, "src", digest)


def record_back(
    figures: dict[str, dict[str, object]], cell: str, run: MigrateRun, back: float
) -> None:
    """One run's seconds until the source answered again (min / median / max at the end)."""

    entry = figures.setdefault(cell, {"outcome": "stayed", "exit": run.returncode})
    runs = entry.setdefault("source_back_runs", [])
    assert isinstance(runs, list)
    runs.append(round(back, 3))


def migrate_with(
    bed: Testbed, app: AppProcess, agent: AgentProcess, fault: str, args: tuple[str, ...] = ()
) -> MigrateRun:
    """``migsgx migrate`` of ``app`` (then ``args``) with ``MIGSGX_FAULT=fault`` (its images
    in ``/dev/shm``, the tool's own directory, as by default)."""

    return bed.migrate(app.pid, agent, env={"MIGSGX_FAULT": fault}, args=args)


def images_left(pid: int) -> list[Path]:
    """The images directories of the tool with ``pid`` (its pid is in their names)."""

    return sorted(scratch_base().glob(f"migsgx-dump-{pid}-*"))


@pytest.fixture(autouse=True)
def no_images_left(bed: Testbed) -> Iterator[None]:
    """After the cell: no images directory of any tool it ran remains (killed or not).

    The guardian removes its dead tool's at once, ``migsgx recover`` those of
    every dead tool; a cell whose tool and guardian both died without a
    ``recover`` says so by failing here.
    """

    before = len(bed.tool_runs)
    yield
    pids = [run.pid for run in bed.tool_runs[before:] if run.pid]
    wait_until(
        lambda: not any(images_left(pid) for pid in pids), 30,
        f"images directories of the cell's tools {pids} removed: "
        f"{[str(p) for pid in pids for p in images_left(pid)]}",
    )  # fmt: skip


def stop_guardian_of(app_pid: int) -> None:
    """End the guardian a migration of ``app_pid`` left in doubt (this test's tool started it)."""

    for pid in guardians_of(app_pid):
        kill_tree(pid)


def guardians_of(app_pid: int) -> list[int]:
    """The live guardians of migrations of ``app_pid``."""

    found = []
    for pid in _proc.pids():
        argv = _proc.argv(pid)
        ours = b"migsgx.agent.guardian" in argv and str(app_pid).encode() in argv
        if ours and _proc.alive(pid):
            found.append(pid)
    return found
