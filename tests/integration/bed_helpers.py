"""What tests on a :class:`~migsgx.lab.testbed.Testbed` share: the app, its answers, its copies.

The example kvstore application on host ``src`` (or wherever it moved), asked
from the other host; waiting without a timed assert (a bound, then a clear
failure); and the end of every test: exactly one runnable copy where it is
expected, then every copy stopped.  Also what the post-copy and container modules
share: a writer on one TCP connection, the source's page stream throttled, and a
scan of files for a canary.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from migsgx import _proc
from migsgx.agent.tls import issue_agent_identity
from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AgentProcess, AppProcess, MigrateRun, Testbed
from migsgx.sgx.ca import ProvisioningCA
from migsgx.sgx.platform import EmulatedPlatform
from migsgx.system.process import kill_tree

__all__ = [
    "Writer",
    "ask",
    "enclave_processes",
    "end_copies",
    "finish",
    "kvstore",
    "migrate_throttled",
    "scan_files",
    "start_workers",
    "strict_destination",
    "throttled_page_port",
    "wait_until",
    "workers",
    "workers_carry_on",
    "workers_kept_every_write",
]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; past ``timeout`` seconds, fail naming ``what``."""

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kvstore(bed: Testbed, *args: str) -> AppProcess:
    """The example kvstore on host ``src``, with ``args`` after its image."""

    return bed.start_app("kvstore", ["--image", str(bed.image("kvstore")), *args])


def ask(bed: Testbed, app: AppProcess, at: str, line: str) -> str:
    """One request to the app on host ``at``, sent from the other host."""

    return bed.ask(line, app.port, at=at, via="dst" if at == "src" else "src")


def workers(bed: Testbed, app: AppProcess, at: str) -> list[dict[str, Any]]:
    """The app's worker threads (``--workers``) as it reports them: count, errors."""

    return list(json.loads(ask(bed, app, at, "STATE").removeprefix("STATE "))["workers"])


def start_workers(bed: Testbed, *args: str) -> AppProcess:
    """A kvstore whose workers (``args`` names how many) write through their enclaves."""

    app = kvstore(bed, *args)
    wait_until(
        lambda: all(w["count"] > 20 for w in workers(bed, app, "src")), 20, "the workers to start"
    )
    return app


def workers_carry_on(bed: Testbed, app: AppProcess, at: str, what: str = "") -> None:
    """Every worker on ``at`` makes more than 20 more calls (it was not stopped)."""

    counts = [w["count"] for w in workers(bed, app, at)]
    wait_until(
        lambda: all(
            w["count"] > c + 20 for w, c in zip(workers(bed, app, at), counts, strict=True)
        ),
        20,
        what or f"the workers to carry on at {at}",
    )


def workers_kept_every_write(bed: Testbed, app: AppProcess, at: str) -> None:
    """Stop the workers on ``at``: none saw an error, and each one's last acknowledged
    write is what its enclave holds."""

    ask(bed, app, at, "STOP")
    final = workers(bed, app, at)
    assert all(not w["errors"] for w in final), final
    for i, worker in enumerate(final):
        assert ask(bed, app, at, f"WORKER {i}") == "VALUE " + str(worker["count"]).encode().hex()


def end_copies(bed: Testbed, app: AppProcess) -> None:
    """Stop every copy of the app, on every host."""

    for procs in bed.copies(app).values():
        for pid, _ in procs:
            kill_tree(pid)


def finish(bed: Testbed, app: AppProcess, *, expect: str) -> None:
    """Exactly one runnable copy, on ``expect``; then stop every copy."""

    assert bed.runnable_copies(app) == {"src": int(expect == "src"), "dst": int(expect == "dst")}
    end_copies(bed, app)


@contextlib.contextmanager
def strict_destination(
    bed: Testbed, state: Path, prepare: Callable[[Path], object] | None = None
) -> Iterator[AgentProcess]:
    """An agent on host ``dst`` whose platform (state in ``state``) launches no enclave of
    the deployment (launch control allows one unknown signer only); ``prepare(state)``
    runs before its platform service starts, which stops when the block ends."""

    EmulatedPlatform.init(state, ProvisioningCA.load(bed.deployment.ca_dir), host_id="strict")
    dst = bed.host("dst")
    issue_agent_identity(bed.deployment.ca_dir, state, "strict", [dst.address])
    if prepare is not None:
        prepare(state)
    service = start_service(state, prefix=dst.command([]), extra_args=["--allow-signer", "00" * 32])
    try:
        yield bed.start_agent(state=state, platform_socket=service.socket)
    finally:
        service.stop()


