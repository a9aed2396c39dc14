"""What a storm checks after each migration, and what it does as the hosts' supervisor.

:class:`Verdict` judges one migration once the hosts settled: how many copies
run (application processes and their enclave processes, on both hosts), where,
with which writes, whether the copy still launches enclaves on its host, and
whether the tool's exit status says so.  :func:`leftovers`
lists what a migration left that nobody will remove.  :func:`restart_dead` and
:func:`heal` do what a host's supervisor and its network would: a killed
platform service or agent starts again, a stalled connection's packets flow.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Final, Protocol

from .. import _proc
from ..containers.imagefs import leftover_mounts
from ..system.process import process_state
from .hosts import start_service
from .storm_apps import Target
from .storm_faults import SOURCE_ENCLAVE, Fault
from .testbed import AgentProcess, MigrateRun, Testbed


class Storm(Protocol):
    """What the checks use of a storm (:class:`migsgx.lab.storm.Storm`)."""

    bed: Testbed
    target: Target
    writes: dict[str, str]
    unsure: set[str]
    leaked: set[int]
    agents: dict[str, AgentProcess]

    def ask(self, line: str, at: str, timeout: float = 5.0) -> str | None: ...

    def put(self, at: str, timeout: float = 5.0) -> bool | None: ...

    def expected_digest(self) -> str: ...


__all__ = [
    "Client",
    "Verdict",
    "enclave_pids",
    "guardians",
    "heal",
    "honest_exit",
    "kernel_kills",
    "leftovers",
    "restart_dead",
]

_GONE: Final = ("Z", "X", "")
#: Seconds the leftovers may take to go (a guardian's last delivery, a release).
LEFTOVER_SECONDS: Final = 30.0


class Client(threading.Thread):
    """Writes to the app on ``at`` while the tool runs (a client does not wait for a
    migration); each write is acknowledged, refused, or in doubt (:meth:`Storm.put`).
    :attr:`acked_at`: when each acknowledgement came (the storm's monotonic clock)."""

    def __init__(self, storm: Storm, at: str) -> None:
        super().__init__(name="migsgx-storm-client", daemon=True)
        self.storm, self.at = storm, at
        self.stop = threading.Event()
        self.acked_at: list[float] = []

    def run(self) -> None:
        while not self.stop.is_set():
            if self.storm.put(self.at, timeout=2.0) is True:
                self.acked_at.append(time.monotonic())
            self.stop.wait(0.05)

    def finish(self) -> None:
        self.stop.set()
        self.join(10)


def honest_exit(code: int, outcome: str, fault: Fault) -> bool:
    """Whether ``migsgx migrate``'s exit ``code`` tells the truth of ``outcome``.

    A source enclave killed before the decision took its state with it: that is
    11 (``source-enclave-lost``), never 6, which says the source runs as before.
    """

    honest = {
        0: outcome == "moved",
        6: outcome == "stayed",
        7: True,  # in doubt: one ``recover`` settled it (judged above)
        8: outcome in ("gone", "lost") and fault.may_lose == "gone",
        10: outcome == "lost",
        11: outcome == "lost" and fault.may_lose == SOURCE_ENCLAVE,
        -9: fault.kills_tool,
    }
    return honest.get(code, False)


class Verdict:
    """The copies of the storm's app after one migration, and what is wrong with them."""

    def __init__(self, storm: Storm, fault: Fault, frm: str, to: str, run: MigrateRun) -> None:
        self.storm, self.fault, self.frm, self.to, self.run = storm, fault, frm, to, run

    def states(self) -> dict[str, list[str]]:
        found = self.storm.target.copies()
        return {h: [s for _, s in procs] for h, procs in found.items()}

    def runnable(self) -> dict[str, int]:
        """Copies that can run per host: neither stopped (SIGSTOP, CRIU) nor frozen (cgroup)."""

        return self.storm.target.runnable()

    def settled(self) -> bool:
        """No stopped copy is left (a held tree, a fenced source) and at most one runs."""

        runnable = self.runnable()
        present = {h: sum(s not in _GONE for s in ss) for h, ss in self.states().items()}
        if present != runnable:
            return False
        running = sum(runnable.values())
        return running == 1 or (running == 0 and bool(self.fault.may_lose))

    def outcome(self) -> str:
        """``moved``, ``stayed``, ``lost`` (no copy with the state), or ``twice``."""

        runnable = self.runnable()
        if sum(runnable.values()) > 1:
            return "twice"
        for host, count in runnable.items():
            if count:
                answer = self.storm.ask("DIGEST", host) or ""
                if not answer.startswith("DIGEST"):
                    return "lost"  # the process runs without its enclave
                return "moved" if host == self.to else "stayed"
        return "gone" if self.fault.may_lose == "gone" else "lost"

    def failures(self, outcome: str) -> list[str]:
        found: list[str] = []
        code, stderr = self.run.returncode, self.run.stderr
        if outcome == "twice":
            found.append(f"two runnable copies: {self.states()}")
        if outcome in ("lost", "gone") and not self.fault.may_lose:
            found.append(f"{outcome}: no copy with the state; copies {self.states()}")
        if outcome in ("moved", "stayed"):
            found += self.writes_in(self.to if outcome == "moved" else self.frm)
            found += self.launches_on(self.to if outcome == "moved" else self.frm)
        if "Traceback" in stderr:
            found.append("the tool printed a traceback: " + stderr[-800:])
        if not honest_exit(code, outcome, self.fault):
            found.append(f"exit {code} does not tell the truth: {outcome}; {stderr[-600:]}")
        return found

    def launches_on(self, host: str) -> list[str]:
        """The copy on ``host`` reaches its host's platform service, a restarted one
        included: it launches a new enclave and uses it (a container that kept a stale
        socket could not, until it moved)."""

        answer = self.storm.ask("LAUNCH storm-probe 00", host, timeout=30.0) or "no answer"
        if answer.startswith("OK "):
            return []
        return [f"the copy on {host} cannot launch an enclave: {answer[:200]}"]

    def writes_in(self, host: str) -> list[str]:
        """Every acknowledged write is in the copy on ``host`` (its digest, or key by key
        when some writes are in doubt: those may be there or not)."""

        storm = self.storm
        if not storm.unsure:
            answer = storm.ask("DIGEST", host)
            if answer == storm.expected_digest():
                return []
        missing = [
            key for key, value in storm.writes.items()
            if storm.ask(f"GET {key}", host) != "VALUE " + value.encode().hex()
        ]  # fmt: skip
        if missing or storm.unsure:
            storm.unsure.clear()  # (checked key by key once; the digest from here on)
            storm.writes.update(_present(storm, host))
        return [f"acknowledged writes missing on {host}: {missing[:10]}"] if missing else []


def _present(storm: Storm, host: str) -> dict[str, str]:
    """The writes in doubt that the copy on ``host`` holds (they count from now on)."""

    found = {}
    for key in sorted(storm.unsure):
        answer = storm.ask(f"GET {key}", host) or ""
        if answer.startswith("VALUE "):
            found[key] = bytes.fromhex(answer.removeprefix("VALUE ")).decode()
    return found


def enclave_pids(bed: Testbed) -> dict[str, list[int]]:
    """The enclave processes by host (the platform service that started them), and under
    ``orphan`` those whose service died: they are reparented to this process, the
    subreaper of everything the storm started."""

    parents = {bed.services[h].process.pid: h for h in bed.names}
    found: dict[str, list[int]] = {h: [] for h in bed.names}
    found["orphan"] = []
    for pid in _proc.pids():
        if b"migsgx.enclave.runtime" not in b"\0".join(_proc.argv(pid)):
            continue
        fields = _proc.stat(pid)
        if fields is None or fields[_proc.STATE] in ("Z", "X"):
            continue
        ppid = int(fields[_proc.PPID])
        if ppid in parents:
            found[parents[ppid]].append(pid)
        elif ppid == os.getpid():
            found["orphan"].append(pid)
    return found


def guardians(app_pid: int) -> list[int]:
    found = []
    for pid in _proc.pids():
        argv = _proc.argv(pid)
        ours = b"migsgx.agent.guardian" in argv and str(app_pid).encode() in argv
        if ours and process_state(pid) not in _GONE:
            found.append(pid)
    return found


def _unfinished(bed: Testbed, host: str, app_pid: int) -> list[str]:
    found = []
    for path in (bed.state(host) / "agent" / "migrations").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            if data.get("app_pid") == app_pid and data.get("phase") not in ("done", "aborted"):
                found.append(f"{path.name}: {data.get('phase')}")
    return found


def leftovers(storm: Storm, run: MigrateRun, frm: str, app_pid: int, copies: int) -> list[str]:
    """What the migration of ``app_pid`` left behind, after :data:`LEFTOVER_SECONDS` to
    let it go; ``copies``: how many enclaved copies run (1, or 0 once the state is lost)."""

    from ..agent.dumpdirs import scratch_base

    bed = storm.bed

    def left() -> list[str]:
        found = [f"images directory {p}" for p in scratch_base().glob(f"migsgx-dump-{run.pid}-*")]
        # The destination agents' (:mod:`migsgx.agent.imageroom`): gone with the session.
        for agent in storm.agents.values():
            found += [
                f"agent's images directory {p}"
                for p in scratch_base().glob(f"migsgx-dump-{agent.proc.pid}-*")
            ]
        with contextlib.suppress(OSError):
            mounts = leftover_mounts(Path("/proc/self/mountinfo").read_text())
            found += [f"images mount {p}" for p, owner in mounts if owner == run.pid]
        found += [f"guardian {pid}" for pid in guardians(app_pid)]
        found += [f"journal {j}" for j in _unfinished(bed, frm, app_pid)]
        enclaves = {h: sorted(set(p) - storm.leaked) for h, p in enclave_pids(bed).items()}
        if sum(len(p) for p in enclaves.values()) != copies:
            found.append(f"enclave processes {enclaves} for {copies} copy")
        return found

    deadline = time.monotonic() + LEFTOVER_SECONDS
    while (found := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if found:  # (said once: the next migrations are judged without them)
        storm.leaked |= {p for pids in enclave_pids(bed).values() for p in pids}
    return found


def restart_dead(
    bed: Testbed, agents: list[AgentProcess], main: dict[str, AgentProcess]
) -> list[AgentProcess]:
    """Start again what a fault killed: platform services, then agents on their ports.

    A restarted agent adopts the trees its former self held.  ``main`` (the
    storm's agent per host) points at the new agent where the old one was one of
    them.  Returns the agents started here.
    """

    for host in bed.names:
        if bed.services[host].process.poll() is not None:
            bed.services[host].stop()
            bed.services[host] = start_service(bed.state(host), prefix=bed.host(host).command([]))
    started = []
    for agent in agents:
        if agent.proc.poll() is None or agent in started:
            continue
        name = next(h for h in bed.names if bed.host(h) is agent.host)
        fresh = bed.start_agent(name, listen_port=agent.port)
        started.append(fresh)
        if main.get(name) is agent:
            main[name] = fresh
    return started


def heal(bed: Testbed, host: str) -> None:
    """Remove the DROP rules a ``stall`` put into ``host``'s firewall.

    Not a container's listener gate (:mod:`migsgx.containers.gate`, a rule on SYNs
    only): whoever ends a migration opens that, and a gate left closed is a failure
    the checks must see (the source would answer nobody).
    """

    listed = subprocess.run(
        bed.host(host).command(["iptables", "-S"]), capture_output=True, text=True, timeout=10
    )
    for line in listed.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["-A"] and parts[-2:] == ["-j", "DROP"] and "--tcp-flags" not in parts:
            subprocess.run(bed.host(host).command(["iptables", "-D", *parts[1:]]),
                           capture_output=True, timeout=10)  # fmt: skip


def kernel_kills(limit: int = 5) -> list[str]:
    """The kernel's last lines about processes it killed (the OOM killer), for a tool
    that died by a SIGKILL no fault of the storm sent."""

    try:
        text = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ["(dmesg unreadable)"]
    lines = [ln for ln in text.splitlines() if "Killed process" in ln or "oom" in ln.lower()]
    return lines[-limit:]
