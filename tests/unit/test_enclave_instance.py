"""The trusted runtime's core in memory: admission, thread slots, errors that keep secrets."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from platform_fixtures import (
    PROBE_MODULE,
    PROBE_SOURCE,
    World,
    image_files,
    make_image,
    signed,
)

from migsgx.enclave.instance import EnclaveInstance
from migsgx.enclave.memory import PAGE_SIZE, EnclaveMemory
from migsgx.errors import (
    EnclaveBusyError,
    EnclaveError,
    EnclaveMemoryError,
    ImageError,
    OutOfThreadSlotsError,
    UnknownEcallError,
)
from migsgx.sgx.image import EnclaveImage

SECRET = "hunter2-do-not-leak"


def _instance(
    world: World,
    ocall: Callable[[str, tuple[Any, ...]], Any] | None = None,
    source: str = PROBE_SOURCE,
    **manifest: Any,
) -> EnclaveInstance:
    image = make_image(world.author, source=source, **manifest)
    identity, _ = world.host_a.einit(image)
    return EnclaveInstance(image, world.host_a.services_for(identity), ocall)


class Gate:
    """An OCALL handler that holds callers until released (their slots stay taken)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def __call__(self, name: str, args: tuple[Any, ...]) -> Any:
        if name == "gate":
            self.entered.release()
            assert self.release.wait(10)
            return args[0]
        if name == "echo":
            return args[0]
        raise KeyError(name)


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()


def test_ecalls_and_the_table(world: World) -> None:
    inst = _instance(world)
    assert inst.call("echo", [1, b"x"]) == [1, b"x"]
    assert inst.call("add", 2, 3) == 5
    assert "echo" in inst.ecall_names
    # Only marked methods are ECALLs.
    for name in ("export_state", "import_state", "__init__", "ecalls"):
        assert name not in inst.ecall_names
        with pytest.raises(UnknownEcallError):
            inst.call(name)


def test_unknown_ecall(world: World) -> None:
    with pytest.raises(UnknownEcallError):
        _instance(world).call("no_such_call")


def test_thread_slots(world: World, gate: Gate) -> None:
    inst = _instance(world, ocall=gate, thread_slots=2)
    results: list[Any] = []
    holders = [
        threading.Thread(target=lambda i=i: results.append(inst.call("gate", i))) for i in range(2)
    ]
    for t in holders:
        t.start()
    for _ in holders:
        assert gate.entered.acquire(timeout=10)
    with pytest.raises(OutOfThreadSlotsError):
        inst.call("echo", 1)
    gate.release.set()
    for t in holders:
        t.join(10)
    assert sorted(results) == [0, 1]
    assert inst.call("echo", 2) == 2  # slots are given back
    for _ in range(10):  # ... every time
        inst.call("echo", 0)
    assert inst.call("ocall_echo", "x") == "x"


def test_failed_ecall_gives_its_slot_back(world: World) -> None:
    inst = _instance(world, thread_slots=1)
    for _ in range(3):
        with pytest.raises(EnclaveError):
            inst.call("fail", SECRET)
    assert inst.call("echo", 1) == 1


def test_exceptions_do_not_leak_their_message(world: World) -> None:
    inst = _instance(world)
    with pytest.raises(EnclaveError) as err:
        inst.call("fail", SECRET)
    assert type(err.value) is EnclaveError
    assert SECRET not in str(err.value) and SECRET not in repr(err.value.context)
    assert "ValueError" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    # An enclave that means to say something raises EnclaveError itself.
    with pytest.raises(EnclaveError, match="deliberate"):
        inst.call("fail_typed", "deliberate")
    # Wrong arguments are the caller's mistake, reported by type only.
    with pytest.raises(EnclaveError, match="TypeError"):
        inst.call("add", 1)


def _source_with(extra_module_code: str = "", init_code: str = "") -> str:
    src = PROBE_SOURCE.replace(
        "        self.cells = ",
        f"        {init_code or 'pass'}\n        self.cells = ",
    )
    return extra_module_code + "\n" + src


def test_constructor_failure_keeps_its_secret(world: World) -> None:
    source = _source_with(init_code=f"raise RuntimeError({SECRET!r})")
    with pytest.raises(EnclaveError) as err:
        _instance(world, source=source)
    assert SECRET not in str(err.value) and "RuntimeError" in str(err.value)


def test_import_failure_keeps_its_secret(world: World) -> None:
    source = _source_with(extra_module_code=f"raise LookupError({SECRET!r})")
    with pytest.raises(ImageError) as err:
        _instance(world, source=source)
    assert SECRET not in str(err.value) and "LookupError" in str(err.value)
    with pytest.raises(ImageError):
        _instance(world, source="def broken(:\n")


def test_bad_entries(world: World) -> None:
    with pytest.raises(ImageError):
        _instance(world, entry="missing_module:Probe")
    with pytest.raises(ImageError):
        _instance(world, entry=f"{PROBE_MODULE}:NoSuchClass")
    with pytest.raises(ImageError):
        _instance(world, entry=f"{PROBE_MODULE}:np")  # not an Enclave subclass


_WHICH = """
import helper
from migsgx.enclave import Enclave, ecall


class Probe(Enclave):
    @ecall
    def which(self):
        return helper.HELLO
"""


