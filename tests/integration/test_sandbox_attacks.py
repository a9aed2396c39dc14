"""A hostile enclave tries what issue 10 saw work; inside the sandbox each attempt fails.

The hostile code is a signed enclave of an allowed author (launch control lets
it in: the author is malicious, not unknown).  Every ECALL below is one attack;
it answers ``"ok"`` when the attack worked and the exception's type and errno
when it did not.  After the attacks the platform still launches and serves.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_fixtures import World, make_image, shared_world

import migsgx
from migsgx.errors import LaunchError
from migsgx.host.client import EnclaveClient
from migsgx.sgx.image import EnclaveImage, generate_author_key, mr_signer_of
from migsgx.sgx.record_store import MAX_COUNTERS_PER_OWNER
from migsgx.sgx.sandbox import SandboxSpec, launcher_command, runtime_binds
from migsgx.sgx.spawn import ServiceProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox is built by a root service"),
]

HOSTILE_SOURCE = '''
"""A malicious enclave: each ECALL is one attack on its host."""

import ctypes
import os
import socket

from migsgx.enclave import Enclave, ecall


def _outcome(fn):
    try:
        fn()
    except OSError as exc:
        return f"{type(exc).__name__}:{exc.errno}"
    return "ok"


class Hostile(Enclave):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.secret = ctx.memory.array("secret", 4096, "uint8")

    @ecall
    def pid(self):
        return os.getpid()

    @ecall
    def append(self, path):
        def attack():
            with open(path, "ab") as f:
                f.write(b"owned by the enclave\\n")
        return _outcome(attack)

    @ecall
    def read(self, path):
        def attack():
            with open(path, "rb") as f:
                f.read(1)
        return _outcome(attack)

    @ecall
    def signal(self, pid):
        return _outcome(lambda: os.kill(pid, 9))

    @ecall
    def ptrace(self, pid):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
            return "ok"
        return f"OSError:{ctypes.get_errno()}"

    @ecall
    def network(self, family):
        def attack():
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(1)
            s.connect(("127.0.0.1", 22) if family == socket.AF_INET else "\\0migsgx-probe")
        return _outcome(attack)

    @ecall
    def run_program(self):
        return _outcome(lambda: os.execv("/usr/bin/true", ["true"]))

    @ecall
    def fork(self):
        def attack():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        return _outcome(attack)

    @ecall
    def my_log(self):
        return _outcome(lambda: open("/proc/self/fd/2", "rb").read(1))

    @ecall
    def listing(self, path):
        try:
            return sorted(os.listdir(path))
        except OSError as exc:
            return f"{type(exc).__name__}:{exc.errno}"

    @ecall
    def ids(self):
        return [list(os.getresuid()), list(os.getresgid())]

    @ecall
    def exhaust_counters(self):
        made = []
        while True:
            try:
                made.append(self.ctx.counter_create(0)[0])
            except Exception as exc:
                return [len(made), getattr(exc, "code", type(exc).__name__), made]

    @ecall
    def record_write(self, name, blob, expect=None, absent=False):
        from migsgx.sgx.store_types import RecordUpdate

        try:
            self.ctx.services.persist_update(
                name, RecordUpdate(blob, expect=expect, expect_absent=absent)
            )
        except Exception as exc:
            return getattr(exc, "code", type(exc).__name__)
        return "ok"

    @ecall
    def record_read(self, name):
        return self.ctx.services.persist_read(name)

    @ecall
    def destroy_counters(self, ids):
        for cid in ids:
            self.ctx.services.counter_destroy(cid)

    @ecall
    def status(self):
        keep = ("Seccomp:", "NoNewPrivs:", "CapEff:", "CapBnd:")
        return [line.strip() for line in open("/proc/self/status") if line.startswith(keep)]
'''

DENIED = ("PermissionError", "FileNotFoundError", "OSError:30", "OSError:1", "OSError:13")


def denied(outcome: str) -> bool:
    return outcome != "ok" and outcome.startswith(DENIED)


@pytest.fixture(scope="module")
def world() -> World:
    return shared_world()


@pytest.fixture(scope="module")
def hostile_image(world: World) -> EnclaveImage:
    # A product of its own: its quotas are not the probe's (another owner).
    return make_image(
        world.author, HOSTILE_SOURCE, name="hostile", entry="probe_enclave:Hostile",
        product_id=99,
    )  # fmt: skip


@pytest.fixture
def hostile(service: ServiceProcess, hostile_image: EnclaveImage) -> Iterator[EnclaveClient]:
    client = EnclaveClient.launch(hostile_image, socket_path=service.socket)
    yield client
    client.destroy()


def test_it_runs_as_a_uid_of_its_own_with_no_capability(hostile: EnclaveClient) -> None:
    (ruid, euid, suid), (rgid, egid, _) = hostile.ecall.ids()
    assert ruid == euid == suid != 0 and egid != 0 and rgid != egid
    status = dict(line.split(":\t") for line in hostile.ecall.status())
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == 0


def test_it_cannot_write_a_root_owned_file(hostile: EnclaveClient, tmp_path: Path) -> None:
    target = tmp_path / "host-file"
    target.write_bytes(b"host data\n")
    target.chmod(0o644)
    world_writable = tmp_path / "world-writable"
    world_writable.write_bytes(b"")
    world_writable.chmod(0o666)
    # Only files of this test: should the sandbox ever regress, nothing of the
    # host's is damaged.
    for path in (target, world_writable):
        before = path.read_bytes()
        assert denied(hostile.ecall.append(str(path)))
        assert path.read_bytes() == before


def test_it_cannot_write_the_migsgx_installation(hostile: EnclaveClient) -> None:
    installed = Path(migsgx.__file__)
    before = installed.read_bytes()
    try:
        outcome = hostile.ecall.append(str(installed))
        # Visible (it runs the enclave), but neither its owner nor writable: EACCES or EROFS.
        assert outcome in ("PermissionError:13", "OSError:30"), outcome
        assert installed.read_bytes() == before
    finally:
        if installed.read_bytes() != before:  # a regression must not break the checkout
            installed.write_bytes(before)


def test_it_cannot_signal_the_platform_the_agent_or_another_enclave(
    hostile: EnclaveClient, service: ServiceProcess, hostile_image: EnclaveImage
) -> None:
    stand_in_agent = subprocess.Popen(["sleep", "60"])  # a root process of the host
    other = EnclaveClient.launch(hostile_image, socket_path=service.socket)
    try:
        for pid in (service.process.pid, stand_in_agent.pid, other.info.pid, 1):
            assert denied(hostile.ecall.signal(pid)), pid
        assert service.process.poll() is None and stand_in_agent.poll() is None
        assert other.ecall.pid() == other.info.pid
    finally:
        other.destroy()
        stand_in_agent.kill()
        stand_in_agent.wait()


def test_it_cannot_ptrace_another_enclave(
    hostile: EnclaveClient, service: ServiceProcess, hostile_image: EnclaveImage
) -> None:
    victim = EnclaveClient.launch(hostile_image, socket_path=service.socket)
    try:
        assert hostile.ecall.ptrace(victim.info.pid) != "ok"
        assert hostile.ecall.ptrace(service.process.pid) != "ok"
        assert victim.ecall.pid() == victim.info.pid
    finally:
        victim.destroy()


def test_it_has_no_network_and_no_programs(hostile: EnclaveClient) -> None:
    import socket

    assert denied(hostile.ecall.network(socket.AF_INET))
    assert denied(hostile.ecall.network(socket.AF_UNIX))
    assert denied(hostile.ecall.run_program())
    assert denied(hostile.ecall.fork())


def test_it_sees_nothing_of_the_host(
    hostile: EnclaveClient, service: ServiceProcess, world: World, tmp_path: Path
) -> None:
    host_file = tmp_path / "readable-by-all"
    host_file.write_bytes(b"host state")
    host_file.chmod(0o644)
    assert hostile.ecall.listing("/proc") == sorted([str(hostile.info.pid), "self", "thread-self"])
    root = hostile.ecall.listing("/")
    # The sandbox binds Python, the venv and the package read-only; a checkout that
    # lives under /tmp (or /home, /var) brings that top-level name along, nothing else.
    needed = {Path(p).resolve().parts[1] for p in (sys.prefix, sys.base_prefix, migsgx.__file__)}
    for name in ("tmp", "home", "var", "root", "srv", "mnt"):
        assert name not in root or name in needed, (name, root)
    state = world.host_a.state_dir
    for path in (state / "root.key", state / "ca.pem", Path("/etc/shadow"), host_file):
        assert denied(hostile.ecall.read(str(path))), path


def test_it_cannot_read_its_own_or_another_enclaves_log(
    hostile: EnclaveClient, service: ServiceProcess, hostile_image: EnclaveImage, world: World
) -> None:
    other = EnclaveClient.launch(hostile_image, socket_path=service.socket)
    try:
        assert denied(hostile.ecall.my_log())
        assert denied(hostile.ecall.read(f"/proc/{other.info.pid}/fd/2"))
    finally:
        other.destroy()
    logs = sorted((world.host_a.state_dir / "logs").glob("enclave-*.log"))
    assert logs and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in logs)
    assert all(p.stat().st_uid == 0 for p in logs)


def test_the_platform_keeps_serving_after_the_attacks(
    hostile: EnclaveClient, service: ServiceProcess, world: World
) -> None:
    hostile.ecall.signal(service.process.pid)
    hostile.ecall.ptrace(service.process.pid)
    with EnclaveClient.launch(make_image(world.author), socket_path=service.socket) as client:
        assert client.ecall.echo("still here") == "still here"


def test_an_enclave_filling_the_stores_leaves_other_owners_unaffected(
    hostile: EnclaveClient, service: ServiceProcess, world: World
) -> None:
    count, code, made = hostile.ecall.exhaust_counters()
    try:
        assert code == "store-full" and count <= MAX_COUNTERS_PER_OWNER
        with EnclaveClient.launch(make_image(world.author), socket_path=service.socket) as other:
            cid, _ = other.ecall.ctr_create(0)
            assert other.ecall.ctr_inc(cid) == 1
            other.ecall.ctr_destroy(cid)
    finally:
        hostile.ecall.destroy_counters(made)


def test_an_enclave_cannot_overwrite_or_delete_a_record_it_has_not_read(
    hostile: EnclaveClient, service: ServiceProcess, hostile_image: EnclaveImage
) -> None:
    import hashlib
    import uuid

    name = f"victim-{uuid.uuid4().hex[:12]}"
    victim = EnclaveClient.launch(hostile_image, socket_path=service.socket)
    try:
        assert victim.ecall.record_write(name, b"the victim's record", None, True) == "ok"
        # Another enclave of the same owner, blind: overwrite, delete, or claim absence.
        assert hostile.ecall.record_write(name, b"forged") == "record-conflict"
        assert hostile.ecall.record_write(name, None) == "record-conflict"
        assert hostile.ecall.record_write(name, b"forged", bytes(32)) == "record-conflict"
        assert hostile.ecall.record_write(name, b"forged", None, True) == "counter"
        assert victim.ecall.record_read(name) == b"the victim's record"
        # Its writer, who knows what it replaces, goes on.
        seen = hashlib.sha256(b"the victim's record").digest()
        assert victim.ecall.record_write(name, None, seen) == "ok"
    finally:
        victim.destroy()


def test_the_socket_is_not_world_writable(service: ServiceProcess) -> None:
    mode = stat.S_IMODE(service.socket.stat().st_mode)
    assert mode & 0o007 == 0, oct(mode)


def test_an_unlisted_signer_cannot_launch(service: ServiceProcess, tmp_path: Path) -> None:
    stranger = generate_author_key(tmp_path / "stranger.pem")
    signer = mr_signer_of(stranger).hex()
    with pytest.raises(LaunchError, match=f"MRSIGNER {signer} is not allowed"):
        EnclaveClient.launch(make_image(stranger), socket_path=service.socket)


def test_the_launcher_makes_the_program_non_dumpable_from_exec(tmp_path: Path) -> None:
    """Checked by the program's first statement, before any import: the kernel's doing."""

    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    spec = SandboxSpec.fresh(root, runtime_binds())
    probe = "import ctypes; print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    out = subprocess.run(
        launcher_command(spec, [sys.executable, "-S", "-I", "-c", probe]),
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "0", out.stderr


def test_a_non_dumpable_enclave_is_owned_by_root_in_proc(hostile: EnclaveClient) -> None:
    """The kernel hands /proc/PID of a non-dumpable process to root: its uid has no way in."""

    pid = hostile.info.pid
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid != 0
    assert os.stat(f"/proc/{pid}/mem").st_uid == 0
    os.kill(pid, 0)  # root on the host can still reach it: the emulation's limit (security.md)
