"""A checkpoint storm: the kvstore checkpointed and restored again and again, under faults.

The checkpoint rows of the fault matrix (``tests/integration/test_checkpoint_faults.py``)
each check one fault at one step.  Here each round draws one (:func:`draw`) from
a seed: a party killed at a named point of ``migsgx checkpoint`` (the tool, its
guardian with it, the application, its enclave, the platform service) or of
``migsgx restore`` (the tool, the restored application, the platform service),
or none; the leftovers of one round meet the next.  Per round (:meth:`CheckpointStorm.one`):

1. a client writes to the app before and while ``migsgx checkpoint`` runs;
2. a killed platform service is started again; where the tool did not end
   with 0, one ``migsgx recover --checkpoint``;
3. where the source ended, ``migsgx restore`` (with the drawn restore fault);
   where that failed, one ``recover --checkpoint`` and one more restore;
4. a restored copy: a second restore must be refused (consumed once);
5. the checks: exactly one runnable copy (or none where the killed party held
   the only state), every acknowledged write in it, it launches an enclave,
   no traceback, one enclave process per copy, no guardian left.

Plain processes only (``migsgx checkpoint`` takes a pid).  The driver is
``benchmarks/storm.py --checkpoints``.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .containers import ContainerLab
from .storm import SETTLE_SECONDS, TOOL_SECONDS, Outcome, Storm
from .storm_checks import Client, Verdict, enclave_pids, guardians, restart_dead
from .storm_faults import Fault, fired
from .storm_timeline import fault_time
from .testbed import MigrateRun, Testbed

__all__ = ["CKPT_ACTIONS", "CKPT_POINTS", "RESTORE_ACTIONS", "RESTORE_POINTS", "CheckpointStorm",
           "CkptFault", "draw"]  # fmt: skip

#: ``migsgx checkpoint``'s points, in the order it reaches them (``ckpt.rolled-back``
#: comes only after a failure; the storm draws one fault per round).
CKPT_POINTS: Final = ("ckpt.before-dump", "ckpt.before-commit", "ckpt.after-commit")
#: ``exit``: the tool ends at once; ``kill-guardian``: its guardian, then the tool;
#: ``kill-source``: the application; ``kill-enclave``: its enclave; ``kill-platform``:
#: the host's platform service.
CKPT_ACTIONS: Final = ("exit", "kill-guardian", "kill-source", "kill-enclave", "kill-platform")
RESTORE_POINTS: Final = ("restore.before-criu", "restore.held", "restore.loaded",
                         "restore.activated")  # fmt: skip
#: ``kill-source`` at a restore point: the restored application.
RESTORE_ACTIONS: Final = ("exit", "kill-source", "kill-platform")
_CKPT_COMMITTED: Final = CKPT_POINTS.index("ckpt.after-commit")


@dataclass(frozen=True)
class CkptFault:
    """One round's fault: ``MIGSGX_FAULT`` of the checkpoint or of the restore."""

    ckpt: str = ""
    restore: str = ""

    @property
    def spec(self) -> str:
        return self.ckpt or self.restore or "none"

    @property
    def points(self) -> list[str]:
        """The point this fault names (none for a round without one)."""

        spec = self.ckpt or self.restore
        return [spec.partition(":")[0]] if spec else []

    @property
    def kind(self) -> str:
        spec = self.ckpt or self.restore
        if not spec:
            return "none"
        step = "checkpoint" if self.ckpt else "restore"
        return f"{step} {spec.partition(':')[2]}"

    @property
    def may_lose(self) -> str:
        """Why no copy may be left (the party killed held the only state), or ``""``."""

        point, _, action = self.ckpt.partition(":")
        if self.ckpt == "ckpt.before-dump:kill-source":  # (in post-dump the images are whole)
            return "gone"
        if action == "kill-enclave" and CKPT_POINTS.index(point) < _CKPT_COMMITTED:
            return "the source enclave held the only copy"
        if self.restore == "restore.activated:kill-source":
            return "the restored enclave (activated) held the only copy"
        return ""


def parse(spec: str) -> CkptFault:
    """The fault ``spec`` names (:attr:`CkptFault.spec`)."""

    if spec == "none":
        return CkptFault()
    point, _, action = spec.partition(":")
    if point in CKPT_POINTS and action in CKPT_ACTIONS:
        return CkptFault(ckpt=spec)
    if point in RESTORE_POINTS and action in RESTORE_ACTIONS:
        return CkptFault(restore=spec)
    raise ValueError(f"unknown checkpoint storm fault {spec!r}")


