"""A source enclave that keeps another process's duplicate of its connection.

Whoever holds an enclave's connection may send ``__mig_hold`` (the application
itself, a child of it): the enclave then keeps THAT duplicate, and refuses the
tool's later hold (``hold-kept``).  The tool used to log "keeps no duplicate of
its connection" and migrate on: should it and its guardian then die after the
enclave committed, or while it was frozen undecided, the duplicate kept names
no nonce of the tool's journal, and ``migsgx recover`` could not take the state
back.  The tool now refuses to migrate there, before anything is frozen or
decided (exit 6, ``hold-refused``); the source runs on with every write, the
destination keeps nothing.  The kind of the refusal decides: an enclave runtime
older than the call (``MIGSGX_FAULT=enclave.hold:unknown-call`` in its platform
service's environment: it answers ``unknown-ecall``) keeps nobody's duplicate,
and the migration moves as before.  A stale duplicate (an aborted migration's, that
an application whose runtime never says ``__mig_unhold`` keeps while it lives)
refuses the same way a migration that holds after its handshake; one with
``--late-handshake`` replaces it and moves.

One bed, a kvstore per cell, real enclaves, agents, CRIU and namespaces.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

pytest.register_assert_rewrite("bed_helpers", "fault_helpers")

from bed_helpers import ask, end_copies, wait_until  # noqa: E402
from fault_helpers import (  # noqa: E402
    EXIT_MOVED_NOT,
    EXIT_OK,
    loaded_app,
    no_images_left,
    only_copy,
    source_answers,
)
from platform_faults import faulty_platform, loaded  # noqa: E402

from migsgx import _proc  # noqa: E402
from migsgx._fds import take_descriptor  # noqa: E402
from migsgx.agent.holders import _peer_of, is_enclave_runtime  # noqa: E402
from migsgx.channel import ECALL_FRAME_MAX  # noqa: E402
from migsgx.lab.testbed import AgentProcess, AppProcess, Testbed  # noqa: E402
from migsgx.wire import encode  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 57

__all__ = ["faulty_platform", "no_images_left"]  # (fixtures, used by name)


def _enclave_connections(app: AppProcess) -> list[tuple[socket.socket, int]]:
    """A duplicate of each of the application's ends of an enclave connection
    (``pidfd_getfd``), with the pid of the enclave runtime at its other end, in the
    order the enclaves were launched (their pids)."""

    runtimes = [pid for pid in _proc.pids() if is_enclave_runtime(pid)]
    found = []
    for fd, link in list(_proc.fd_links(app.pid)):
        if not link.startswith("socket:["):
            continue
        try:
            sock = take_descriptor(app.pid, fd)
        except OSError:
            continue  # (closed meanwhile: a request's connection)
        peer = _peer_of(sock) if sock.family == socket.AF_UNIX else 0
        enclave = next((p for p in runtimes if peer and _proc.holds(p, f"socket:[{peer}]")), 0)
        if enclave:
            found.append((sock, enclave))
        else:
            sock.close()
    return sorted(found, key=lambda found: found[1])


def _own_hold(app: AppProcess, which: int = 0) -> int:
    """The application's connection to its enclave ``which`` sends a ``__mig_hold`` of
    its own (a nonce the tool's journal never names), its descriptor on the frame's own
    message; that enclave's pid.  The enclave serves that connection's frames in order:
    the hold is taken before the tool's ``prepare`` reaches it.  The answer (an id the
    application never asked) is passed over by the application's reader."""

    connections = _enclave_connections(app)
    try:
        sock, enclave = connections[which]
        frame = {"t": "ecall", "id": 1 << 50, "fn": "__mig_hold", "args": [b"not-the-tools"]}
        socket.send_fds(sock, [encode(frame, max_size=ECALL_FRAME_MAX)], [sock.fileno()])
        return enclave
    finally:
        for sock, _ in connections:
            sock.close()


