"""The package's rooms and their one-way arrows, read from the modules' own imports.

Each module is parsed (``ast``, nothing is imported or run) and every import of
a ``migsgx`` module is resolved to its absolute name.  An import may go to the
same room or to a room below it in :data:`LAYERS`, never up; the sans-I/O core
imports no module that does I/O; the product never imports the lab; and the
few rules that a layer order cannot say are checked one by one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "migsgx"

#: Rooms from the bottom up.  A module may import its own room and the rooms below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("migsgx", "migsgx.errors"),
    ("migsgx.wire", "migsgx._fs", "migsgx._fds", "migsgx._net", "migsgx._trace", "migsgx.limits"),
    ("migsgx.channel",),
    ("migsgx.sgx",),  # the trusted seam (sgx.trusted) and the emulator behind it
    ("migsgx.core",),  # sans-I/O: handshake, stream, manifest, commit, policy
    ("migsgx.criu",),  # CRIU's RPC and its page server
    ("migsgx.system",),  # process trees, namespaces
    ("migsgx.host",),  # the application's untrusted runtime
    ("migsgx.datapath",),  # ring, transport, engine, checkpoint I/O
    ("migsgx.enclave",),  # the trusted runtime, in the enclave process
    ("migsgx.containers",),  # the container drivers
    ("migsgx.inspection",),  # migsgx inspect: reading checkpoints, read-only
    ("migsgx.agent",),  # the per-host agent and the tool's side of appctl
    ("migsgx.lab",),  # harness: testbed, container lab, netns, demo, bench
    ("migsgx.cli_output", "migsgx.cli_options"),
    ("migsgx.cli_agent", "migsgx.cli_migrate", "migsgx.cli_lab", "migsgx.cli_inspect"),
    ("migsgx.cli_platform", "migsgx.cli_ca"),
    ("migsgx.cli",),
    ("migsgx.__main__",),
)

#: Modules that do I/O (or start it); the core imports none of them.
IO_MODULES = frozenset(
    {
        "os",
        "socket",
        "subprocess",
        "threading",
        "multiprocessing",
        "asyncio",
        "select",
        "selectors",
        "mmap",
        "shutil",
        "signal",
        "ctypes",
        "fcntl",
        "tempfile",
    }
)

#: May import the lab: the command line (``migsgx demo``, ``migsgx bench``) and the lab.
MAY_IMPORT_LAB = ("migsgx.lab", "migsgx.cli", "migsgx.cli_lab", "migsgx.__main__")

DRIVERS = (
    "migsgx.containers.pid",
    "migsgx.containers.runc",
    "migsgx.containers.podman",
    "migsgx.containers.containerd",
)


#: Modules split by job, and the modules of their own package each may import: the
#: lower part of a split (terms, one process, one format) never reaches back up for
#: the part built on it, so each can be read, tested and reused without the rest.
WITHIN_PACKAGE: dict[str, frozenset[str]] = {
    "migsgx.datapath.ring_spec": frozenset(),
    "migsgx.datapath.ring": frozenset(
        {"migsgx.datapath.ring_doorbell", "migsgx.datapath.ring_spec"}
    ),
    "migsgx.datapath.ring_doorbell": frozenset({"migsgx.datapath.ring_spec"}),
    "migsgx.datapath.ring_handover": frozenset(
        {"migsgx.datapath.ring", "migsgx.datapath.ring_spec"}
    ),
    "migsgx.datapath.slots": frozenset({"migsgx.datapath.ring"}),
    "migsgx.datapath.transport": frozenset({"migsgx.datapath.ring", "migsgx.datapath.ring_spec"}),
    "migsgx.datapath.staging": frozenset({"migsgx.datapath.ring", "migsgx.datapath.transport"}),
    # A checkpoint's enclave image, checked as recorded before it launches: below its users.
    "migsgx.datapath.ckpt_image": frozenset(),
    "migsgx.criu.enter": frozenset(),
    "migsgx.criu.keeplog": frozenset(),
    "migsgx.criu.swrk": frozenset(
        {"migsgx.criu.cancel", "migsgx.criu.enter", "migsgx.criu.keeplog"}
    ),
    "migsgx.criu.workdir": frozenset(),
    "migsgx.criu.rpc": frozenset(
        {
            "migsgx.criu.cancel",
            "migsgx.criu.enter",
            "migsgx.criu.locate",
            "migsgx.criu.swrk",
            "migsgx.criu.workdir",
        }
    ),
    "migsgx.core.transcript": frozenset(),
    "migsgx.core.handshake_terms": frozenset({"migsgx.core.policy", "migsgx.core.stream_channel"}),
    "migsgx.core.stream": frozenset({"migsgx.core.manifest", "migsgx.core.policy"}),
    "migsgx.core.stream_channel": frozenset(
        {"migsgx.core.manifest", "migsgx.core.policy", "migsgx.core.stream"}
    ),
    "migsgx.lab.container_spec": frozenset({"migsgx.lab.hosts"}),
    "migsgx.lab.container_hosts": frozenset(  # (the testbed: a type only)
        {
            "migsgx.lab.container_spec",
            "migsgx.lab.containerd",
            "migsgx.lab.sweep",
            "migsgx.lab.testbed",
        }
    ),
    # The enclave process: its log, its confinement, its two channels, then runtime.
    "migsgx.enclave.eventlog": frozenset(),
    "migsgx.enclave.confine": frozenset({"migsgx.enclave.eventlog"}),
    "migsgx.enclave.platform_channel": frozenset({"migsgx.enclave.eventlog"}),
    "migsgx.enclave.app_channel": frozenset(
        {
            "migsgx.enclave.eventlog",
            "migsgx.enclave.hold",
            "migsgx.enclave.instance",
            "migsgx.enclave.migrator",
            "migsgx.enclave.sidechannel",
        }
    ),
    # The source's decision (its COMMIT, the token, the release, a decision whose answer
    # was lost read again) below its dump and aborts (``migrator_source``).
    "migsgx.enclave.migrator_decision": frozenset({"migsgx.enclave.migrator_state"}),
    # migsgx recover: the records it reads, one migration resolved, the enclaves taken
    # back (the data path only there), then the command's loop over the journals.
    "migsgx.agent.recover_records": frozenset({"migsgx.agent.journal"}),
    "migsgx.agent.recover_resolve": frozenset(
        {
            "migsgx.agent.control",
            "migsgx.agent.journal",
            "migsgx.agent.recover_records",
            "migsgx.agent.source_host",
            "migsgx.agent.tls",
        }
    ),
    "migsgx.agent.recover_orphans": frozenset(
        {
            "migsgx.agent.enclave_ask",
            "migsgx.agent.faults",
            "migsgx.agent.handback",
            "migsgx.agent.holders",
            "migsgx.agent.journal",
            "migsgx.agent.recover_records",
            "migsgx.agent.recover_resolve",
            "migsgx.agent.redeliver",
            "migsgx.agent.source_host",
            "migsgx.agent.tls",
        }
    ),
    # migsgx recover on a destination: a dead agent's held trees, through its start-up pass.
    "migsgx.agent.recover_dest": frozenset(
        {
            "migsgx.agent.adoption",
            "migsgx.agent.config",
            "migsgx.agent.held",
            "migsgx.agent.metrics",
            "migsgx.agent.recover_records",
            "migsgx.agent.tls",
        }
    ),
    # The guardian process, split: its log below its aborts and its after-the-decision.
    "migsgx.agent.guardian_log": frozenset(),
    # One bounded question to a source enclave (answered, dead, hung): guardian and recover.
    "migsgx.agent.enclave_ask": frozenset({"migsgx.agent.lost_enclaves"}),
    # ``__mig_watch`` to every enclave of a given-back tree at once, one deadline for all.
    "migsgx.agent.watch_ask": frozenset({"migsgx.agent.enclave_ask", "migsgx.agent.lost_enclaves"}),
    # The roll-back's aborts confirmed: below the tool's decision, over the bounded ask.
    "migsgx.agent.abort_confirm": frozenset({"migsgx.agent.enclave_ask", "migsgx.agent.handback"}),
    "migsgx.agent.guardian_aborts": frozenset(
        {
            "migsgx.agent.faults",
            "migsgx.agent.guardian_log",
            "migsgx.agent.handback",
            "migsgx.agent.journal",
            "migsgx.agent.lost_enclaves",
            "migsgx.agent.recover_records",
        }
    ),
    "migsgx.agent.guardian_decided": frozenset(
        {
            "migsgx.agent.applink",
            "migsgx.agent.ckpt_attach",
            "migsgx.agent.ckpt_recover",
            "migsgx.agent.faults",
            "migsgx.agent.guardian_log",
            "migsgx.agent.handback",
            "migsgx.agent.journal",
            "migsgx.agent.recover_records",
            "migsgx.agent.recover_resolve",
            "migsgx.agent.redeliver",
            "migsgx.agent.tls",
        }
    ),
    # One incoming migration, each layer a subclass of the one below it: its state and
    # data, the hand-over, the decisions, the tree, the requests without the tool.
    "migsgx.agent.fault_relays": frozenset({"migsgx.agent.faults"}),
    "migsgx.agent.incoming_data": frozenset(
        {
            "migsgx.agent.config",
            "migsgx.agent.datalink",
            "migsgx.agent.fault_relays",
            "migsgx.agent.faults",
            "migsgx.agent.lazy",
            "migsgx.agent.protocol",
            "migsgx.agent.guardian_log",
            "migsgx.agent.lost_enclaves",
            "migsgx.agent.incoming_pages",
        }
    ),
    # The page connection, a layer under the session's state.
    "migsgx.agent.incoming_pages": frozenset(
        {
            "migsgx.agent.config",
            "migsgx.agent.fault_relays",
            "migsgx.agent.faults",
            "migsgx.agent.lost_enclaves",
            "migsgx.agent.protocol",
        }
    ),
    "migsgx.agent.incoming_handover": frozenset(
        {
            "migsgx.agent.applink",
            "migsgx.agent.faults",
            "migsgx.agent.held",
            "migsgx.agent.incoming_data",
            "migsgx.agent.lost_enclaves",
            "migsgx.agent.protocol",
            "migsgx.agent.reservations",
            "migsgx.agent.resumed",
        }
    ),
    "migsgx.agent.incoming_settle": frozenset(
        {"migsgx.agent.incoming_data", "migsgx.agent.incoming_handover", "migsgx.agent.protocol"}
    ),
    "migsgx.agent.incoming_tree": frozenset(
        {
            "migsgx.agent.faults",
            "migsgx.agent.held",
            "migsgx.agent.imageroom",
            "migsgx.agent.incoming_data",
            "migsgx.agent.incoming_settle",
            "migsgx.agent.lazy",
            "migsgx.agent.protocol",
        }
    ),
    "migsgx.agent.incoming_recovery": frozenset(
        {
            "migsgx.agent.config",
            "migsgx.agent.held",
            "migsgx.agent.incoming_data",
            "migsgx.agent.incoming_tree",
            "migsgx.agent.protocol",
            "migsgx.agent.refusal",
            "migsgx.agent.reservations",
            "migsgx.agent.resumed",
        }
    ),
    # The tool's split: the loss of a source enclave is named below every layer that
    # says it; the frozen part sits under the migration and over the decision; the
    # restore over the checkpoint (never the reverse).
    "migsgx.agent.enclave_loss": frozenset(),
    "migsgx.agent.source_dump": frozenset(
        {
            "migsgx.agent.ckpt_journal",
            "migsgx.agent.control",
            "migsgx.agent.lazy",
            "migsgx.agent.protocol",
            "migsgx.agent.source_commit",
            "migsgx.agent.versions",
        }
    ),
    "migsgx.agent.ckpt_restore": frozenset(
        {
            "migsgx.agent.applink",
            "migsgx.agent.checkpoint",
            "migsgx.agent.ckpt_attach",
            "migsgx.agent.ckpt_journal",
            "migsgx.agent.guardian",
        }
    ),
    # A restore finished by recover, and an attach that failed, on the journal's record.
    "migsgx.agent.ckpt_attach": frozenset(
        {
            "migsgx.agent.ckpt_journal",
            "migsgx.agent.faults",
            "migsgx.agent.handback",
            "migsgx.agent.holders",
            "migsgx.agent.recover_records",
        }
    ),
    "migsgx.sgx.keeper": frozenset(),
    "migsgx.sgx.listener": frozenset({"migsgx.sgx.keepers"}),
    "migsgx.sgx.keepers": frozenset({"migsgx.sgx.keeper", "migsgx.sgx.sockdiag"}),
    "migsgx.sgx.sockdiag": frozenset(),
    "migsgx.sgx.service_requests": frozenset(
        {
            "migsgx.sgx.platform",
            "migsgx.sgx.store_types",
            "migsgx.sgx.structs",
            "migsgx.sgx.record_store",
        }
    ),
    # The errors: the root below its families, the families below the one module every
    # caller imports them from (never each other).
    "migsgx._error_root": frozenset(),
    "migsgx.errors_platform": frozenset({"migsgx._error_root"}),
    "migsgx.errors_migration": frozenset({"migsgx._error_root"}),
    "migsgx.errors": frozenset(
        {"migsgx._error_root", "migsgx.errors_migration", "migsgx.errors_platform"}
    ),
    # The commit protocol: its messages (sealed frames, events) below its states and ends.
    "migsgx.core.commit_messages": frozenset({"migsgx.core.transcript"}),
    "migsgx.core.stoprules": frozenset(),
    "migsgx.core.rounds": frozenset({"migsgx.core.stoprules"}),
    "migsgx.core.commit": frozenset(
        {
            "migsgx.core.commit_messages",
            "migsgx.core.handshake",
            "migsgx.core.seen",
            "migsgx.core.stream_channel",
        }
    ),
    # A peer's container configuration: the allow list below the checks against it.
    "migsgx.containers.admission_list": frozenset(
        {"migsgx.containers.base", "migsgx.containers.settings"}
    ),
    "migsgx.containers.admission": frozenset({"migsgx.containers.admission_list"}),
    # The lab's network: a machine's namespaces below one run's hosts and links.
    "migsgx.lab.namespaces": frozenset(),
    "migsgx.lab.netns": frozenset({"migsgx.lab.namespaces"}),
    # A storm migration's outcome and the storm's summary, under the storm itself.
    "migsgx.lab.storm_outcome": frozenset({"migsgx.lab.storm_timeline"}),
    # migsgx migrate: what the caller gives and gets, and the figures' arithmetic,
    # below the state its steps share (neither knows it).
    "migsgx.agent.source_options": frozenset({"migsgx.agent.precopy", "migsgx.agent.tls"}),
    "migsgx.agent.source_figures": frozenset(),
    # migsgx migrate's roll-back, below its decision (the commit is built on it).
    "migsgx.agent.source_rollback": frozenset(
        {
            "migsgx.agent.abort_confirm",
            "migsgx.agent.enclave_loss",
            "migsgx.agent.faults",
            "migsgx.agent.handback",
            "migsgx.agent.holders",
            "migsgx.agent.source_enclaves",
            "migsgx.agent.source_state",
        }
    ),
    # The application control's messages, below the listener in the application.
    "migsgx.host.appctl_wire": frozenset({"migsgx.host.client"}),
    # The runc driver's bundles on a destination, below the driver.
    "migsgx.containers.runc_bundles": frozenset(
        {"migsgx.containers.base", "migsgx.containers.podnet", "migsgx.containers.runc_cli"}
    ),
}


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _is_module(dotted: str) -> bool:
    base = SRC.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def modules() -> Iterator[Path]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_generated" not in path.parts:
            yield path


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (top level, functions, TYPE_CHECKING)."""

    name, is_package = _module_name(path)
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from . import x`` may name a module
                submodule = f"{target}.{alias.name}"
                found.add(submodule if _is_module(submodule) else target)
    return found


