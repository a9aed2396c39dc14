"""A storm: one application migrated back and forth, each move under a random fault.

The named cells of the fault matrix (``tests/integration/test_commit_faults.py``)
each check one fault at one step.  A storm checks what an attacker would try
next: any party killed at any named point, any connection broken there, in
any order, migration after migration on the same hosts, with the leftovers of
each fault still around for the next.  Per migration (:meth:`Storm.one`):

1. a client writes to the kvstore example on the source, before and while the
   tool runs, and keeps every write it saw acknowledged;
2. ``migsgx migrate`` runs with the drawn fault (:mod:`.storm_faults`);
3. what a host's supervisor would do: a killed platform service or agent is
   started again (the agent on its port), a stalled firewall healed;
4. at most one ``migsgx recover`` on each host;
5. the checks (:class:`Verdict`): exactly one runnable copy (app processes and
   enclave processes counted on both hosts), every acknowledged write in it,
   the source answering again within the bound when it did not move
   (:func:`judge_back`), every point of the fault fired (one that did not
   tested nothing: a failure, never a pass), an exit
   status that tells the truth (``migsgx --help``: 0, 6, 7, 8, 10, 11; -9 only for
   a killed tool), no traceback, nothing left (images directories, images mounts,
   stopped copies, guardians, enclaves, unfinished journals).

The driver is ``benchmarks/storm.py``; a short storm runs in ``make test``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from .. import _proc
from .._trace import TRACE_ENV
from ..criu import KEEP_LOGS_ENV
from ..system.process import process_state
from .containers import ContainerLab
from .storm_apps import ContainerTarget, ProcessTarget, Target
from .storm_checks import Client, Verdict, heal, kernel_kills, leftovers, restart_dead
from .storm_faults import Fault, draw, fired
from .storm_outcome import Outcome, as_json, judge_back, summary
from .storm_timeline import Probe, back_after, fault_time, marks, noticed, timeline
from .testbed import AgentProcess, MigrateRun, Testbed

__all__ = ["Outcome", "Storm", "as_json", "judge_back", "summary"]

#: A migration's exit statuses the documentation names (``migsgx --help``).
DOCUMENTED: Final = {0: "moved", 6: "stayed", 7: "in doubt", 8: "source gone", 10: "lost",
                     11: "source enclave lost"}  # fmt: skip
#: How long the hosts may take to settle after the tool and ``recover`` (guardians,
#: releases, CRIU ending a source): a bound, then a failure that names what is left.
SETTLE_SECONDS: Final = 60.0
#: A tool still running after this long hangs: it is killed, and the migration fails.
TOOL_SECONDS: Final = 300.0
#: The probe's connection: seconds to connect (then again, while none is made).
PING_CONNECT: Final = 1.0
#: Seconds a source that stayed may take to answer the probe once the hosts settled.
PING_ANSWER: Final = 2.0


class Storm:
    """Migrations of one kvstore between the two hosts of ``bed``, each under a drawn fault.

    ``bound``: seconds from the fault to the source answering again, where it
    did not move (the goal of ``docs/migration.md``); past it, the migration fails.
    """

    def __init__(
        self,
        bed: Testbed,
        seed: int,
        *,
        bound: float = 5.0,
        lab: ContainerLab | None = None,
        engine: str = "runc",
        keep_failed: Path | None = None,
        options: list[str] | None = None,
    ) -> None:
        """``lab``: the kvstore runs in a container of ``engine`` (runc, podman,
        containerd); without it, as a plain process.  ``options``: more options of
        ``migsgx migrate`` for every migration (``--live``, ``--mode sequential``...)."""

        self.bed, self.lab, self.engine = bed, lab, engine
        self.options = list(options or [])
        #: Where a failed migration's logs go (:meth:`_keep`); CRIU's and runc's logs of
        #: failed steps gather in its ``pending`` until the migration is judged.
        self.keep_failed = keep_failed
        if keep_failed is not None:
            os.environ[KEEP_LOGS_ENV] = str(keep_failed / "pending")
        self.rng = random.Random(seed)
        self.bound = bound
        self.writes: dict[str, str] = {}  # every acknowledged write of the current app
        self.unsure: set[str] = set()  # writes sent that nobody answered: there or not
        self.agents: dict[str, AgentProcess] = {h: bed.start_agent(h) for h in bed.names}
        self.target = self._fresh_target()
        self.at = "src"
        self.counter = 0
        self._source_pid = 0
        #: Enclave processes a failed migration left, already reported.
        self.leaked: set[int] = set()

    # --- the application ------------------------------------------------------------------------
    def _fresh_target(self) -> Target:
        """A new kvstore on host ``src``: a process, or a container with ``lab``."""

        self.writes, self.unsure = {}, set()
        if self.lab is None:
            return ProcessTarget(self.bed)
        return ContainerTarget(self.lab, self.engine)

    def _other(self, host: str) -> str:
        return self.bed.names[1 - self.bed.names.index(host)]

    def ask(self, line: str, at: str, timeout: float = 5.0) -> str | None:
        """One request to the app on ``at`` from the other host: its answer, ``""`` when
        it was sent and nothing answered, ``None`` when it could not be sent."""

        try:
            conn = self.bed.host(self._other(at)).connect(
                self.bed.host(at).address, self.target.port, timeout=timeout
            )
        except OSError:
            return None
        with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
            try:
                stream.write(line + "\n")
                stream.flush()
                return stream.readline().strip()
            except OSError:  # (a timeout too)
                return ""

    def put(self, at: str, timeout: float = 5.0) -> bool | None:
        """One write: acknowledged (kept in :attr:`writes`), ``False`` when it was not
        sent or refused, ``None`` when it was sent and nothing answered (in doubt)."""

        self.counter += 1
        key, value = f"s{self.counter}", f"{self.counter:08x}"
        answer = self.ask(f"PUT {key} {value.encode().hex()}", at, timeout)
        if answer and answer.startswith("OK"):
            self.writes[key] = value
            return True
        if answer == "":
            self.unsure.add(key)
            return None
        return False

    def expected_digest(self) -> str:
        """The kvstore enclave's digest of exactly the acknowledged writes."""

        h = hashlib.sha256()
        for key in sorted(self.writes):
            h.update(key.encode() + b"\0" + self.writes[key].encode() + b"\0")
        return "DIGEST " + h.hexdigest()

    # --- one migration --------------------------------------------------------------------------
    def one(self, index: int, fault: Fault | None = None) -> Outcome:
        seed = self.rng.randrange(1 << 32)
        fault = fault if fault is not None else draw(random.Random(seed), options=self.options)
        frm, to = self.at, self._other(self.at)
        for _ in range(3):
            if self.put(frm) is not True:
                raise RuntimeError(f"the app on {frm} does not answer before migration {index}")
        self._keep(None)
        agent = self.agents[to]
        if fault.agent:
            agent = self.bed.start_agent(to, env={"MIGSGX_FAULT": fault.agent})
        self._reap()
        pid = self._source_pid = self.target.root_pid(frm)
        argument, args = self.target.migrate_args(pid)
        args = [*args, *self.options]
        port = self.target.port
        probe = Probe(lambda: self.bed.host(to).connect(self.bed.host(frm).address, port,
                                                        timeout=PING_CONNECT))  # fmt: skip
        probe.start()
        client = Client(self, frm)
        client.start()
        t0 = time.monotonic()
        hung = False
        try:
            run = self.bed.migrate(argument, agent, name=frm, args=args, timeout=TOOL_SECONDS,
                                   env={"MIGSGX_FAULT": fault.tool, TRACE_ENV: "1"})  # fmt: skip
        except subprocess.TimeoutExpired as exc:  # (killed by ``migrate``: its guardian acts)
            hung = True
            text = [b.decode(errors="replace") if isinstance(b, bytes) else b or ""
                    for b in (exc.stdout, exc.stderr)]  # fmt: skip
            run = MigrateRun(-9, None, text[0], text[1], TOOL_SECONDS)
        t_end = time.monotonic()
        client.finish()
        out = Outcome(index, seed, fault.spec, fault.kind, frm, run.returncode,
                      seconds=t_end - t0)  # fmt: skip
        if hung:
            out.failures.append(f"the tool did not end within {TOOL_SECONDS:.0f} s (killed)")
        elif run.returncode == -9 and not fault.kills_tool:
            # Nothing of the storm's sent it: what the tool did last, and the kernel's word.
            steps = [m for m in marks(run.stderr) if m[0] == "step"]
            last = f"{steps[-1][1]} at {steps[-1][2] - t0:.3f} s" if steps else "none"
            out.failures.append(f"the tool died by a SIGKILL no fault sent, {t_end - t0:.3f} s "
                                f"in; its last step {last}; kernel: {kernel_kills()}")  # fmt: skip
        logs = run.stderr + (agent.log.read_text(errors="replace") if fault.agent else "")
        if run.returncode != 0:
            lines = [ln for ln in run.stderr.splitlines() if ln.startswith("migsgx: ")]
            out.reason = (lines[-1] if lines else run.stderr.strip()[-300:])[:300]
        restarted = restart_dead(self.bed, [*self.agents.values(), agent], self.agents)
        for host in self.bed.names:
            heal(self.bed, host)
        at = fault_time(logs)
        # (11: the source runs too, without the dead enclave's state: back as with 6)
        if run.returncode in (6, 11) and at is not None:
            out.back_polled_seconds = self._back_seconds(frm, at)
        if run.returncode not in (0, 6, 11):
            out.recover_at = time.monotonic()
            out.recover = {h: self._recover(h, out) for h in self.bed.names}
        # (read once ``recover`` ran: the destination's point of a decision it delivers
        # fires then)
        after = agent.log.read_text(errors="replace") if fault.agent else ""
        out.points = fired(fault.points, [run.stderr, after, *self._guardian_logs(frm)], t0)
        out.reached = bool(out.points) and all(out.points.values())
        out.failures += [f"the fault at {point} did not fire: nothing was tested"
                         for point, done in out.points.items() if not done]  # fmt: skip
        out.acked = len(self.writes)
        self._settle(out, fault, frm, to, run, probe)
        if at is not None:
            self._timeline(out, at, run.stderr, probe, client.acked_at, t_end)
        judge_back(out, self.bound, at)
        if out.failures:
            self._keep(out, run)
        main = [id(a) for a in self.agents.values()]
        for extra in [agent, *restarted]:
            if id(extra) not in main:
                extra.stop()
        return out

    def _timeline(self, out: Outcome, at: float, stderr: str, probe: Probe,
                  acked: list[float], t_end: float) -> None:  # fmt: skip
        """The steps from the fault (at ``at``) on, who noticed it, and when the source
        answered again (where it stayed)."""

        stayed = out.outcome == "stayed"
        answer = back_after(probe.answers, at, probe.ended) if stayed else None
        write = back_after(acked, at, t_end) if stayed else None
        out.back_seconds = None if answer is None else answer - at
        out.write_back_seconds = None if write is None else write - at
        out.noticed = noticed(out.reason, out.exit) if out.exit != 0 else ""
        out.timeline = timeline(stderr, at, {"tool-end": t_end, "answer": answer, "write": write})

    def _guardian_logs(self, host: str) -> list[str]:
        """What the guardians on ``host`` reported into their files (:mod:`.guardian_log`):
        a fault point of the guardian marks there once it waits."""

        texts = []
        for path in (self.bed.state(host) / "agent" / "migrations").glob("*.log"):
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace"))
        return texts

    def _keep(self, out: Outcome | None, run: MigrateRun | None = None) -> None:
        """With ``keep_failed``: a failed migration's CRIU and runc logs (gathered since it
        began), the tool's output and the agents' logs, into ``INDEX-SEED/``; ``None``:
        forget the logs of the migration before (it did not fail)."""

        if self.keep_failed is None:
            return
        pending = self.keep_failed / "pending"
        if out is None or run is None:
            shutil.rmtree(pending, ignore_errors=True)
            return
        where = self.keep_failed / f"{out.index:03d}-{out.seed}"
        where.mkdir(parents=True, exist_ok=True)
        if pending.is_dir():
            for log in pending.iterdir():
                shutil.move(log, where / log.name)
        (where / "outcome.json").write_text(as_json(out) + "\n")
        (where / "tool.stderr").write_text(run.stderr)
        (where / "tool.stdout").write_text(run.stdout)
        for log in [*self.bed.root.glob("agent-*.log"), *self.bed.root.glob("app-*.log")]:
            with contextlib.suppress(OSError):
                shutil.copyfile(log, where / log.name)

    def _reap(self) -> None:
        """Reap the zombies this process (the subreaper) inherited: restored trees killed,
        orphaned CRIUs; not the processes started here, whose ends are awaited."""

        ours = {a.proc.pid for a in [*self.bed.agents]}
        ours |= {s.process.pid for s in self.bed.services.values()}
        ours |= {a.launcher.pid for a in self.bed.apps}
        for pid in _proc.children(os.getpid()):
            if pid not in ours and process_state(pid) == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def _back_seconds(self, frm: str, at: float) -> float | None:
        """The former measure: from the fault (at ``at``) to a ``PING`` answered once
        the tool ended and the storm restarted what the fault killed."""

        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            if self.ask("PING", frm, timeout=2.0) == "PONG":
                return time.monotonic() - at
            time.sleep(0.02)
        return None

    def _recover(self, host: str, out: Outcome) -> int:
        argv = [sys.executable, "-m", "migsgx", "recover", "--state", str(self.bed.state(host)),
                "--json"]  # fmt: skip
        done = subprocess.run(
            self.bed.host(host).command(argv), capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL, env={**os.environ, "MIGSGX_FAULT": ""},
        )  # fmt: skip
        if "Traceback" in done.stderr:
            out.failures.append(f"recover on {host}: traceback: {done.stderr[-800:]}")
        if done.returncode not in (0, 7, 10):
            out.failures.append(f"recover on {host}: exit {done.returncode}: {done.stderr[-400:]}")
        return done.returncode

    def _settle(
        self, out: Outcome, fault: Fault, frm: str, to: str, run: MigrateRun, probe: Probe
    ) -> None:
        """Wait for one copy (or none, where allowed), judge it, and move on from there.

        ``probe`` (of the source) ends once the hosts settled: a source that stayed
        answers it by then."""

        verdict = Verdict(self, fault, frm, to, run)
        deadline = time.monotonic() + SETTLE_SECONDS
        while not (settled := verdict.settled()) and time.monotonic() < deadline:
            time.sleep(0.1)
        out.outcome = verdict.outcome()
        if out.outcome == "stayed":
            probe.wait_answer(PING_ANSWER)  # (a source given back just now: its answer)
        probe.finish()
        out.failures += verdict.failures(out.outcome)
        if not out.reached and out.outcome != "moved":
            # No fault happened (none drawn, or its point never came): it had to move.
            out.failures.append(f"{out.outcome} without a fault: {out.reason}")
        if not settled:
            out.failures.append(f"not settled after {SETTLE_SECONDS:.0f} s: {verdict.states()}")
        copies = 1 if out.outcome in ("moved", "stayed") else 0
        out.failures += leftovers(self, run, frm, self._source_pid, copies)
        if out.outcome in ("moved", "stayed") and not out.failures:
            self.at = to if out.outcome == "moved" else frm
            self.target.moved(self.at)
            out.failures += self.target.stray()
            if not out.failures:
                return
        # Lost (allowed or not), or a failure: end whatever runs, begin again with a new app.
        self.target.remove()
        self.target = self._fresh_target()
        self.at = "src"
