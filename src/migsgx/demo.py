"""``migsgx demo``: two emulated hosts and the key-value enclave app.

Runs on embedded defaults with no configuration: a fresh CA, two hosts each
with its own platform service, the example key-value store launched on host A
and used, its measurement and a verified remote attestation shown, and the
host binding of sealing demonstrated on host B.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import ConfigError, SealError
from .host.client import EnclaveClient
from .hosts import Deployment, running_services
from .sgx.ca import load_root
from .sgx.quote import verify_quote


def run_demo(workdir: Path | None = None, console: Console | None = None) -> dict[str, object]:
    console = console or Console()
    own_dir = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="migsgx-demo-"))
    if not own_dir and root.exists() and any(root.iterdir()):
        raise ConfigError(f"demo work directory {root} is not empty")
    summary: dict[str, object] = {}
    try:
        with console.status("creating a CA and two emulated hosts"):
            dep = Deployment.create(root, names=["a", "b"])
            image = dep.signed_image("kvstore")
        console.print(f"[bold]deployment[/] in {root}: CA, host a, host b, signed kvstore image")
        with running_services(dep.hosts) as (host_a, host_b):
            t0 = time.perf_counter()
            log: list[str] = []
            kv = EnclaveClient.launch(image, socket_path=host_a.socket, ocalls={"log": log.append})
            launch_s = time.perf_counter() - t0
            console.print(
                f"launched [bold]kvstore[/] on host a in {launch_s * 1000:.0f} ms "
                f"(enclave pid {kv.info.pid}, {kv.info.thread_slots} thread slots)"
            )
            secret = "canary-" + secrets.token_hex(8)
            for i in range(5):
                kv.ecall.put(f"user{i}", f"{secret}-{i}".encode())
            assert kv.ecall.get("user3") == f"{secret}-3".encode()
            n = 500
            t0 = time.perf_counter()
            for _ in range(n):
                kv.ecall.get("user0")
            rtt_us = (time.perf_counter() - t0) / n * 1e6
            kv.ecall.log_event("five secrets stored")

            nonce = os.urandom(32)
            verified = verify_quote(kv.ecall.attest(nonce), [load_root(dep.ca_dir)])
            bound = verified.body.report_data == hashlib.sha512(b"kvstore-attest" + nonce).digest()

            blob = kv.ecall.seal_value("user1")
            on_b = EnclaveClient.launch(image, socket_path=host_b.socket)
            try:
                on_b.ecall.unseal_value("user1", blob)
                sealed_moved = "unsealed on host b (unexpected!)"
            except SealError as exc:
                sealed_moved = f"refused on host b: {exc}"
            on_b.destroy()
            stats = kv.ecall.stats()
            kv.destroy()

        table = Table(title="kvstore enclave on host a", show_header=False)
        table.add_row("MRENCLAVE", kv.info.mr_enclave.hex())
        table.add_row("MRSIGNER", kv.info.mr_signer.hex())
        table.add_row("product id / SVN", f"{kv.info.isv_prod_id} / {kv.info.isv_svn}")
        table.add_row("keys stored", str(stats["keys"]))
        table.add_row("ECALL round trip", f"{rtt_us:.0f} µs (mean of {n})")
        table.add_row("enclave launch", f"{launch_s * 1000:.0f} ms")
        table.add_row("quote verified", f"{verified.pck_subject}, nonce bound: {bound}")
        table.add_row("OCALL received", log[0] if log else "-")
        table.add_row("sealed on a, unseal on b", sealed_moved)
        console.print(table)
        summary = {
            "mr_enclave": kv.info.mr_enclave.hex(),
            "ecall_rtt_us": rtt_us,
            "launch_ms": launch_s * 1000,
            "quote_nonce_bound": bound,
        }
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    return summary