def room_of(module: str) -> int:
    best, best_len = -1, -1
    for level, rooms in enumerate(LAYERS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and len(room) > best_len:
                best, best_len = level, len(room)
    if best < 0:
        raise AssertionError(f"{module} is in no room of LAYERS")
    return best


def _room_name(module: str) -> str:
    level = room_of(module)
    return max((r for r in LAYERS[level] if module == r or module.startswith(r + ".")), key=len)


def test_every_module_has_a_room() -> None:
    for path in modules():
        room_of(_module_name(path)[0])


def test_arrows_point_down() -> None:
    upward = []
    for path in modules():
        name = _module_name(path)[0]
        for target in imports_of(path):
            if target.startswith("migsgx") and room_of(target) > room_of(name):
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_rooms_of_one_layer_do_not_import_each_other() -> None:
    across = []
    for path in modules():
        name = _module_name(path)[0]
        for target in imports_of(path):
            if (
                target.startswith("migsgx")
                and room_of(target) == room_of(name)
                and _room_name(target) != _room_name(name)
                and "migsgx" not in (_room_name(target), _room_name(name))
            ):
                across.append(f"{name} -> {target}")
    assert across == []


def test_core_imports_no_io() -> None:
    offending = []
    for path in modules():
        name = _module_name(path)[0]
        if name == "migsgx.core" or name.startswith("migsgx.core."):
            for target in imports_of(path):
                if target.split(".")[0] in IO_MODULES:
                    offending.append(f"{name} -> {target}")
    assert offending == []


def test_product_never_imports_the_lab() -> None:
    offending = []
    for path in modules():
        name = _module_name(path)[0]
        if any(name == m or name.startswith(m + ".") for m in MAY_IMPORT_LAB):
            continue
        offending += [f"{name} -> {t}" for t in imports_of(path) if t.startswith("migsgx.lab")]
    assert offending == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_drivers_import_neither_each_other_nor_the_agent(driver: str) -> None:
    path = SRC.joinpath(*driver.split(".")).with_suffix(".py")
    bad = {
        t
        for t in imports_of(path)
        if t.startswith("migsgx.agent") or (t in DRIVERS and t != driver)
    }
    assert bad == set()


def test_enclave_code_uses_the_seam_not_the_emulator() -> None:
    offending = []
    for path in modules():
        name = _module_name(path)[0]
        if name.startswith("migsgx.enclave"):
            offending += [
                f"{name} -> {t}"
                for t in imports_of(path)
                if t in ("migsgx.sgx.platform", "migsgx.sgx.service", "migsgx.sgx.spawn")
            ]
    assert offending == []


def test_the_application_side_of_appctl_imports_no_process_tree_code() -> None:
    path = PACKAGE / "host" / "appctl.py"
    assert {t for t in imports_of(path) if t.startswith(("migsgx.system", "migsgx.agent"))} == set()


def test_the_checker_sees_an_upward_arrow() -> None:
    """The rule is not vacuous: a module of the core importing the agent is caught."""

    assert room_of("migsgx.agent.source") > room_of("migsgx.core.handshake")
    assert "migsgx.core.stream_channel" in imports_of(PACKAGE / "core" / "handshake.py")


def _cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), imports in any scope."""

    graph = {
        _module_name(path)[0]: {
            t for t in imports_of(path) if t.startswith("migsgx") and t != _module_name(path)[0]
        }
        for path in modules()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycles() -> None:
    assert _cycles() == []


@pytest.mark.parametrize("module", sorted(WITHIN_PACKAGE))
def test_a_split_module_imports_only_what_lies_below_it_in_its_package(module: str) -> None:
    path = SRC.joinpath(*module.split(".")).with_suffix(".py")
    package = module.rpartition(".")[0] + "."
    inside = {
        t
        for t in imports_of(path)
        if t.startswith(package) and t != module and "._generated" not in t  # (protobuf's)
    }
    assert inside <= WITHIN_PACKAGE[module]
