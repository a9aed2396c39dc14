"""What tests on a :class:`~migsgx.lab.testbed.Testbed` share: the app, its answers, its copies.

The example kvstore application on host ``src`` (or wherever it moved), asked
from the other host; waiting without a timed assert (a bound, then a clear
failure); and the end of every test: exactly one runnable copy where it is
expected, then every copy stopped.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from migsgx.agent.tls import issue_agent_identity
from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AgentProcess, AppProcess, Testbed
from migsgx.sgx.ca import ProvisioningCA
from migsgx.sgx.platform import EmulatedPlatform
from migsgx.system.process import kill_tree

__all__ = [
    "ask",
    "end_copies",
    "finish",
    "kvstore",
    "start_workers",
    "strict_destination",
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
