"""Fixtures for tests with real processes, namespaces and CRIU.

Everything a test starts is stopped at teardown, also when the test fails:
processes through :func:`migsgx.lab.netns.terminate`, namespaces through
:class:`migsgx.lab.netns.HostNetwork`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from platform_fixtures import World
from zombies import reap_orphans

from migsgx.criu import Criu
from migsgx.errors import CriuError, MigSGXError
from migsgx.lab.containers import ContainerLab
from migsgx.lab.hosts import ServiceProcess, start_service
from migsgx.lab.netns import Host, HostNetwork, terminate
from migsgx.lab.sweep import sweep
from migsgx.lab.testbed import AgentProcess, Testbed

# The shared helper modules' asserts explain themselves like a test's own: registered
# once here, before any test module imports them.
pytest.register_assert_rewrite(
    "bed_helpers", "fault_helpers", "proc_helpers", "pstore_image", "state_helpers"
)

_PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CRIU, network namespaces)")


@pytest.fixture(scope="session")
def criu(require_root: None) -> Criu:
    """A working CRIU, driven over RPC; skips (fails in CI) when there is none."""

    try:
        found = Criu()
        found.check()
    except CriuError as exc:
        pytest.skip(f"no working CRIU: {exc}")
    return found


@pytest.fixture(scope="session")
def subreaper() -> Iterator[None]:
    """Make this process the subreaper of orphans (detached restored processes).

    The machine's init does not reap zombies, so a restored process that is
    killed would linger as a zombie; as subreaper the test process reaps it.
    """

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    yield
    reap_orphans()


@pytest.fixture(autouse=True)
def _orphans_reaped() -> Iterator[None]:
    """After every test: the orphans this process adopted as subreaper are reaped.

    Without it they stayed zombies until the session ended. Children a test
    started itself are not touched here (their ``Popen`` waits for them); one
    left unwaited fails its module (``zombies.no_zombie_children``).
    """

    yield
    reap_orphans()


@pytest.fixture(scope="session")
def _stale_namespaces_removed(require_root: None) -> None:
    """What dead lab runs left (their container labs, then their hosts) is swept first;
    never what a live run or a user started (:mod:`migsgx.lab.sweep`)."""

    sweep()


@pytest.fixture(scope="module")
def bed(
    request: pytest.FixtureRequest,
    criu: Criu,
    subreaper: None,
    _stale_namespaces_removed: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Testbed]:
    """Two namespaced hosts with platform services, CA and agent identities, per module.

    The module names the subnet it prefers (``BED_SUBNET``); the bed claims the
    first free one from there (:mod:`migsgx.lab.subnets`), so beds that exist at
    the same time (in one run, or in parallel runs of the same module) never share
    addresses.
    ``BED_BRIDGED = True`` puts the hosts on a bridge (containers that own their
    address, :mod:`migsgx.lab.netns`).
    """

    module = request.module
    name = module.__name__.rpartition(".")[2].removeprefix("test_")
    bridged = getattr(module, "BED_BRIDGED", False)  # hosts on a bridge: addresses can move
    with Testbed(tmp_path_factory.mktemp(name), subnet=module.BED_SUBNET, bridged=bridged) as bed:
        yield bed


@pytest.fixture(scope="module")
def agent(request: pytest.FixtureRequest, bed: Testbed) -> AgentProcess:
    """The destination's agent for the module (a module may start it otherwise).

    A module with ``BED_CONTAINERS = True`` gets its ``lab`` first, whichever test
    asks first: the agent reads the host's ``containers.toml`` when it starts, and
    the lab writes it.
    """

    if getattr(request.module, "BED_CONTAINERS", False):
        request.getfixturevalue("lab")
    return bed.start_agent()


@pytest.fixture(scope="module")
def lab(bed: Testbed, criu: Criu) -> Iterator[ContainerLab]:
    """runc, podman and containerd on the module's testbed (a module that uses it sets
    ``BED_CONTAINERS = True``, so that the ``agent`` starts after it)."""

    with ContainerLab(bed, criu=criu) as containers:
        yield containers


@pytest.fixture(scope="module")
def service(
    request: pytest.FixtureRequest, world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A platform service of the shared world's host A for the module, without namespaces
    (its socket in a directory of the module's own); stopped at the module's end."""

    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    sock = tmp_path_factory.mktemp(name) / "platform.sock"
    svc = start_service(world.host_a.state_dir, socket_path=sock)
    try:
        yield svc
    finally:
        svc.stop()


HostsFactory = Callable[..., HostNetwork]


@pytest.fixture
def hosts(_stale_namespaces_removed: None) -> Iterator[HostsFactory]:
    """``hosts("src", "dst", subnet=0)`` -> an open :class:`HostNetwork`, closed at teardown."""

    made: list[HostNetwork] = []

    def make(*names: str, subnet: int = 0) -> HostNetwork:
        net = HostNetwork(names, subnet=subnet)
        net.create()
        made.append(net)
        return net

    yield make
    errors: list[MigSGXError] = []
    for net in reversed(made):
        try:
            net.close()
        except MigSGXError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


SpawnFactory = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[SpawnFactory]:
    """Start a detached process (own session, stdin /dev/null, output to files).

    ``spawn(argv, host=None, name="proc")`` writes ``<name>.out``/``<name>.err``
    under the test's ``tmp_path``. Every process is killed at teardown.
    """

    started: list[subprocess.Popen[bytes]] = []

    def start(
        argv: Sequence[str], host: Host | None = None, name: str = "proc"
    ) -> subprocess.Popen[bytes]:
        with (
            open(tmp_path / f"{name}.out", "wb") as out,
            open(tmp_path / f"{name}.err", "wb") as err,
        ):
            if host is not None:
                proc = host.spawn(argv, stdout=out, stderr=err)
            else:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session and group
            proc.wait(timeout=10)


@pytest.fixture
def kill_later() -> Iterator[Callable[[int], int]]:
    """Register a pid (e.g. of a restored process) to be killed and reaped at teardown."""

    pids: list[int] = []

    def register(pid: int) -> int:
        pids.append(pid)
        return pid

    yield register
    for pid in pids:
        with contextlib.suppress(MigSGXError):
            terminate(pid)


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, dict[str, object]]]:
    """A fault-matrix module's figures per cell, printed as ``fault-matrix {...}`` at its end.

    Cells that run several times keep ``source_back_runs``: min / median / max of them.
    """

    table: dict[str, dict[str, object]] = {}
    yield table
    for cell in table.values():
        runs = cell.pop("source_back_runs", None)
        if isinstance(runs, list) and runs:
            cell["source_back_seconds"] = {
                "min": min(runs), "median": round(statistics.median(runs), 3),
                "max": max(runs), "runs": len(runs),
            }  # fmt: skip
    line = "fault-matrix " + json.dumps(table, sort_keys=True)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        sys.stdout.write("\n" + line + "\n")
        sys.stdout.flush()