@pytest.mark.parametrize(
    ("options", "enclaves", "which"),
    [((), 1, 0), (("--late-handshake",), 1, 0), (("--live",), 1, 0), ((), 2, 1)],
    ids=["early-handshake", "late-handshake", "live", "second-of-two"],
)
def test_an_enclave_keeping_the_applications_own_hold_refuses_the_migration(
    bed: Testbed, agent: AgentProcess, options: tuple[str, ...], enclaves: int, which: int
) -> None:
    """The application sent its own ``__mig_hold`` first: exit 6 (``hold-refused``),
    the enclave named; the source answers with every write; no copy on the
    destination.  The next migration moves (the roll-back's abort and the
    application's ``__mig_unhold`` let that duplicate go; asked once per number of
    enclaves).  Of two enclaves, the first took the tool's hold and goes back with
    its state too."""

    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd needs root")
    app, digest = loaded_app(bed, "--enclaves", str(enclaves))
    try:
        enclave = _own_hold(app, which)
        refused = bed.migrate(app.pid, agent, args=options)
        assert refused.returncode == EXIT_MOVED_NOT, refused.stderr
        assert "[hold-refused]" in refused.stderr, refused.stderr
        assert f"enclave {which} (pid {enclave}) keeps another process's" in refused.stderr
        assert "(hold-kept: " in refused.stderr, refused.stderr
        assert "keeps no duplicate" not in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr, refused.stderr
        source_answers(bed, app, digest, refused.stderr)
        wait_until(lambda: bed.copies(app)["dst"] == [], 20, "the destination to keep nothing")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        assert ask(bed, app, "src", "DIGEST") == digest
        # (a figure, not an assert: the refused run, from the tool's start to its exit)
        figure = {"options": options, "enclaves": enclaves, "tool_seconds": refused.seconds}
        print("hold-refused " + json.dumps(figure))
        if options:
            only_copy(bed, app, "src", digest)
            return  # (the next move: once per number of enclaves is enough)
        moved = bed.migrate(app.pid, agent)
        assert moved.returncode == EXIT_OK, moved.stderr
        assert "keeps no duplicate" not in moved.stderr, moved.stderr
        only_copy(bed, app, "dst", digest)
    finally:
        end_copies(bed, app)


@pytest.mark.usefixtures("faulty_platform")
def test_an_enclave_runtime_older_than_the_hold_still_migrates(
    bed: Testbed, agent: AgentProcess
) -> None:
    """``__mig_hold`` answered as unknown (a runtime that predates it): the tool says
    the enclave keeps no duplicate and migrates; exit 0, every write on the destination."""

    app, digest = loaded(bed, "enclave.hold:unknown-call")
    try:
        moved = bed.migrate(app.pid, agent)
        assert moved.returncode == EXIT_OK, moved.stderr
        assert "enclave 0 keeps no duplicate of its connection" in moved.stderr, moved.stderr
        assert "declares no ECALL '__mig_hold'" in moved.stderr, moved.stderr
        only_copy(bed, app, "dst", digest)
    finally:
        end_copies(bed, app)


def test_a_stale_duplicate_refuses_a_migration_that_holds_after_its_handshake(
    bed: Testbed, agent: AgentProcess
) -> None:
    """An aborted migration's duplicate that the application never lets go (its runtime
    predates ``__mig_unhold``: ``app.resume-taken:no-unhold``) while it lives: a
    migration whose handshake comes before its hold (the default) finds it kept
    (``hold-kept``) and is refused (6, where it went on with no holder recorded);
    ``--late-handshake`` holds before the handshake, replaces it, and moves."""

    app = bed.start_app(
        "kvstore", ["--image", str(bed.image("kvstore"))],
        env={"MIGSGX_FAULT": "app.resume-taken:no-unhold"},
    )  # fmt: skip
    try:
        for i in range(3):
            assert ask(bed, app, "src", f"PUT k{i} {f'v{i}'.encode().hex()}") == f"OK {i + 1}"
        digest = ask(bed, app, "src", "DIGEST")
        failed = bed.migrate(app.pid, agent, env={"MIGSGX_FAULT": "tool.before-commit:fail"})
        assert failed.returncode == EXIT_MOVED_NOT, failed.stderr
        source_answers(bed, app, digest, failed.stderr)
        refused = bed.migrate(app.pid, agent)
        assert refused.returncode == EXIT_MOVED_NOT, refused.stderr
        assert "[hold-refused]" in refused.stderr, refused.stderr
        source_answers(bed, app, digest, refused.stderr)
        wait_until(lambda: bed.copies(app)["dst"] == [], 20, "the destination to keep nothing")
        moved = bed.migrate(app.pid, agent, args=["--late-handshake"])
        assert moved.returncode == EXIT_OK, moved.stderr
        assert "keeps no duplicate" not in moved.stderr, moved.stderr
        only_copy(bed, app, "dst", digest)
    finally:
        end_copies(bed, app)
