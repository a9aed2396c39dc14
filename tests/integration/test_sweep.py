"""A dead lab run's leftovers are swept, and nothing else (``migsgx.lab.sweep``).

Planted, as an interrupted run leaves them: a container lab whose owner is gone,
with a ``runc restore`` stand-in naming its runc root (and a child, as CRIU and
the restored app are), a process in one of its cgroups, a pod namespace with a
process inside; a lab whose owner's pid was reused since (another start time);
host namespaces of a dead owner (a process inside) and of a reused pid; platform
services and enclave runtimes that carry a dead run's tag. Next to them what must
stay: a live run's lab, namespaces and processes, and a user's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.lab.hosts import Deployment, ServiceProcess, start_service
from migsgx.lab.netns import NETNS_DIR, PREFIX, run_tag, terminate
from migsgx.lab.sweep import LAB_PREFIX, LAB_ROOT, OWNER_FILE, RUN_ENV, lab_directories, sweep
from migsgx.system.process import process_state, tree_pids

pytestmark = pytest.mark.integration

PIDS_HIERARCHY = Path("/sys/fs/cgroup/pids")


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def wait_until_tree(root: int, size: int) -> None:
    """Until the tree of ``root`` has ``size`` processes (a shell's child has started)."""

    deadline = time.monotonic() + 30
    while len(tree_pids(root)) < size:
        assert time.monotonic() < deadline, f"the tree of {root} never grew to {size}"
        time.sleep(0.01)


def _gone(pid: int) -> bool:
    return process_state(pid) in ("", "Z", "X")


class Plant:
    """What the test planted; removed at its end whatever the sweep did."""

    def __init__(self) -> None:
        self.dirs: list[Path] = []
        self.netns: list[str] = []
        self.cgroups: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def lab(self, pid: int, start: str) -> tuple[Path, str]:
        token = secrets.token_hex(3)
        path = LAB_ROOT / f"{LAB_PREFIX}{pid}-{token}"
        (path / "src" / "runc").mkdir(parents=True)
        (path / OWNER_FILE).write_text(f"{pid} {start}\n")
        self.dirs.append(path)
        return path, token

    def namespace(self, name: str) -> str:
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
        self.netns.append(name)
        return name

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def in_cgroup(self, cgroup: Path) -> subprocess.Popen[bytes]:
        (cgroup / "app").mkdir(parents=True)
        self.cgroups.append(cgroup)
        proc = self.start(["sleep", "600"])
        (cgroup / "app" / "cgroup.procs").write_text(str(proc.pid))
        return proc

    def remove(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its session's group: a shell's child too
            proc.wait(timeout=10)
        for name in self.netns:
            if (NETNS_DIR / name).exists():
                subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)
        for cgroup in self.cgroups:
            for sub in (cgroup / "app", cgroup):
                if sub.exists():
                    sub.rmdir()
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plant(require_root: None, subreaper: None) -> Iterator[Plant]:
    planted = Plant()
    try:
        yield planted
    finally:
        planted.remove()


def test_only_what_dead_runs_of_the_lab_left_is_swept(plant: Plant) -> None:
    me, my_start = run_tag()
    dead = _dead_pid()

    # A lab whose owner died: its daemons, a cgroup's process, a pod namespace's process.
    lab, token = plant.lab(dead, "4242")
    restore = plant.start(["sh", "-c", "sleep 600 & wait", "runc", "--root", str(lab / "src/runc")])
    in_cgroup = plant.in_cgroup(PIDS_HIERARCHY / f"{LAB_PREFIX}{token}-src")
    pod = plant.namespace(f"{LAB_PREFIX}{token}-src-app")
    in_pod = plant.start(["ip", "netns", "exec", pod, "sleep", "600"])
    # A lab of a pid that was reused since: the tag's start time differs.
    reused_lab, _ = plant.lab(me, str(int(my_start) + 1))
    # A live run's lab (this process), with its daemon and cgroup.
    live_lab, live_token = plant.lab(me, my_start)
    live_daemon = plant.start(["sh", "-c", "sleep 600", "runc", "--root", str(live_lab / "src")])
    live_in_cgroup = plant.in_cgroup(PIDS_HIERARCHY / f"{LAB_PREFIX}{live_token}-src")
    live_pod = plant.namespace(f"{LAB_PREFIX}{live_token}-src-app")
    # Host namespaces: a dead owner's (a process inside), a reused pid's, a live run's.
    token = secrets.token_hex(3)
    dead_host = plant.namespace(f"{PREFIX}{dead}.4242-{token}-src")
    in_dead_host = plant.start(["ip", "netns", "exec", dead_host, "sleep", "600"])
    reused_host = plant.namespace(f"{PREFIX}{me}.{int(my_start) + 1}-{token}-src")
    live_host = plant.namespace(f"{PREFIX}{me}.{my_start}-{token}-src")
    # A user's: a namespace and a process without the lab's name.
    user_ns = plant.namespace(f"user-{token}")
    user_proc = plant.start(["sleep", "600"])
    wait_until_tree(restore.pid, 2)
    doomed = [*tree_pids(restore.pid), in_cgroup.pid, in_pod.pid, in_dead_host.pid]
    assert len(doomed) == 5 and not any(_gone(pid) for pid in doomed)

    removed = sweep()

    assert {str(lab), str(reused_lab), dead_host, reused_host} <= set(removed)
    for pid in doomed:  # killed (the sweep reaped those that are this process's children)
        terminate(pid, sig=0, timeout=10)
        assert _gone(pid)
    assert not lab.exists() and not reused_lab.exists()
    assert not (PIDS_HIERARCHY / f"{LAB_PREFIX}{token}-src").exists()
    assert not (NETNS_DIR / pod).exists()
    assert not (NETNS_DIR / dead_host).exists() and not (NETNS_DIR / reused_host).exists()
    # What a live run and a user started stays.
    for proc in (live_daemon, live_in_cgroup, user_proc):
        assert proc.poll() is None
    assert live_lab.exists() and (live_lab / OWNER_FILE).exists()
    assert live_lab in [d.path for d in lab_directories()]
    for name in (live_pod, live_host, user_ns):
        assert (NETNS_DIR / name).exists()
    assert str(live_lab) not in removed and live_host not in removed


def test_a_lab_of_an_older_run_without_an_owner_file_goes_by_its_pid(plant: Plant) -> None:
    """Labs made before the run tag: only the pid in the name tells; a live one stays."""

    dead_lab, _ = plant.lab(_dead_pid(), "1")
    live_lab, _ = plant.lab(os.getpid(), "1")
    for path in (dead_lab, live_lab):
        (path / OWNER_FILE).unlink()
    removed = sweep()
    assert str(dead_lab) in removed and not dead_lab.exists()
    assert str(live_lab) not in removed and live_lab.exists()


def test_processes_a_dead_run_started_outside_its_namespaces_are_swept(
    plant: Plant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Platform services started with no host namespace, and enclave runtimes that
    outlived their service, carry their run's tag (``MIGSGX_LAB_RUN``): swept when
    that run is gone; a live run's, a user's and a malformed tag's stay."""

    me, my_start = run_tag()
    dead = _dead_pid()
    deployment = Deployment.create(tmp_path / "d", names=["dead", "reused", "live"])
    services: list[ServiceProcess] = []
    try:
        started: dict[str, list[int]] = {}
        for tag, state in zip(
            (f"{dead}.4242", f"{me}.{int(my_start) + 1}", f"{me}.{my_start}"),
            deployment.hosts,
            strict=True,
        ):
            monkeypatch.setenv(RUN_ENV, tag)
            service = start_service(state, extra_args=["--warm-spare"])
            services.append(service)
            wait_until_tree(service.process.pid, 2)  # its warm spare: an enclave runtime
            started[tag] = tree_pids(service.process.pid)
        monkeypatch.setenv(RUN_ENV, "not-a-tag")
        odd = plant.start(["sleep", "600"])
        monkeypatch.delenv(RUN_ENV)
        user = plant.start(["sleep", "600"])
        monkeypatch.setenv(RUN_ENV, f"{me}.{my_start}")
        # The dead run's service was killed with the run: its enclave runtime lives on,
        # an orphan outside every namespace.
        _service, orphan = started[f"{dead}.4242"]
        services[0].process.kill()
        services[0].process.wait()
        doomed = [orphan, *started[f"{me}.{int(my_start) + 1}"]]
        assert len(doomed) == 3 and not any(_gone(pid) for pid in doomed)

        removed = sweep()

        # Named: the orphan, and the service (its spare goes with its tree).
        for pid in doomed[:2]:
            assert any(line.startswith(f"process {pid} ") for line in removed), removed
        for pid in doomed:
            terminate(pid, sig=0, timeout=10)
            assert _gone(pid)
        services[1].process.wait(timeout=10)  # (ours: reaped)
        for pid in started[f"{me}.{my_start}"]:  # the live run's service and enclave stay
            assert not _gone(pid)
        assert odd.poll() is None and user.poll() is None
        assert not any(f"process {pid} " in " ".join(removed) for pid in (odd.pid, user.pid))
    finally:
        for service in services:
            service.stop()
        for pids in started.values():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
