"""The bed of the cells that fault the source's platform service itself.

``MIGSGX_FAULT`` in the source platform service's environment reaches a moment
inside it (``platform.before-commit``: an enclave's COMMIT received, not yet
written; ``platform.after-commit``: written, not yet answered).  A cell restarts
that service with its fault (:func:`loaded`), and :func:`faulty_platform` gives
the bed a plain one back afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from bed_helpers import ask, kvstore

from migsgx.agent.journal import journal_dir
from migsgx.agent.tls import AgentIdentity
from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AppProcess, Testbed

BEFORE, AFTER = "platform.before-commit", "platform.after-commit"

#: Where each bed's service log stood when its service was last restarted.
_LOG_START: dict[str, int] = {}


@pytest.fixture
def faulty_platform(bed: Testbed) -> Iterator[None]:
    """Between the cell's setup and its end: the source's platform service restarted with
    ``MIGSGX_FAULT`` (set by the cell through :func:`restart_platform`); afterwards a
    plain one again."""

    yield
    restart_platform(bed, "")


def restart_platform(bed: Testbed, fault: str) -> None:
    """The source's platform service, stopped and started again with ``fault``."""

    bed.services["src"].stop()
    log = bed.state("src") / "service.log"
    _LOG_START[str(bed.state("src"))] = len(log.read_text(errors="replace")) if log.exists() else 0
    saved = os.environ.pop("MIGSGX_FAULT", None)
    if fault:
        os.environ["MIGSGX_FAULT"] = fault  # (inherited by the service alone: see below)
    try:
        bed.services["src"] = start_service(bed.state("src"), prefix=bed.host("src").command([]))
    finally:
        os.environ.pop("MIGSGX_FAULT", None)
        if saved is not None:
            os.environ["MIGSGX_FAULT"] = saved


def service_log(bed: Testbed) -> str:
    """What the source's platform service wrote since it was last restarted."""

    text = (bed.state("src") / "service.log").read_text(errors="replace")
    return text[_LOG_START.get(str(bed.state("src")), 0) :]


def loaded(bed: Testbed, fault: str) -> tuple[AppProcess, str]:
    """A kvstore (its enclave launched by a platform service with ``fault``,
    ``POINT:ACTION``) with acknowledged writes; their digest."""

    restart_platform(bed, fault)
    app = kvstore(bed)
    for i in range(3):
        assert ask(bed, app, "src", f"PUT k{i} {f'v{i}'.encode().hex()}") == f"OK {i + 1}"
    return app, ask(bed, app, "src", "DIGEST")


def journals(bed: Testbed) -> set[Path]:
    """The source agent's migration journals."""

    return set(journal_dir(AgentIdentity.of_state(bed.state("src")).directory).glob("*.json"))


def cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``migsgx ARGS`` with ``env`` added (the platform socket, for a checkpoint)."""

    return subprocess.run(
        [sys.executable, "-m", "migsgx", *args], capture_output=True, text=True, timeout=150,
        env={**os.environ, **env}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
