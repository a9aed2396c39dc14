"""Emulated deployments for the demo, the benchmarks and the tests: a CA, hosts, a signer.

Starting a host's service is product code (:mod:`migsgx.sgx.spawn`); it is
re-exported here because every harness that makes a deployment also starts one.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..sgx.ca import ProvisioningCA
from ..sgx.image import generate_author_key, load_author_key, mr_signer_of, sign_image_dir
from ..sgx.platform import EmulatedPlatform
from ..sgx.spawn import ServiceProcess, start_service
from .examples import examples_dir

__all__ = ["EXAMPLES", "Deployment", "ServiceProcess", "running_services", "start_service"]

EXAMPLES = examples_dir()


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
