"""The ``pstore`` enclave of the persistent-state tests, and reading a host's record store.

Registered as a pytest plugin (``pytest_plugins``) by the modules that use the
``pstore`` fixture; the image is signed once per session, whichever module
asks first.  Also what those modules do to it: open a record under a fresh
``name`` with a counter, checkpoint it, restore a checkpoint.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import cbor2
import pytest
from state_helpers import Launcher, World

from migsgx.datapath.checkpoint import CheckpointOut, restore_enclave
from migsgx.host.client import EnclaveClient
from migsgx.sgx.image import load_author_key, sign_image_dir

# A small enclave whose whole state is persistent, with a thread of its own that
# counts while the application's ECALLs are held back by a migration.
PSTORE_SOURCE = '''
"""Test enclave: migratable counters and sealing, and a counting thread."""

import threading

from migsgx.enclave import Enclave, ecall
from migsgx.errors import MigSGXError


class PStore(Enclave):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.report = {"ok": 0, "errors": {}, "platform_ok": 0, "platform_errors": {}}
        self.stop = threading.Event()

    @ecall
    def open(self, name):
        return self.ctx.open_persistent(name)

    @ecall
    def create(self, name, initial=0):
        return self.ctx.mcounter_create(name, initial)

    @ecall
    def read(self, name):
        return self.ctx.mcounter_read(name)

    @ecall
    def increment(self, name, by=1):
        return self.ctx.mcounter_increment(name, by)

    @ecall
    def seal(self, data, counter=None):
        return self.ctx.seal_migratable(data, counter=counter)

    @ecall
    def unseal(self, blob, fresh=True):
        return self.ctx.unseal_migratable(blob, fresh=fresh)

    @ecall
    def tick_start(self, name, period):
        """Count ``name`` up every ``period`` seconds, and a platform counter beside it."""

        platform_counter, _ = self.ctx.counter_create()

        def attempt(kind, op):
            try:
                op()
                self.report[kind + "ok"] += 1
            except MigSGXError as exc:
                errors = self.report[kind + "errors"]
                errors[exc.code] = errors.get(exc.code, 0) + 1

        def run():
            while not self.stop.wait(period):
                attempt("", lambda: self.ctx.mcounter_increment(name))
                attempt("platform_", lambda: self.ctx.counter_increment(platform_counter))

        threading.Thread(target=run, daemon=True).start()

    @ecall
    def tick_report(self):
        return {
            **self.report,
            "errors": dict(self.report["errors"]),
            "platform_errors": dict(self.report["platform_errors"]),
        }

    @ecall
    def tick_stop(self):
        self.stop.set()
'''

PSTORE_MANIFEST = """[enclave]
name = "pstore"
entry = "pstore_enclave:PStore"
memory_size = "1MiB"
thread_slots = 4
product_id = 8
svn = 1
debug = false
"""


@pytest.fixture(scope="module")
def pstore(world: World) -> str:
    """The ``pstore`` image, signed by the deployment's author (once per session)."""

    path = world.root / "images" / "pstore"
    if "pstore" not in world.images:
        path.mkdir(parents=True, exist_ok=True)
        (path / "manifest.toml").write_text(PSTORE_MANIFEST)
        (path / "pstore_enclave.py").write_text(PSTORE_SOURCE)
        sign_image_dir(path, load_author_key(world.deployment.author_key))
        world.images["pstore"] = path
    return "pstore"


def host_state(world: World, host: str) -> Path:
    return world.deployment.hosts["abc".index(host)]


def record_names(world: World, host: str) -> set[str]:
    """Names of the persistent records host ``host`` keeps (of any owner)."""

    data = cbor2.loads((host_state(world, host) / "counters.cbor").read_bytes())
    return {key.split("/", 1)[1] for key in data.get("records", {})}


@pytest.fixture
def name() -> str:
    """A persistent record name no other test uses."""

    return f"ps-{uuid.uuid4().hex[:12]}"


def counting(launch: Launcher, image: str, name: str, start: int = 0) -> EnclaveClient:
    """An enclave of ``image`` on host a that opened record ``name`` with counter ``c``."""

    client = launch(image)
    client.ecall.open(name)
    client.ecall.create("c", start)
    return client


def checkpoint_out(client: EnclaveClient, directory: Path) -> CheckpointOut:
    """``client``'s enclave checkpointed into ``directory``, neither committed nor aborted."""

    out = CheckpointOut(client.detach(), client.info, client.image_files)
    out.write(directory, 0)  # __ckpt_out, __mig_ring, __mig_dump
    return out


def restored(launch: Launcher, world: World, directory: Path) -> EnclaveClient:
    """The enclave of the checkpoint in ``directory``, restored on host a."""

    sock, info, files = restore_enclave(directory, 0, world.socket("a"))
    launch.track(info.pid)
    client = EnclaveClient(sock, info, image_files=files)
    launch.clients.append(client)
    return client
