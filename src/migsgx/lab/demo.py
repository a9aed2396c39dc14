"""``migsgx demo``: a live migration of an enclave application between two hosts.

Runs on embedded defaults with no configuration (as root): a fresh CA, two
hosts in network namespaces on this machine (each with its own platform
service; an agent on the destination), the example key-value application with
a secret in its enclave on the source, a client that keeps using it, then one
``migsgx migrate --live``; finally the state is compared and every file the
migration left (CRIU images, logs, state directories, temp files) is scanned
for the secret.

By default the application runs in a runc container that owns its address (a
network namespace of its own on the hosts' shared bridge, as CNI would make
it): the address moves with the container, and the client keeps one TCP
connection open across the move (``--tcp-established``): it sees no failed
request.  ``migsgx demo --process`` migrates a plain process instead, and
``--container runc`` (or ``podman``, ``containerd``) a container that shares its
host's network namespace; there the client reconnects to the other host after
the move (about one failed request).
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import ConfigError, MigSGXError
from ..host.client import EnclaveClient


class _Client(threading.Thread):
    """Keeps reading and writing through the application while it moves."""

    def __init__(self, bed: Any, port: int) -> None:
        super().__init__(name="demo-client", daemon=True)
        self.bed, self.port = bed, port
        self.at = "src"
        self.ok = 0
        self.failed = 0
        self.last_acked = ""
        self.last_ok_src = 0.0
        self.first_ok_dst = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        deadline = time.monotonic() + 300  # bounded whatever happens
        while not self.stop.is_set() and time.monotonic() < deadline:
            n += 1
            try:
                reply = self.bed.ask(f"PUT client {n:08x}", self.port, at=self.at, via="dst")
                if not reply.startswith("OK"):
                    raise MigSGXError(reply)
                self.ok += 1
                self.last_acked = f"{n:08x}"
                now = time.monotonic()
                if self.at == "src":
                    self.last_ok_src = now
                elif not self.first_ok_dst:
                    self.first_ok_dst = now
            except (OSError, MigSGXError):
                self.failed += 1
                # The process has moved (or is moving): try the other host next.
                self.at = "dst" if self.at == "src" else "src"
            time.sleep(0.02)


class _KeptClient(threading.Thread):
    """Writes through one TCP connection to the application's own address, kept open."""

    def __init__(self, lab: Any, app: Any) -> None:
        super().__init__(name="demo-client", daemon=True)
        self.lab, self.app = lab, app
        self.ok = 0
        self.failed = 0
        self.connections = 0
        self.last_acked = ""
        self.gap = 0.0  # the longest wait for one answer
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        deadline = time.monotonic() + 300  # bounded whatever happens
        stream = None
        while not self.stop.is_set() and time.monotonic() < deadline:
            n += 1
            try:
                if stream is None:
                    conn = self.lab.connect(self.app, via="dst")
                    stream = conn.makefile("rw", encoding="utf-8", newline="\n")
                    conn.close()  # the file holds it
                    self.connections += 1
                t0 = time.monotonic()
                stream.write(f"PUT client {n:08x}\n")
                stream.flush()
                reply = stream.readline().strip()
                if not reply.startswith("OK"):
                    raise MigSGXError(reply or "the connection closed")
                self.gap = max(self.gap, time.monotonic() - t0)
                self.ok += 1
                self.last_acked = f"{n:08x}"
            except (OSError, MigSGXError):
                self.failed += 1
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
                stream = None  # a new connection, to the same address
            time.sleep(0.02)
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _scan(roots: list[Path], needles: list[bytes], since: float) -> int:
    """How often the needles occur in the regular files under ``roots`` written or changed
    since ``since`` (wall clock): the needles are made after it, so an older file cannot
    hold one.  A shared ``/tmp`` holds other users' files by the hundred thousand; reading
    them all made the scan most of the demo's time.  One ``scandir`` entry per file, no
    symbolic link followed, a root inside another root scanned once."""

    found = 0
    tops = [str(r) for r in roots]
    stack = [t for t in tops if not any(t != o and t.startswith(o + os.sep) for o in tops)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if max(st.st_mtime, st.st_ctime) < since:
                        continue
                    data = Path(entry.path).read_bytes()
                except OSError:
                    continue  # gone meanwhile, or unreadable
                found += sum(data.count(n) for n in needles)
    return found


def _memory_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """How the container's (or process's) memory moved: post-copy, or frozen and why."""

    details = stats["details"]
    memory = details.get("memory") or {}
    size = f"{memory.get('private_bytes', 0) / (1 << 20):.1f} MiB"
    window = stats.get("post_copy_window")
    if window is not None:
        # Post-copy: the process's memory came after the commit; until its last page
        # the destination needed the source.
        return [
            (f"process memory ({size})", "post-copy, after the commit"),
            ("  post-copy window (dst needs src)", f"{window:.3f} s"),
            ("  moved frozen (images, no page)", f"{details['image_bytes']:,} bytes"),
            ("  process downtime (dump to resumed)", f"{details['process_downtime']:.3f} s"),
        ]
    rows = [(f"process memory ({size})", "moved while frozen")]
    if memory.get("post_copy_min"):
        # --live chose it: post-copy's own costs outweigh so little memory.
        limit = f"{memory['post_copy_min'] / (1 << 20):.0f} MiB"
        rows.append((f"  below --post-copy-min {limit}", "faster than post-copy here"))
    return rows


def summary(
    title: str,
    stats: dict[str, Any],
    clients: list[tuple[str, str]],
    checks: list[tuple[str, str]],
) -> Table:
    """The demo's closing table: the downtime step by step, how the memory moved, the
    client's view and the checks (labels short enough for 80 columns)."""

    table = Table(title=title, show_header=False)
    details = stats["details"]
    # The downtime's steps in their order (the last enclave round runs beside CRIU's dump).
    table.add_row("downtime (ECALLs blocked to resumed)", f"{stats['downtime']:.3f} s")
    for label, value in (
        ("freeze (enclaves handed over)", stats["freeze"]),
        ("criu_dump (tree frozen, dumped)", stats["criu_dump"]),
        ("enclave_dump (beside criu_dump)", stats["enclave_dump"]),
        ("transfer (images to dst)", stats["transfer"]),
        ("restore (dst tree restored, held)", stats["restore"]),
        ("commit (the enclaves decide)", details["commit"]),
        ("resume (dst runs, enclaves attached)", details["resume"]),
    ):
        table.add_row(f"  {label}", f"{value:.3f} s")
    table.add_row("total", f"{stats['total']:.3f} s")
    table.add_row("  pre-copy (application running)", f"{stats.get('precopy', 0.0):.3f} s")
    table.add_row("  enclave on dst (connected to loaded)", f"{stats['enclave_load']:.3f} s")
    table.add_row("bytes moved", f"{stats['bytes']:,}")
    for label, value in [*_memory_rows(stats), *clients, *checks]:
        table.add_row(label, value)
    return table


def run_demo(
    workdir: Path | None = None,
    console: Console | None = None,
    *,
    container: str | None = None,
    process: bool = False,
) -> dict[str, Any]:
    from .containers import ContainerLab
    from .testbed import Testbed

    console = console or Console()
    if os.geteuid() != 0:
        raise ConfigError("the demo makes network namespaces and runs CRIU: run it as root")
    own_dir = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="migsgx-demo-"))
    if not own_dir and root.exists() and any(root.iterdir()):
        raise ConfigError(f"demo work directory {root} is not empty")
    # (a second early for the file system's coarse timestamps: no file older holds it)
    began = time.time() - 1.0
    secret = b"CANARY-" + secrets.token_hex(16).encode()
    needles = [secret, secret.hex().encode(), base64.b64encode(secret)]
    if process and container is not None:
        raise ConfigError("the demo moves a process or a container, not both")
    own_address = container is None and not process
    if own_address:
        container = "runc"
    try:
        lab: ContainerLab | None = None
        with console.status("two hosts in network namespaces, a CA, platform services, an agent"):
            bed = Testbed(root, subnet=199, bridged=own_address)
            bed.open()
        try:
            if container is not None:
                lab = ContainerLab(bed)
                lab.open()
            agent = bed.start_agent(args=["--keep-images"])
            image = bed.image("kvstore")
            console.print(
                f"hosts [bold]src[/] {bed.host('src').address} and [bold]dst[/] "
                f"{bed.host('dst').address}, agent on dst at {agent.target}"
            )
            # The secret reaches the enclave sealed: the application only sees ciphertext.
            with EnclaveClient.launch(image, socket_path=bed.services["src"].socket) as sealer:
                sealer.ecall.put("secret", secret)
                blob = sealer.ecall.seal_value("secret")
            if lab is None:
                app: Any = bed.start_app("kvstore", ["--image", str(image), "--enclaves", "1"])
                what, target = f"kvstore app pid {app.pid}", [str(app.pid)]
            else:
                assert container is not None
                app = lab.start_app(container, "kvstore", ["--enclaves", "1"],
                                    own_address=own_address)  # fmt: skip
                what, target = f"{container} container {app.name}", [f"--{container}", app.name]
                if own_address:
                    what += f" at its own address {app.extra['address']}"

            def ask_src(line: str) -> str:
                if lab is not None and own_address:
                    return lab.ask(app, line, at="src")
                return bed.ask(line, app.port, at="src", via="dst")

            def ask_dst(line: str) -> str:
                if lab is not None and own_address:
                    return lab.ask(app, line, at="dst")
                return bed.ask(line, app.port, at="dst", via="dst")

            if ask_src(f"UNSEAL secret {blob.hex()}") != "OK 1":
                raise MigSGXError("the application did not take the secret")
            values = {f"user{i}": os.urandom(16).hex() for i in range(5)}
            for key, value in values.items():
                ask_src(f"PUT {key} {value}")
            console.print(f"{what} on src with its enclave; secret stored")
            client: _Client | _KeptClient = (
                _KeptClient(lab, app) if own_address else _Client(bed, app.port)
            )
            client.start()
            time.sleep(0.5)
            with console.status("migrating the running application to dst (live)"):
                run = bed.migrate(None, agent, args=[*target, "--live"])
            time.sleep(0.5)
            client.stop.set()
            client.join(10)
            if run.returncode != 0 or run.stats is None:
                raise MigSGXError(f"the migration failed:\n{run.stderr[-2000:]}")
            kept = all(ask_dst(f"GET {k}") == f"VALUE {v}" for k, v in values.items())
            kept = kept and ask_dst("GET secret") == "VALUE " + secret.hex()
            # The last write the client saw acknowledged is there: nothing was lost.
            kept = kept and ask_dst("GET client") == f"VALUE {client.last_acked}"
            copies = bed.runnable_copies(app) if lab is None else lab.runnable_copies(app)
            roots = [root, Path("/dev/shm"), Path(tempfile.gettempdir())]
            found = _scan(roots + ([lab.base] if lab is not None else []), needles, began)
        finally:
            if lab is not None:
                lab.close()
            bed.close()
        stats = run.stats
        if isinstance(client, _KeptClient):
            outage = client.gap
        else:
            outage = (
                client.first_ok_dst - client.last_ok_src
                if client.first_ok_dst and client.last_ok_src
                else float("nan")
            )
        title = "live migration of the kvstore app, src -> dst"
        if own_address:
            title = "the kvstore app in a runc container with its own address, src -> dst"
        elif container:
            title = f"the kvstore app in a {container} container, src -> dst"
        gap = "client gap (src's last answer to dst's first)"
        if isinstance(client, _KeptClient):
            gap = "client's longest wait for an answer"
        clients = [(gap, f"{outage:.3f} s"),
                   ("client requests ok / failed", f"{client.ok} / {client.failed}")]  # fmt: skip
        if isinstance(client, _KeptClient):
            clients.append(("client TCP connections (kept open)", str(client.connections)))
        checks = [
            ("state kept (secret, values, last write)", str(kept)),
            ("runnable copies src / dst", f"{copies['src']} / {copies['dst']}"),
            ("canary found", str(found)),
        ]
        table = summary(title, stats, clients, checks)
        console.print(table)
        return {"stats": stats, "state_kept": kept, "canary_found": found, "copies": copies,
                "client": {"ok": client.ok, "failed": client.failed,
                           "connections": getattr(client, "connections", None)}}  # fmt: skip
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
