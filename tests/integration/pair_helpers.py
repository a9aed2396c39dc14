"""A kvstore with two enclaves, the first of which a cell's fault kills.

The application spreads its keys over its enclaves by ``crc32(key) % 2``: the
keys of the second enclave (``kept``) must all answer after the fault, with
every acknowledged write; those of the first (``lost``) went with it and must
answer an error, never a stale value.  The migration cells
(``test_abort_leaks.py``) and the checkpoint cells (``test_checkpoint_faults.py``)
fill, kill one and check the survivor alike.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import zlib
from dataclasses import dataclass

from bed_helpers import ask, kvstore, wait_until

from migsgx.lab.testbed import AppProcess, Testbed

#: Keys written before the fault, over both enclaves.
KEYS = 8


@dataclass
class EnclavePair:
    bed: Testbed
    app: AppProcess
    #: The second enclave's keys and their acknowledged values: they must survive.
    kept: dict[str, str]
    #: The first enclave's keys: its state is gone with it.
    lost: set[str]

    def survivor_answers(self, timeout: float) -> float:
        """When the surviving enclave first answered with one of its keys (polled)."""

        key, value = next(iter(self.kept.items()))

        def answers() -> bool:
            with contextlib.suppress(OSError, AssertionError):
                return ask(self.bed, self.app, "src", f"GET {key}") == f"VALUE {value}"
            return False

        wait_until(answers, timeout, "the surviving enclave to answer")
        return time.monotonic()

    def survivor_kept_every_write(self, *, writes_after: bool = True) -> None:
        """Every kept key answers its value, every lost one an error; with
        ``writes_after``, the survivor takes a new write too."""

        for key, value in self.kept.items():
            got = ask(self.bed, self.app, "src", f"GET {key}")
            assert got == f"VALUE {value}", (key, got)
        for key in self.lost:
            got = ask(self.bed, self.app, "src", f"GET {key}")
            assert got.startswith("ERR"), (key, got)
        if writes_after:
            got = ask(self.bed, self.app, "src", f"PUT {next(iter(self.kept))} {b'after'.hex()}")
            assert got.startswith("OK"), got


def enclave_pair(bed: Testbed) -> EnclavePair:
    """A kvstore with two enclaves on ``src``, acknowledged writes in both."""

    app = kvstore(bed, "--enclaves", "2")
    keys = {f"k{i}": secrets.token_hex(8) for i in range(KEYS)}
    for key, value in keys.items():
        assert ask(bed, app, "src", f"PUT {key} {value}").startswith("OK")
    kept = {k: v for k, v in keys.items() if zlib.crc32(k.encode()) % 2 == 1}
    lost = set(keys) - set(kept)
    assert kept and lost
    return EnclavePair(bed, app, kept, lost)
