"""Shared objects for the platform tests: a CA, platforms, author keys, enclave images.

RSA-3072 key generation costs about 0.3 s, so the expensive objects are made once
per test session by :func:`shared_world` and removed when the interpreter exits.
tests/unit/conftest.py makes it the ``world`` fixture of every unit test; an
integration module registers it with a one-line wrapper, e.g.::

    @pytest.fixture(scope="session")
    def world() -> World:
        return shared_world()

``PROBE_SOURCE`` is a test enclave whose ECALLs each probe one property of the
platform; the unit tests run it in memory (``EnclaveInstance``), the integration
tests in a real enclave process started by a platform service.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from migsgx import _proc
from migsgx.sgx.ca import ProvisioningCA
from migsgx.sgx.image import (
    MANIFEST,
    SIGNATURE,
    EnclaveImage,
    generate_author_key,
    mr_signer_of,
    sign_image,
)
from migsgx.sgx.platform import EmulatedPlatform
from migsgx.sgx.structs import FLAG_DEBUG, FLAG_INIT, FLAG_MODE64BIT, Attributes, ReportBody

PROBE_MODULE = "probe_enclave"
PROBE_ENTRY = f"{PROBE_MODULE}:Probe"

PROBE_SOURCE = '''
"""Test enclave: each ECALL probes one property of the platform."""

import os

import numpy as np

from migsgx.enclave import Enclave, EnclaveError, ecall
from migsgx.sgx.structs import KEYNAME_SEAL, KeyRequest, Report, TargetInfo
from migsgx.wire import recv_frame, send_frame
from migsgx.channel import PLATFORM


class Probe(Enclave):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.cells = ctx.memory.array("cells", 4096, np.uint8)

    @ecall
    def echo(self, value):
        return value

    @ecall
    def add(self, a, b):
        return a + b

    @ecall
    def whoami(self):
        return {"pid": os.getpid(), "ppid": os.getppid()}

    @ecall
    def gate(self, tag):
        """Holds its thread slot until the application's OCALL handler returns."""
        return self.ctx.ocall("gate", tag)

    @ecall
    def ocall_echo(self, value):
        return self.ctx.ocall("echo", value)

    @ecall
    def fail(self, secret):
        raise ValueError(f"the secret is {secret}")

    @ecall
    def fail_typed(self, text):
        raise EnclaveError(text)

    @ecall
    def store(self, data):
        self.cells[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        return len(data)

    @ecall
    def load(self, n):
        return self.cells[:n].tobytes()

    @ecall
    def seal_key(self, policy, key_id, isv_svn=None):
        ident = self.ctx.identity
        svn = ident.isv_svn if isv_svn is None else isv_svn
        request = KeyRequest(
            KEYNAME_SEAL, key_policy=policy, isv_svn=svn, cpu_svn=ident.cpu_svn, key_id=key_id
        )
        return self.ctx.services.get_key(request)

    @ecall
    def seal(self, data, policy, aad=b""):
        return self.ctx.seal(data, aad=aad, policy=policy)

    @ecall
    def unseal(self, blob):
        return self.ctx.unseal(blob)

    @ecall
    def quote(self, report_data):
        return self.ctx.quote(report_data)

    @ecall
    def target(self):
        return self.ctx.self_target().pack()

    @ecall
    def report_for(self, target, report_data):
        return self.ctx.report(TargetInfo.unpack(target), report_data).pack()

    @ecall
    def verify_report(self, report):
        return self.ctx.verify_report(Report.unpack(report)).pack()

    @ecall
    def ctr_create(self, initial=0):
        return list(self.ctx.counter_create(initial))

    @ecall
    def ctr_read(self, cid):
        return self.ctx.counter_read(cid)

    @ecall
    def ctr_inc(self, cid, by=1):
        return self.ctx.counter_increment(cid, by)

    @ecall
    def ctr_destroy(self, cid):
        self.ctx.services.counter_destroy(cid)

    @ecall
    def raw_platform(self, frame):
        """Send a frame of our choosing on the private platform channel."""
        sock = self.ctx.services._sock
        with self.ctx.services._lock:
            try:
                send_frame(sock, frame)
                reply = recv_frame(sock, PLATFORM)
            except Exception as exc:
                return ["failed", type(exc).__name__]
        return ["reply", reply]

    @ecall
    def read_file(self, path):
        with open(path, "rb") as f:
            return f.read()

    @ecall
    def service_state_dir(self):
        argv = open(f"/proc/{os.getppid()}/cmdline", "rb").read().split(b"\\0")
        return argv[argv.index(b"--state") + 1].decode()

    @ecall
    def capabilities(self):
        status = open("/proc/self/status").read()
        return {k: status.split(k + ":")[1].split()[0] for k in ("CapEff", "CapPrm", "CapBnd")}

    @ecall
    def unmount(self, path):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(path.encode(), 2) != 0:  # MNT_DETACH
            return os.strerror(ctypes.get_errno())
        return "unmounted"

    @ecall
    def peek(self, pid, needle):
        """Search another process's writable memory for ``needle``."""
        found = False
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for line in maps:
                fields = line.split()
                if "rw" not in fields[1] or len(fields) > 5 and fields[5].startswith("/"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if end - start > 256 << 20:
                    continue
                try:
                    mem.seek(start)
                    if needle in mem.read(end - start):
                        found = True
                        break
                except OSError:
                    continue
        return found

    @ecall
    def big_result(self, n):
        return b"x" * n

    @ecall
    def unencodable(self):
        return object()
'''


def manifest_toml(
    *,
    name: str = "probe",
    entry: str = PROBE_ENTRY,
    memory_size: str | int = "1MiB",
    thread_slots: int = 4,
    product_id: int = 7,
    svn: int = 1,
    debug: bool = False,
) -> bytes:
    size = f'"{memory_size}"' if isinstance(memory_size, str) else str(memory_size)
    return (
        "[enclave]\n"
        f'name = "{name}"\n'
        f'entry = "{entry}"\n'
        f"memory_size = {size}\n"
        f"thread_slots = {thread_slots}\n"
        f"product_id = {product_id}\n"
        f"svn = {svn}\n"
        f"debug = {'true' if debug else 'false'}\n"
    ).encode()


def image_files(source: str = PROBE_SOURCE, **manifest: object) -> dict[str, bytes]:
    """The files of an unsigned probe-like image (manifest fields as keywords)."""

    return {
        MANIFEST: manifest_toml(**manifest),  # type: ignore[arg-type]
        f"{PROBE_MODULE}.py": source.encode(),
    }


def signed(files: Mapping[str, bytes], key: rsa.RSAPrivateKey) -> EnclaveImage:
    """The image of ``files`` (any old signature dropped) signed with ``key``."""

    unsigned = {n: d for n, d in files.items() if n != SIGNATURE}
    image = EnclaveImage.from_files(unsigned)
    return EnclaveImage.from_files({**unsigned, SIGNATURE: sign_image(image, key).pack()})


def make_image(
    key: rsa.RSAPrivateKey, source: str = PROBE_SOURCE, **manifest: object
) -> EnclaveImage:
    return signed(image_files(source, **manifest), key)


def write_image(directory: Path, image: EnclaveImage) -> Path:
    """Write an in-memory image as an image directory."""

    directory.mkdir(parents=True, exist_ok=True)
    for name, data in image.files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


@dataclass
class World:
    """A CA, three emulated hosts and two enclave authors, in one directory."""

    root: Path
    ca_dir: Path
    ca: ProvisioningCA
    host_a: EmulatedPlatform
    host_b: EmulatedPlatform
    host_old_cpu: EmulatedPlatform  # a host whose CPUSVN is lower than the others'
    author: rsa.RSAPrivateKey
    author_path: Path
    other_author: rsa.RSAPrivateKey

    def identity(self, image: EnclaveImage, host: EmulatedPlatform | None = None) -> ReportBody:
        return (host or self.host_a).einit(image)[0]


_WORLD: World | None = None
_WORLD_LOCK = threading.Lock()


def shared_world() -> World:
    global _WORLD
    with _WORLD_LOCK:
        if _WORLD is None:
            root = Path(tempfile.mkdtemp(prefix="migsgx-test-world-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            ca = ProvisioningCA.init(root / "ca")
            author_path = root / "author.pem"
            author = generate_author_key(author_path)
            other_author = generate_author_key(root / "other-author.pem")
            # Launch control: both test authors may launch on every test host.
            signers = [mr_signer_of(author), mr_signer_of(other_author)]
            _WORLD = World(
                root=root,
                ca_dir=root / "ca",
                ca=ca,
                host_a=EmulatedPlatform.init(
                    root / "host-a", ca, host_id="a", allowed_signers=signers
                ),
                host_b=EmulatedPlatform.init(
                    root / "host-b", ca, host_id="b", allowed_signers=signers
                ),
                host_old_cpu=EmulatedPlatform.init(
                    root / "host-old",
                    ca,
                    host_id="old",
                    cpu_svn=bytes([1] * 16),
                    allowed_signers=signers,
                ),
                author=author,
                author_path=author_path,
                other_author=other_author,
            )
        return _WORLD


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` passes; return its last value."""

    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""

    return _proc.state(pid) not in ("", "Z")


def parent_of(pid: int) -> int:
    parent = _proc.parent(pid)
    if parent is None:
        raise ProcessLookupError(f"no process {pid}")
    return parent


def ancestors(pid: int) -> list[int]:
    """``pid``'s parent, grandparent, ... up to pid 1 (from /proc/PID/stat)."""

    chain = []
    while pid > 1:
        pid = parent_of(pid)
        chain.append(pid)
    return chain


def children_of(pid: int) -> list[int]:
    """The live children of ``pid`` (from a scan: the kernel's ``children`` file may pass
    over one)."""

    return [child for child in _proc.scanned_children(pid) if pid_alive(child)]


def report_body(*, debug: bool = False, report_data: bytes = bytes(range(64))) -> ReportBody:
    """A fixed enclave identity to quote (no enclave behind it): the quote and DCAP tests
    sign and verify it; ``debug`` sets the debug attribute a verifier must refuse."""

    flags = FLAG_INIT | FLAG_MODE64BIT | (FLAG_DEBUG if debug else 0)
    return ReportBody(
        mr_enclave=hashlib.sha256(b"enclave").digest(),
        mr_signer=hashlib.sha256(b"author").digest(),
        attributes=Attributes(flags),
        isv_prod_id=3,
        isv_svn=4,
        report_data=report_data,
    )
