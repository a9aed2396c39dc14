"""Persistent-state names reserved for arrivals that will never install here.

Before LOADED, a destination enclave reserves the name of the persistent state
it receives (``docs/spec/persistent.md``), so that the install after the commit
cannot fail.  The enclave releases the reservation itself when it is discarded;
if it dies instead, the reservation stays and would refuse every later arrival
of that name.  The destination agent knows which arrivals its live sessions
still hold: for the others it releases what their dead enclaves left.  A
release is safe whatever the source decided: a state delivered again to a fresh
enclave reserves the name anew before its LOADED.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from ..enclave.persistent_format import reservation_release
from ..errors import CounterError
from ..sgx.counters import COUNTERS, CounterStore

__all__ = ["release_reservations"]

log = logging.getLogger("migsgx.agent")


def release_reservations(state: Path, arrivals: Iterable[bytes]) -> list[str]:
    """Release the reservations of ``arrivals`` (migration ids) in this host's store.

    Returns the names released.  The caller vouches that no live enclave of this
    host holds any of these arrivals loaded.
    """

    wanted = {bytes(a) for a in arrivals if isinstance(a, bytes) and a}
    path = Path(state) / COUNTERS
    if not wanted or not path.exists():  # (opening the store would create it)
        return []
    store = CounterStore(path)
    released: list[str] = []
    for owner, name, blob in store.records():
        found = reservation_release(blob)
        if found is None or found[0] not in wanted:
            continue
        try:
            store.record_update(owner, name, found[1])
        except CounterError:
            continue  # taken, used or released meanwhile: not a stale reservation
        log.info("released the reservation of %r left by arrival %s", name, found[0].hex()[:8])
        released.append(name)
    return released
