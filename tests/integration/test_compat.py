"""A rolling upgrade: this release against the previous one, in both directions.

The previous release is this repository's source at :data:`PREVIOUS` (main
right before ``begin.memory_bytes`` and ``images_ok.images_fs``: control
protocol version 1, which knows no negotiation), taken out of the clone's
history with ``git archive`` and run as a host of its own: its platform
service, its agent or tool, its application library.  Real CRIU, TLS and TCP
between two network namespaces, as everywhere in this directory.  The frames
themselves are checked against the frozen version 1 schema in
``tests/unit/test_protocol_versions.py``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from bed_helpers import (
    ask,
    finish,
    kvstore,
    start_workers,
    workers_carry_on,
    workers_kept_every_write,
)

from migsgx.criu.locate import find_criu
from migsgx.lab.testbed import AgentProcess, AppProcess, Testbed
from migsgx.sgx.spawn import start_service

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 233
#: The previous release: control protocol version 1 (``tests/compat/control-v1.json``).
PREVIOUS = "5f0a1c84a1c78286c0dabb393fab2a8af38ee0b0"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that runs the previous release's code (its ``src`` on PYTHONPATH)."""

    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the previous release comes from its history")
    # (root runs the suite on a checkout it may not own: trust it for these reads)
    git_c = [git, "-c", "safe.directory=*", "-C", str(ROOT)]
    found = subprocess.run([*git_c, "cat-file", "-e", f"{PREVIOUS}^{{commit}}"], check=False)
    shallow = subprocess.run(
        [*git_c, "rev-parse", "--is-shallow-repository"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0 and shallow.stdout.strip() == "true":
        pytest.skip(f"a shallow clone: commit {PREVIOUS} (the previous release) is not in it")
    assert found.returncode == 0, (
        f"commit {PREVIOUS} (the previous release) is not in this clone's history: "
        "clone with history (not --depth)"
    )
    out = tmp_path_factory.mktemp("previous")
    archive = out / "src.tar"
    subprocess.run(
        [*git_c, "archive", "--format=tar", "-o", str(archive), PREVIOUS, "src"],
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    # CRIU's RPC module is generated at set-up time, from the same CRIU: not in git.
    generated = ROOT / "src" / "migsgx" / "criu" / "_generated"
    shutil.copytree(generated, out / "src" / "migsgx" / "criu" / "_generated")
    return {"PYTHONPATH": str(out / "src"), "MIGSGX_CRIU": str(find_criu())}


@contextlib.contextmanager
def previous_host(bed: Testbed, name: str, env: Mapping[str, str]) -> Iterator[None]:
    """Host ``name`` runs the previous release's platform service while the block runs."""

    state = bed.state(name)
    bed.services[name].stop()
    prefix = [*bed.host(name).command([]), "env", *(f"{k}={v}" for k, v in env.items())]
    bed.services[name] = start_service(state, prefix=prefix, notify=False)  # (no READY=1)
    try:
        yield
    finally:
        bed.services[name].stop()
        bed.services[name] = start_service(state, prefix=bed.host(name).command([]))


def _filled(bed: Testbed, env: Mapping[str, str] | None = None) -> tuple[AppProcess, str]:
    app = (
        bed.start_app("kvstore", ["--image", str(bed.image("kvstore"))], env=env)
        if env is not None
        else kvstore(bed)
    )
    for i in range(4):
        assert ask(bed, app, "src", f"PUT key{i} {f'value-{i}'.encode().hex()}") == f"OK {i + 1}"
    return app, ask(bed, app, "src", "DIGEST")


def _moved(bed: Testbed, app: AppProcess, digest: str) -> None:
    assert ask(bed, app, "dst", "DIGEST") == digest
    assert ask(bed, app, "dst", "GET key2") == "VALUE " + b"value-2".hex()
    assert ask(bed, app, "dst", "PUT after " + b"x".hex()) == "OK 5"  # an ECALL there
    finish(bed, app, expect="dst")


def _stop(agent: AgentProcess, bed: Testbed) -> str:
    agent.stop()
    bed.agents.remove(agent)
    return agent.log.read_text(errors="replace")


def test_this_tool_moves_a_process_to_an_agent_of_the_previous_release(
    bed: Testbed, previous: dict[str, str]
) -> None:
    with previous_host(bed, "dst", previous):
        agent = bed.start_agent(env=previous)
        app, digest = _filled(bed)
        run = bed.migrate(app.pid, agent)
        log = _stop(agent, bed)
        assert run.returncode == 0, run.stderr + log[-3000:]
        assert run.stats is not None
        # The offer of version 2 was refused (the old rule), version 1 then spoken:
        # no memory_bytes went out, and images_ok came without images_fs.
        assert "protocol version 2 is not 1" in log
        assert run.stats["details"]["protocol_version"] == 1
        assert run.stats["details"]["destination_images_fs"] == ""
        assert run.stats["details"]["page_path"] == "relay"  # (a need of version 1)
        _moved(bed, app, digest)


def test_this_tool_moves_a_process_post_copy_to_an_agent_of_the_previous_release(
    bed: Testbed, previous: dict[str, str]
) -> None:
    """``--post-copy`` is a need of version 1 (``versions.NEEDS``): the old agent has it."""

    with previous_host(bed, "dst", previous):
        agent = bed.start_agent(env=previous)
        app = start_workers(bed, "--workers", "2", "--max-calls", "100000")
        run = bed.migrate(app.pid, agent, args=["--post-copy"])
        log = _stop(agent, bed)
        assert run.returncode == 0, run.stderr + log[-3000:]
        assert run.stats is not None and run.stats["details"]["protocol_version"] == 1
        assert run.stats["post_copy_window"] > 0  # the pages came after the commit
        workers_carry_on(bed, app, "dst")
        workers_kept_every_write(bed, app, "dst")
        finish(bed, app, expect="dst")


def test_a_tool_of_the_previous_release_moves_a_process_to_this_agent(
    bed: Testbed, previous: dict[str, str]
) -> None:
    # With --images-in-ram: a tool that announced no memory gets the work directory.
    agent = bed.start_agent(args=["--images-in-ram"])
    with previous_host(bed, "src", previous):
        app, digest = _filled(bed, previous)
        run = bed.migrate(app.pid, agent, env=previous)
        log = _stop(agent, bed)
        assert run.returncode == 0, run.stderr + log[-3000:]
        assert "control protocol version 1 (offered 1)" in log
        assert "announced no memory size (control protocol version 1)" in log
        _moved(bed, app, digest)


def test_an_agent_that_requires_version_2_refuses_the_previous_tool_at_hello(
    bed: Testbed, previous: dict[str, str]
) -> None:
    agent = bed.start_agent(args=["--min-protocol", "2"])
    try:
        with previous_host(bed, "src", previous):
            app, digest = _filled(bed, previous)
            run = bed.migrate(app.pid, agent, env=previous)
            assert run.returncode == 6, run.stderr  # did not move: the source runs
            assert "[protocol-version]" in run.stderr
            assert "up to 1, this agent version 2" in run.stderr
            assert "upgrade migsgx on the source host" in run.stderr
            assert "Traceback" not in run.stderr
            assert ask(bed, app, "src", "DIGEST") == digest  # untouched, never frozen
            finish(bed, app, expect="src")
        # This release's tool and the same agent speak version 2, and move.
        app, digest = _filled(bed)
        run = bed.migrate(app.pid, agent)
        assert run.returncode == 0, run.stderr
        assert run.stats is not None and run.stats["details"]["protocol_version"] == 2
        _moved(bed, app, digest)
    finally:
        log = _stop(agent, bed)
    assert "control protocol version 2 (offered 2)" in log
