"""``migsgx migrate --post-copy`` of a process with real CRIU lazy pages between hosts.

The enclaves move and commit as in stop-and-copy; the process's private
memory follows after the commit point, pulled by the destination in CRIU's
mutual TLS.  Every acknowledged write is present afterwards; a failure before
the commit point leaves the source running (exit 6); the source's CRIU lost
inside the window is exit 9 with the destination tree dead, never a process
running with wrong memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from migsgx.criu import Criu
from migsgx.lab.testbed import AgentProcess, AppProcess, Testbed
from migsgx.system.process import kill_tree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def bed(
    criu: Criu,
    subreaper: None,
    _stale_namespaces_removed: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Testbed]:
    with Testbed(tmp_path_factory.mktemp("postcopy"), subnet=83) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def agent(bed: Testbed) -> AgentProcess:
    return bed.start_agent()


def workers(bed: Testbed, app: AppProcess, at: str) -> list[dict[str, Any]]:
    reply = bed.ask("STATE", app.port, at=at, via="dst" if at == "src" else "src")
    return list(json.loads(reply.removeprefix("STATE "))["workers"])


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_kvstore(bed: Testbed) -> AppProcess:
    app = bed.start_app(
        "kvstore",
        ["--image", str(bed.image("kvstore")), "--workers", "2", "--max-calls", "100000"],
    )
    wait_until(
        lambda: all(w["count"] > 20 for w in workers(bed, app, "src")), 20, "the workers to start"
    )
    return app


def carries_on(bed: Testbed, app: AppProcess, at: str) -> None:
    counts = [w["count"] for w in workers(bed, app, at)]
    wait_until(
        lambda: all(
            w["count"] > c + 20 for w, c in zip(workers(bed, app, at), counts, strict=True)
        ),
        20,
        f"the workers to carry on at {at}",
    )


def end(bed: Testbed, app: AppProcess) -> None:
    for procs in bed.copies(app).values():
        for pid, _ in procs:
            kill_tree(pid)


def test_kvstore_under_writes_moves_with_post_copy(bed: Testbed, agent: AgentProcess) -> None:
    app = start_kvstore(bed)
    run = bed.migrate(app.pid, agent, args=["--post-copy"])
    assert run.returncode == 0, run.stderr
    assert run.stats is not None
    # The destination ran before its last page came: the window was open.
    assert run.stats["post_copy_window"] > 0
    assert run.stats["details"]["page_bytes"] == 0  # no page went before the commit
    carries_on(bed, app, "dst")
    bed.ask("STOP", app.port, at="dst", via="src")
    final = workers(bed, app, "dst")
    assert all(not w["errors"] for w in final), final
    # Every worker's last acknowledged write is what its enclave holds.
    for i, worker in enumerate(final):
        value = bed.ask(f"WORKER {i}", app.port, at="dst", via="src")
        assert value == "VALUE " + str(worker["count"]).encode().hex()
    assert bed.runnable_copies(app) == {"src": 0, "dst": 1}
    end(bed, app)


@pytest.mark.parametrize("action", ["fail", "kill-criu"])
def test_failure_before_the_commit_point_leaves_the_source_running(
    bed: Testbed, agent: AgentProcess, action: str
) -> None:
    app = start_kvstore(bed)
    # The destination restored the tree held, its daemon pulling pages; then the
    # tool fails, or the source's CRIU (the only server of the pages) dies while
    # pages are still missing (the page stream is throttled: see below).
    port = free_port(bed)
    throttle_port(bed, port)
    try:
        run = bed.migrate(
            app.pid,
            agent,
            args=["--post-copy", "--post-copy-port", str(port)],
            env={"MIGSGX_FAULT": f"tool.before-commit:{action}"},
        )
    finally:
        unthrottle(bed)
    assert run.returncode == 6, run.stderr
    assert "the source runs on" in run.stderr or "aborted" in run.stderr, run.stderr
    carries_on(bed, app, "src")
    assert all(not w["errors"] for w in workers(bed, app, "src"))
    assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
    end(bed, app)


def free_port(bed: Testbed) -> int:
    """A port the kernel picks on the source host (for the source's page server)."""

    code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    argv = bed.host("src").command([sys.executable, "-c", code])
    return int(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


def throttle_port(bed: Testbed, port: int) -> None:
    """Only the page stream (source port ``port``) leaves the source at 1 Mbit/s.

    The process's memory (tens of MiB) then needs minutes; the commit point
    comes a fraction of a second after the restore, so pages are missing there.
    """

    run = ["tc", "-n", bed.host("src").netns]
    for argv in (
        ["qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10"],
        ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb",
         "rate", "10gbit"],
        ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb",
         "rate", "1mbit", "ceil", "1mbit"],
        ["filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "u32",
         "match", "ip", "sport", str(port), "0xffff", "flowid", "1:20"],
    ):  # fmt: skip
        subprocess.run([*run, *argv], check=True, capture_output=True)


def unthrottle(bed: Testbed) -> None:
    subprocess.run(
        ["tc", "-n", bed.host("src").netns, "qdisc", "del", "dev", "eth0", "root"],
        check=False, capture_output=True,
    )  # fmt: skip


def test_source_criu_lost_after_the_commit_point_is_exit_9(
    bed: Testbed, agent: AgentProcess
) -> None:
    app = start_kvstore(bed)
    port = free_port(bed)
    throttle_port(bed, port)
    try:
        run = bed.migrate(
            app.pid,
            agent,
            args=["--post-copy", "--post-copy-port", str(port)],
            env={"MIGSGX_FAULT": "tool.after-commit:kill-criu"},
        )
    finally:
        unthrottle(bed)
    assert run.returncode == 9, run.stderr
    assert "inside the post-copy window" in run.stderr, run.stderr
    assert "destination tree was killed" in run.stderr, run.stderr
    # Neither copy runs: the destination's never ran with pages missing, the
    # source's gave its enclaves up at the commit point.
    copies = bed.copies(app)
    assert bed.runnable_copies(app) == {"src": 0, "dst": 0}, copies
    assert all(state in ("", "Z", "X") for _, state in copies["dst"]), copies
    end(bed, app)


def test_tool_killed_while_its_criu_waits_for_the_destination(
    bed: Testbed, agent: AgentProcess
) -> None:
    """The lazy dump serves, no restore was asked: the guardian ends that CRIU
    (it would wait for a page connection forever) and resumes the source."""

    app = start_kvstore(bed)
    run = bed.migrate(
        app.pid, agent, args=["--post-copy"], env={"MIGSGX_FAULT": "tool.before-restore:kill"}
    )
    assert run.returncode == -9, run.stderr
    wait_until(lambda: bed.runnable_copies(app) == {"src": 1, "dst": 0}, 30, "the source to run")
    carries_on(bed, app, "src")
    assert all(not w["errors"] for w in workers(bed, app, "src"))
    end(bed, app)