def draw(rng: random.Random, *, none_share: float = 0.15) -> CkptFault:
    """None (``none_share``), or one at a point of the checkpoint or of the restore."""

    roll = rng.random()
    if roll < none_share:
        return CkptFault()
    if roll < none_share + (1 - none_share) * 0.6:
        return CkptFault(ckpt=f"{rng.choice(CKPT_POINTS)}:{rng.choice(CKPT_ACTIONS)}")
    return CkptFault(restore=f"{rng.choice(RESTORE_POINTS)}:{rng.choice(RESTORE_ACTIONS)}")


class CheckpointStorm(Storm):
    """Rounds of checkpoint and restore of one kvstore process on host ``src``."""

    def __init__(
        self,
        bed: Testbed,
        seed: int,
        *,
        bound: float = 5.0,
        lab: ContainerLab | None = None,
        engine: str = "pid",
        keep_failed: Path | None = None,
        options: list[str] | None = None,
    ) -> None:
        # Enclaves of whatever ran on these hosts before are not this storm's to count.
        before = {p for pids in enclave_pids(bed).values() for p in pids}
        super().__init__(bed, seed, bound=bound, lab=lab, engine=engine,
                         keep_failed=keep_failed, options=options)  # fmt: skip
        self.leaked |= before

    def one(self, index: int, fault: object = None) -> Outcome:
        seed = self.rng.randrange(1 << 32)
        self.hung: list[str] = []
        drawn = fault if isinstance(fault, CkptFault) else draw(random.Random(seed))
        for _ in range(3):
            if self.put("src") is not True:
                raise RuntimeError(f"the app does not answer before round {index}")
        self._keep(None)
        self._reap()
        pid = self._source_pid = self.target.root_pid("src")
        ck = self.bed.root / f"ck-{index:03d}"
        client = Client(self, "src")
        client.start()
        t0 = time.monotonic()
        run = self._cli(["checkpoint", str(pid), "--dir", str(ck)], drawn.ckpt)
        client.finish()
        out = Outcome(index, seed, drawn.spec, drawn.kind, "src", run.returncode)
        logs = [run]
        restart_dead(self.bed, [], {})
        # A tool that ended by itself rolled back or finished; a killed one (70) may
        # have left the source fenced for ``recover`` (its guardian killed with it).
        if run.returncode == 70:
            out.recover["checkpoint"] = self._recover_ckpt(ck, out)
        self._settled_source(pid)
        at = fault_time(run.stderr)
        if drawn.ckpt and self.target.copies()["src"] and at is not None:
            # Rolled back: seconds to answer again (polled once the tool ended).
            out.back_seconds = self._back_seconds("src", at)
        if run.returncode not in (0, 70):
            out.recover["checkpoint"] = self._recover_ckpt(ck, out)
        if not self.target.copies()["src"]:  # the source ended: the checkpoint is the copy
            restore = self._cli(self._restore_argv(ck), drawn.restore)
            logs.append(restore)
            restart_dead(self.bed, [], {})
            out.exit = restore.returncode
            if restore.returncode != 0:
                out.recover["restore"] = self._recover_ckpt(ck, out)
                if not self._any_runnable():
                    again = self._cli(self._restore_argv(ck), "")
                    logs.append(again)
                    out.exit = again.returncode
            out.outcome = "restored"
        out.seconds = time.monotonic() - t0
        out.acked = len(self.writes)
        out.points = fired(drawn.points, [r.stderr for r in logs], t0)
        out.reached = bool(out.points) and all(out.points.values())
        out.failures += [f"the fault at {point} did not fire: nothing was tested"
                         for point, done in out.points.items() if not done]  # fmt: skip
        bad = [r for r in logs if r.returncode not in (0, 70)]
        if bad:
            out.reason = bad[-1].stderr.strip()[-300:]
        out.failures += self.hung
        self._judge(out, drawn, ck, logs)
        shutil.rmtree(ck, ignore_errors=True)
        return out

    # --- steps --------------------------------------------------------------------------------
    def _cli(self, args: list[str], fault: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MIGSGX_FAULT": fault,
               "MIGSGX_PLATFORM_SOCKET": str(self.bed.services["src"].socket)}  # fmt: skip
        argv = [sys.executable, "-m", "migsgx", *args]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_SECONDS,
                                  stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        except subprocess.TimeoutExpired as exc:  # (killed by ``run``)
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            self.hung.append(f"migsgx {args[0]} did not end within {TOOL_SECONDS:.0f} s")
            return subprocess.CompletedProcess(argv, -9, "", stderr)

    def _restore_argv(self, ck: Path) -> list[str]:
        return ["restore", "--dir", str(ck), "--netns", self.bed.host("src").netns,
                "--platform-socket", str(self.bed.services["src"].socket)]  # fmt: skip

    def _recover_ckpt(self, ck: Path, out: Outcome) -> int:
        done = self._cli(["recover", "--checkpoint", str(ck), "--json", "--platform-socket",
                          str(self.bed.services["src"].socket)], "")  # fmt: skip
        if "Traceback" in done.stderr:
            out.failures.append(f"recover --checkpoint: traceback: {done.stderr[-800:]}")
        if done.returncode not in (0, 7):
            out.failures.append(f"recover --checkpoint: exit {done.returncode}: "
                                f"{done.stderr[-400:]}")  # fmt: skip
        return done.returncode

    def _any_runnable(self) -> bool:
        return sum(self.target.runnable().values()) > 0

    def _settled_source(self, pid: int) -> None:
        """Wait until the source runs (the checkpoint rolled back) or is gone (it is the
        checkpoint), not stopped half-way (a fence, CRIU, a guardian still working)."""

        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            states = [s for p, s in self.target.copies()["src"] if p == pid]
            if not states or states[0] not in ("T", "t", "D"):
                return
            time.sleep(0.1)

    # --- the checks ---------------------------------------------------------------------------
    def _judge(self, out: Outcome, fault: CkptFault, ck: Path,
               logs: list[subprocess.CompletedProcess[str]]) -> None:  # fmt: skip
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            runnable = self.target.runnable()
            present = sum(1 for _, s in self.target.copies()["src"] if s not in ("Z", "X", ""))
            if present == sum(runnable.values()) and present <= 1:
                break
            time.sleep(0.1)
        running = sum(self.target.runnable().values())
        if running > 1:
            out.outcome = "twice"
            out.failures.append(f"two runnable copies: {self.target.copies()}")
        elif running == 0:
            out.outcome = fault.may_lose and ("gone" if fault.may_lose == "gone" else "lost")
            if not fault.may_lose:
                out.outcome = "lost"
                out.failures.append(f"no copy left: {self.target.copies()}")
        else:
            answer = self.ask("DIGEST", "src") or ""
            if not answer.startswith("DIGEST"):
                out.outcome = "lost"  # the process runs without its enclave
                if not fault.may_lose:
                    out.failures.append(f"the copy runs without its enclave: {answer[:100]}")
            else:
                out.outcome = out.outcome or "stayed"
                out.failures += self._checks(out)
        if not out.reached and out.outcome not in ("restored",):
            out.failures.append(f"{out.outcome} without a fault: {out.reason}")
        code = logs[0].returncode  # (the checkpoint's: 6 says the source runs as before)
        if (code == 6 and out.outcome == "lost") or (code == 11 and out.outcome != "lost"):
            out.failures.append(f"checkpoint exit {code} does not tell the truth: {out.outcome}")
        for r in logs:
            if "Traceback" in r.stderr:
                out.failures.append("a tool printed a traceback: " + r.stderr[-800:])
        if out.outcome == "restored" and not out.failures:
            again = self._cli(self._restore_argv(ck), "")  # consumed: refused, changes nothing
            if again.returncode == 0 or "Traceback" in again.stderr:
                out.failures.append(f"a second restore: exit {again.returncode}: "
                                    f"{again.stderr[-400:]}")  # fmt: skip
            if sum(self.target.runnable().values()) != 1:
                out.failures.append(f"after a second restore: {self.target.copies()}")
        copies = 1 if out.outcome in ("stayed", "restored") else 0
        out.failures += self._leftovers(copies)
        if out.failures:
            self._keep(out, _as_run(logs))
        if copies and not out.failures:
            self.target.moved("src")
            return
        self.target.remove()
        self.target = self._fresh_target()

    def _checks(self, out: Outcome) -> list[str]:
        """Every acknowledged write is in the copy, which launches enclaves (as a storm's)."""

        verdict = Verdict(self, Fault(), "src", "src", _as_run([]))
        return verdict.writes_in("src") + verdict.launches_on("src")

    def _leftovers(self, copies: int) -> list[str]:
        """One enclave process per copy and no guardian, within a bound."""

        def left() -> list[str]:
            found = [f"guardian {g}" for g in guardians(self._source_pid)]
            enclaves = {h: sorted(set(p) - self.leaked) for h, p in enclave_pids(self.bed).items()}
            if sum(len(p) for p in enclaves.values()) != copies:
                found.append(f"enclave processes {enclaves} for {copies} copy")
            return found

        deadline = time.monotonic() + 30.0
        while (found := left()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if found:
            self.leaked |= {p for pids in enclave_pids(self.bed).values() for p in pids}
        return found


def _as_run(logs: list[subprocess.CompletedProcess[str]]) -> MigrateRun:
    """The round's tools as one run, for what a storm keeps of a failure."""

    return MigrateRun(
        returncode=logs[-1].returncode if logs else 0,
        stats=None,
        stdout="".join(r.stdout for r in logs),
        stderr="".join(r.stderr for r in logs),
        seconds=0.0,
    )
