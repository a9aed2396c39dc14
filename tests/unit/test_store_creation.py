"""Two first users of a missing platform store: one store, nothing the other wrote lost.

Process A finds no store and is held (``counters.before-create:wait-file``)
between its look and its write; process B then opens the same store, creates
a counter in it and ends.  A is let go only once B is done or waits for the
store's lock (``/proc/locks`` lists it as a blocked waiter): with the store
created outside the lock, B finishes first and A's empty store replaces B's
counter.  Deterministic: no sleep decides the order.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from migsgx.sgx.claims import ClaimStore
from migsgx.sgx.counters import CounterStore

_SRC = str(Path(__file__).resolve().parents[2] / "src")
_OWNER = b"\x11" * 32

_A = """
import sys
from migsgx.sgx.claims import ClaimStore
from migsgx.sgx.counters import CounterStore
{cls}(sys.argv[1])
print("created", flush=True)
"""
_B = """
import sys
from migsgx.sgx.claims import ClaimStore
from migsgx.sgx.counters import CounterStore
if "{cls}" == "CounterStore":
    cid, _ = CounterStore(sys.argv[1]).create(bytes.fromhex(sys.argv[2]))
    print(cid, flush=True)
else:
    print(ClaimStore(sys.argv[1]).claim(bytes.fromhex(sys.argv[2]), b"mid-1"), flush=True)
"""


def _python(code: str, args: list[str], fault: str = "") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": _SRC, "MIGSGX_FAULT": fault}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _waits_for_lock(pid: int, lock: Path) -> bool:
    """Whether ``pid`` is a blocked waiter for an flock on ``lock`` (``/proc/locks``)."""

    try:
        inode = lock.stat().st_ino
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and len(fields) >= 7:
            at = fields.index("->")
            if fields[at + 4] == str(pid) and fields[at + 5].rsplit(":", 1)[-1] == str(inode):
                return True
    return False


def _race(tmp_path: Path, cls: str) -> tuple[str, str]:
    path = tmp_path / "store.cbor"
    go = tmp_path / "go"
    first = _python(_A.format(cls=cls), [str(path)], f"counters.before-create:wait-file={go}")
    assert first.stderr is not None
    held = first.stderr.readline()  # (the fault point announces itself, then waits)
    assert "counters.before-create" in held, held
    second = _python(_B.format(cls=cls), [str(path), _OWNER.hex()])
    lock = path.with_name(path.name + ".lock")
    deadline = time.monotonic() + 60
    while second.poll() is None and not _waits_for_lock(second.pid, lock):
        assert time.monotonic() < deadline, "the second creator neither ended nor waited"
        time.sleep(0.01)
    go.touch()
    out_b, err_b = second.communicate(timeout=60)
    out_a, err_a = first.communicate(timeout=60)
    assert second.returncode == 0, err_b
    assert first.returncode == 0, err_a
    assert out_a.strip() == "created"
    return out_b.strip(), str(path)


def test_counter_store_made_by_two_first_users_keeps_both(tmp_path: Path) -> None:
    cid, path = _race(tmp_path, "CounterStore")
    store = CounterStore(Path(path))
    assert store.read(_OWNER, cid) == 0  # the second one's counter survived the first's create
    assert store.create(_OWNER)[0] != cid


def test_claim_store_made_by_two_first_users_keeps_the_claim(tmp_path: Path) -> None:
    answer, path = _race(tmp_path, "ClaimStore")
    assert answer == "True"
    store = ClaimStore(Path(path))
    assert store.claimed(_OWNER, b"mid-1")
    assert not store.claim(_OWNER, b"mid-1")  # once
