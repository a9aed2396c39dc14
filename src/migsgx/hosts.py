"""Running emulated hosts: a platform service as a child process.

Used by the demo, the benchmarks and the integration tests; an operator runs
``migsgx platform serve`` under their own supervisor instead.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, PlatformError
from .sgx.ca import ProvisioningCA
from .sgx.image import generate_author_key, load_author_key, mr_signer_of, sign_image_dir
from .sgx.platform import EmulatedPlatform
from .sgx.service import default_socket

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"


@dataclass
class ServiceProcess:
    state: Path
    socket: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_service(
    state: Path,
    *,
    socket_path: Path | None = None,
    prefix: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float = 20.0,
) -> ServiceProcess:
    """Start ``migsgx platform serve`` (optionally under ``prefix``, e.g. ``ip netns exec``)."""

    sock = Path(socket_path or default_socket(state))
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    log = open(Path(state) / "service.log", "ab")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-P",
                "-m",
                "migsgx",
                "platform",
                "serve",
                "--state",
                str(state),
                "--socket",
                str(sock),
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    finally:
        log.close()
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None:
            raise PlatformError(
                f"platform service for {state} exited with {proc.returncode}; "
                f"see {state}/service.log"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise PlatformError(f"platform service for {state} did not start in {timeout} s")
        time.sleep(0.02)
    return ServiceProcess(Path(state), sock, proc)


@dataclass
class Deployment:
    """A CA, N host state directories, and an author key, under one directory."""

    root: Path
    ca_dir: Path
    hosts: list[Path]
    author_key: Path

    @classmethod
    def create(cls, root: Path, n_hosts: int = 2, names: Sequence[str] | None = None) -> Deployment:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        ca_dir = root / "ca"
        authority = ProvisioningCA.init(ca_dir)
        names = list(names or [chr(ord("a") + i) for i in range(n_hosts)])
        key = root / "author.pem"
        signer = mr_signer_of(generate_author_key(key))
        hosts = []
        for name in names:
            state = root / f"host-{name}"
            # Launch control: the deployment's own author is the one allowed signer.
            EmulatedPlatform.init(state, authority, host_id=name, allowed_signers=[signer])
            hosts.append(state)
        return cls(root, ca_dir, hosts, key)

    def signed_image(self, example: str, *, dest_name: str | None = None) -> Path:
        """Copy an example's enclave image into the deployment and sign it."""

        src = EXAMPLES / example / "enclave"
        if not src.is_dir():
            raise ConfigError(f"no example enclave at {src}")
        dst = self.root / "images" / (dest_name or example)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(
            src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "enclave.sig")
        )
        sign_image_dir(dst, load_author_key(self.author_key))
        return dst


@contextlib.contextmanager
def running_services(states: Sequence[Path]) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    try:
        for s in states:
            started.append(start_service(s))
        yield started
    finally:
        for svc in started:
            svc.stop()