class Writer(threading.Thread):
    """Writes distinct keys (``PUT w<n> <n:08x>``) over one TCP connection until stopped;
    any failure ends it and is kept.

    ``acked`` lists the ``n`` of every acknowledged write; ``ok`` counts them by the
    ``phase`` the test had set when the request was sent (a write sent while the
    app moves counts as ``during`` even when its answer comes from the destination).
    """

    def __init__(self, conn: socket.socket, *, pause: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.pause = pause
        self.phase = "before"
        self.ok = {"before": 0, "during": 0, "after": 0}
        self.acked: list[int] = []
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        with self.conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
            n = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                n += 1
                phase = self.phase  # when the request was sent
                try:
                    stream.write(f"PUT w{n} {n:08x}\n")
                    stream.flush()
                    reply = stream.readline().strip()
                except OSError as exc:
                    self.error = f"request {n}: {exc}"
                    return
                if not reply.startswith("OK"):
                    self.error = f"request {n}: {reply!r}"
                    return
                self.acked.append(n)
                self.ok[phase] += 1
                time.sleep(self.pause)

    def finish(self) -> None:
        """Stop writing and wait for the thread (a bounded wait: it may hang in a read)."""

        self.stop.set()
        self.join(10)


#: Prints a port the kernel picks (run inside a host's network namespace).
_FREE_PORT = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"


@contextlib.contextmanager
def throttled_page_port(bed: Testbed) -> Iterator[int]:
    """A port the kernel picks on host ``src`` for the source's page server, whose
    stream (source port) alone leaves the source at 1 Mbit/s while the block runs.

    A process or container of tens of MiB then needs minutes for its pages; the
    commit point comes a fraction of a second after the restore, so pages are
    still missing there: the post-copy window is open whatever the machine's load.
    """

    src = bed.host("src")
    argv = src.command([sys.executable, "-c", _FREE_PORT])
    port = int(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    tc = ["tc", "-n", src.netns]
    try:
        for args in (
            ["qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10"],
            ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb",
             "rate", "10gbit"],
            ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb",
             "rate", "1mbit", "ceil", "1mbit"],
            ["filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "u32",
             "match", "ip", "sport", str(port), "0xffff", "flowid", "1:20"],
        ):  # fmt: skip
            subprocess.run([*tc, *args], check=True, capture_output=True)
        yield port
    finally:
        subprocess.run([*tc, "qdisc", "del", "dev", "eth0", "root"], check=False,
                       capture_output=True)  # fmt: skip


def migrate_throttled(
    bed: Testbed, pid: int | None, agent: AgentProcess, fault: str, *args: str
) -> MigrateRun:
    """``migrate [PID] ARGS --post-copy`` at fault ``fault`` (``MIGSGX_FAULT``), its page
    stream throttled (:func:`throttled_page_port`): pages are missing at the commit point."""

    with throttled_page_port(bed) as port:
        return bed.migrate(
            pid, agent,
            args=[*args, "--post-copy", "--post-copy-port", str(port)],
            env={"MIGSGX_FAULT": fault},
        )  # fmt: skip


def scan_files(roots: list[Path], needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Every regular file under ``roots`` (or a root that is a file) holding a needle, by
    needle name; read in blocks with an overlap, so a needle across two blocks is found.

    A file that goes away (or cannot be read) while the scan runs is passed over: the
    roots belong to live hosts, whose processes create and remove files meanwhile.
    """

    hits: dict[str, list[str]] = {name: [] for name in needles}
    keep = max(len(n) for n in needles.values())
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                with path.open("rb") as f:
                    tail = b""
                    while chunk := f.read(8 << 20):
                        data = tail + chunk
                        for name, needle in needles.items():
                            if needle in data and str(path) not in hits[name]:
                                hits[name].append(str(path))
                        tail = data[-keep:]
            except OSError:
                continue
    return hits


def enclave_processes(bed: Testbed, host: str) -> set[int]:
    """The enclave processes the platform service of ``host`` runs."""

    service = bed.services[host].process.pid
    return {pid for pid in _proc.scanned_children(service) if _proc.alive(pid)}
