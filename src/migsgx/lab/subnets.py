"""A testbed's subnet, claimed for as long as the bed lives, so parallel runs never share one.

Each integration module (and the demo, the benchmarks, the storm) names a
subnet of ``10.250.S.0/24`` for its hosts (:class:`~migsgx.lab.netns.HostNetwork`).
A fixed number collides as soon as the same module runs twice at once on one
machine (two worktrees, two developers): both beds hand out the same addresses,
container addresses and certificates.  So the number is a preference: the bed
claims the first subnet from it on (wrapping at 255) that

- no run holds: a lock file per subnet under ``/run`` (:data:`LOCK_DIR`) taken
  with ``flock``, which the kernel drops when its holder closes it or dies, so
  a crashed run leaves no claim behind; and
- no namespace uses: an address of it on any interface of the machine's own
  network namespace or of a named one (``/run/netns``), which a run of code
  that takes no lock (an older checkout) leaves there.

A claim is held by its open descriptor (close-on-exec: the processes a bed
starts do not keep it) until :meth:`SubnetClaim.release`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .netns import NetnsError

__all__ = ["LOCK_DIR", "SUBNETS", "SubnetClaim", "claim_subnet", "subnets_in_use", "subnets_of"]

LOCK_DIR: Final = Path("/run/migsgx-subnets")
SUBNETS: Final = 256
_ADDRESS: Final = re.compile(r"\binet 10\.250\.(\d{1,3})\.\d{1,3}/")


@dataclass
class SubnetClaim:
    """Subnet ``10.250.<subnet>.0/24``, this process's while ``fd`` stays open."""

    subnet: int
    fd: int

    def release(self) -> None:
        """Let the subnet go (idempotent)."""

        if self.fd >= 0:
            os.close(self.fd)  # (the lock goes with the descriptor; the file stays, harmless)
            self.fd = -1

    def __enter__(self) -> SubnetClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def subnets_in_use() -> set[int]:
    """The subnets of ``10.250.0.0/16`` with an address in this or any named namespace."""

    outputs = []
    for argv in (["ip", "-4", "-o", "addr", "show"],
                 ["ip", "-all", "netns", "exec", "ip", "-4", "-o", "addr", "show"]):  # fmt: skip
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            # A namespace deleted meanwhile makes ``ip`` fail for it: what it read still counts.
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            outputs.append(done.stdout)
    return subnets_of("\n".join(outputs))


def subnets_of(addresses: str) -> set[int]:
    """The subnets ``S`` of the ``10.250.S.N`` addresses in ``ip -o addr`` output."""

    return {int(m) for m in _ADDRESS.findall(addresses) if int(m) < SUBNETS}


def claim_subnet(
    preferred: int,
    *,
    lock_dir: Path = LOCK_DIR,
    in_use: Callable[[], set[int]] = subnets_in_use,
) -> SubnetClaim:
    """Claim ``preferred``, or the first subnet after it that no run holds and no
    namespace uses; :class:`NetnsError` when all 256 are taken."""

    if not 0 <= preferred < SUBNETS:
        raise NetnsError(f"subnet must be 0..{SUBNETS - 1}, not {preferred}")
    try:
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise NetnsError(f"cannot make the subnet locks' directory {lock_dir}: {exc}") from exc
    used = in_use()
    for offset in range(SUBNETS):
        subnet = (preferred + offset) % SUBNETS
        if subnet in used:
            continue
        fd = os.open(lock_dir / f"{subnet}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # (who holds it, for whoever looks)
        return SubnetClaim(subnet, fd)
    raise NetnsError(f"every subnet of 10.250.0.0/16 is claimed or in use (from {preferred} on)")
