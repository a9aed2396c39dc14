"""``--live``'s choice for a tree's memory: post-copy, or frozen below a size where it cannot win.

Post-copy takes the tree's private memory out of the freeze, but puts costs of
its own into it: the destination's ``criu lazy-pages`` daemon starts and
connects (TLS) before the restore, the restore registers every lazy range with
userfaultfd, and once the tree runs, each page it touches before the daemon's
background pull brought it is a round trip to the source; attaching the
enclaves alone touches hundreds of pages of a Python application.  Moving a
small memory while frozen costs less than that (about 10 MiB of a runc
container: 0.1-0.2 s), so below :data:`POST_COPY_MIN` the memory moves frozen,
as in stop-and-copy.  Measured: docs/migration.md, "Post-copy or frozen".

The size is the tree's resident private anonymous memory (``RssAnon``), what
CRIU's lazy dump would leave out of the freeze; the choice is made before
anything is frozen, printed, and kept in ``--json`` (``details.memory``).
An explicit ``--post-copy`` is never overruled; ``--post-copy-min 0`` makes
``--live`` post-copy whatever the size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .. import _proc

__all__ = ["POST_COPY_MIN", "MemoryPath", "choose", "private_memory"]

#: Below this much private memory in the tree, ``--live`` moves it while frozen.
POST_COPY_MIN: Final = 64 << 20


def private_memory(pids: Sequence[int], proc: Path = Path("/proc")) -> int:
    """Bytes of private anonymous memory resident in the processes ``pids``.

    Processes only (threads share their process's memory); a process that
    ended meanwhile counts nothing.
    """

    total = 0
    for pid in pids:
        value = _proc.status_field(pid, "RssAnon", proc=proc)
        if value is not None:
            total += int(value.split()[0]) * 1024  # (kB)
    return total


@dataclass(frozen=True)
class MemoryPath:
    """How the tree's memory moves, and why."""

    post_copy: bool
    private_bytes: int
    post_copy_min: int  # 0: no size rule (post-copy asked for, or the rule turned off)

    def describe(self) -> dict[str, Any]:
        """``details.memory`` of ``--json``."""

        return {
            "path": "post-copy" if self.post_copy else "frozen",
            "private_bytes": self.private_bytes,
            "post_copy_min": self.post_copy_min,
        }

    def notice(self) -> str:
        """The line ``--live`` prints when the size rule chose the frozen path."""

        return (
            f"post-copy: the tree's private memory ({_mib(self.private_bytes)}) is below "
            f"--post-copy-min ({_mib(self.post_copy_min)}), where post-copy's own costs "
            "outweigh it: the memory moves while frozen (--post-copy-min 0 forces post-copy)"
        )


def choose(pids: Sequence[int], post_copy: bool, post_copy_min: int) -> MemoryPath:
    """Post-copy if asked and the tree holds at least ``post_copy_min`` of private memory."""

    size = private_memory(pids)
    if post_copy and post_copy_min and size < post_copy_min:
        return MemoryPath(False, size, post_copy_min)
    return MemoryPath(post_copy, size, post_copy_min if post_copy else 0)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
