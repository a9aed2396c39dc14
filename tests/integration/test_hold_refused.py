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
and the migration moves as before.

One bed, a kvstore per cell, real enclaves, agents, CRIU and namespaces.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

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


def _enclave_connections(app: AppProcess) -> Iterator[socket.socket]:
    """A duplicate of each of the application's ends of an enclave connection
    (``pidfd_getfd``): a Unix socket whose other end an enclave runtime holds."""

    runtimes = [pid for pid in _proc.pids() if is_enclave_runtime(pid)]
    for fd, link in list(_proc.fd_links(app.pid)):
        if not link.startswith("socket:["):
            continue
        sock = take_descriptor(app.pid, fd)
        peer = _peer_of(sock) if sock.family == socket.AF_UNIX else 0
        if peer and any(_proc.holds(pid, f"socket:[{peer}]") for pid in runtimes):
            yield sock
        else:
            sock.close()


def _own_hold(app: AppProcess) -> int:
    """The application's connection sends a ``__mig_hold`` of its own (a nonce the
    tool's journal never names), its descriptor on the frame's own message; how many
    enclave connections did.  The enclave serves that connection's frames in order:
    the hold is taken before the tool's ``prepare`` reaches it.  The answer (an id the
    application never asked) is passed over by the application's reader."""

    sent = 0
    for sock in _enclave_connections(app):
        with sock:
            frame = {"t": "ecall", "id": 1 << 50, "fn": "__mig_hold", "args": [b"not-the-tools"]}
            socket.send_fds(sock, [encode(frame, max_size=ECALL_FRAME_MAX)], [sock.fileno()])
        sent += 1
    return sent


def test_an_enclave_keeping_the_applications_own_hold_refuses_the_migration(
    bed: Testbed, agent: AgentProcess
) -> None:
    """The application sent its own ``__mig_hold`` first: exit 6 (``hold-refused``),
    the enclave named; the source answers with every write; no copy on the destination;
    and the next migration moves (the roll-back's abort and the application's
    ``__mig_unhold`` let that duplicate go)."""

    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd needs root")
    app, digest = loaded_app(bed)
    try:
        assert _own_hold(app) == 1
        refused = bed.migrate(app.pid, agent)
        assert refused.returncode == EXIT_MOVED_NOT, refused.stderr
        assert "[hold-refused]" in refused.stderr, refused.stderr
        assert "enclave 0 (pid " in refused.stderr and "hold-kept" in refused.stderr
        assert "keeps no duplicate" not in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr, refused.stderr
        source_answers(bed, app, digest, refused.stderr)
        wait_until(lambda: bed.copies(app)["dst"] == [], 20, "the destination to keep nothing")
        assert bed.runnable_copies(app) == {"src": 1, "dst": 0}
        assert ask(bed, app, "src", "DIGEST") == digest
        # (a figure, not an assert: the refused run, from the tool's start to its exit)
        print("hold-refused " + json.dumps({"tool_seconds": round(refused.seconds, 3)}))
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