def test_file_order_does_not_choose_the_code(world: World) -> None:
    """The untrusted side orders the files it sends; the same MRENCLAVE must run the
    same code whatever the order (``helper/__init__.py`` wins over ``helper.py``)."""

    files = {
        **image_files(_WHICH),
        "helper.py": b"HELLO = 'module'\n",
        "helper/__init__.py": b"HELLO = 'package'\n",
    }
    image = signed(files, world.author)
    answers = set()
    measurements = set()
    for order in (sorted(image.files), sorted(image.files, reverse=True)):
        reordered = EnclaveImage.from_files({name: image.files[name] for name in order})
        identity, _ = world.host_a.einit(reordered)
        measurements.add(identity.mr_enclave)
        answers.add(EnclaveInstance(reordered, world.host_a.services_for(identity)).call("which"))
    assert len(measurements) == 1
    assert answers == {"package"}


def test_enclave_modules_do_not_stay_importable(world: World) -> None:
    _instance(world)
    assert PROBE_MODULE not in sys.modules


def test_quiesce_and_resume(world: World, gate: Gate) -> None:
    inst = _instance(world, ocall=gate)
    holder = threading.Thread(target=inst.call, args=("gate", 0))
    holder.start()
    assert gate.entered.acquire(timeout=10)
    with pytest.raises(EnclaveBusyError):
        inst.quiesce(timeout=0.05)  # one ECALL still running: abandoned
    assert inst.call("echo", 1) == 1  # and admitting again
    done = threading.Event()

    def quiesce() -> None:
        inst.quiesce(timeout=10)
        done.set()

    q = threading.Thread(target=quiesce)
    q.start()
    assert not done.wait(0.1)
    with pytest.raises(EnclaveBusyError):  # no new ECALLs while quiescing
        inst.call("echo", 1)
    gate.release.set()
    holder.join(10)
    assert done.wait(10)
    q.join(10)
    assert inst.quiesced
    inst.resume()
    assert inst.call("echo", 3) == 3


def test_retire_wipes_memory(world: World) -> None:
    inst = _instance(world)
    inst.call("store", b"secret bytes")
    assert inst.call("load", 12) == b"secret bytes"
    cells = inst.memory.get("cells")
    inst.retire("committed elsewhere")
    with pytest.raises(EnclaveBusyError, match="committed elsewhere"):
        inst.call("echo", 1)
    inst.resume()  # does not bring a retired enclave back
    with pytest.raises(EnclaveBusyError):
        inst.call("echo", 1)
    assert not cells[:12].any()
    with pytest.raises(EnclaveMemoryError):
        inst.memory.view()


def test_small_state_roundtrip(world: World) -> None:
    inst = _instance(world)
    state = inst.export_small_state()
    fresh = _instance(world)
    fresh.import_small_state(state)
    assert "cells" in fresh.memory
    with pytest.raises(EnclaveError):
        fresh.import_small_state({"memory": {}})


# --- enclave memory --------------------------------------------------------------------
def test_memory_allocations_stay_inside() -> None:
    mem = EnclaveMemory(4 * PAGE_SIZE)
    a = mem.array("a", 100, np.uint8)
    b = mem.array("b", (2, 3), np.float64)
    assert mem.used == 2 * PAGE_SIZE
    a[:] = 7
    assert not b.any()
    with pytest.raises(EnclaveMemoryError):
        mem.array("big", 3 * PAGE_SIZE, np.uint8)
    with pytest.raises(EnclaveMemoryError):
        mem.view(3 * PAGE_SIZE, 2 * PAGE_SIZE)
    with pytest.raises(EnclaveMemoryError):
        mem.view(-1, 1)
    with pytest.raises(EnclaveMemoryError):
        mem.array("a", 100, np.float32)


@pytest.mark.parametrize("shape", [-1, (-1,), (2, -3), (-2, -2)])
def test_negative_shapes_refused(shape: Any) -> None:
    """numpy reads a count of -1 as 'the whole buffer': that would alias every allocation."""

    mem = EnclaveMemory(4 * PAGE_SIZE)
    mem.array("keys", 16, np.uint8)[:] = 1
    with pytest.raises(EnclaveMemoryError):
        mem.array("x", shape, np.uint8)
    with pytest.raises(EnclaveMemoryError):
        mem.allocate("y", -5)


@pytest.mark.parametrize(
    "alloc",
    [
        [0, -1, "|u1", [0]],  # negative size
        [0, 8, "|u1", [9]],  # shape larger than the allocation
        [0, 8, "not a dtype", [8]],
        [0, 8, "|O", [1]],  # object dtype
        [PAGE_SIZE, PAGE_SIZE, "|u1", [PAGE_SIZE]],  # beyond brk
        [-PAGE_SIZE, 8, "|u1", [8]],
    ],
)
def test_restore_layout_checks_every_allocation(alloc: list[Any]) -> None:
    mem = EnclaveMemory(4 * PAGE_SIZE)
    layout = {"size": 4 * PAGE_SIZE, "brk": PAGE_SIZE, "allocs": {"x": alloc}}
    with pytest.raises(EnclaveMemoryError):
        mem.restore_layout(layout)


def test_memory_size_must_be_pages_and_mappable() -> None:
    for size in (0, -PAGE_SIZE, PAGE_SIZE + 1, 1 << 60, 1 << 63):
        with pytest.raises(EnclaveMemoryError):
            EnclaveMemory(size)


def test_image_from_probe_source_is_valid(world: World) -> None:
    image = make_image(world.author)
    assert isinstance(image, EnclaveImage)
    assert image.source_files() == {f"{PROBE_MODULE}.py": PROBE_SOURCE.encode()}
