"""``migsgx recover --checkpoint DIR``: a checkpoint or restore that a crash left undecided.

The decision is durable and not the tool's: each enclave's *gate* in the host's
platform store says whether its source committed (``docs/spec/checkpoint.md``).
Only an enclave can read a gate, so the probe launches a fresh enclave of each
image and asks it to open its checkpoint (``__ckpt_in``, with the digest of the
metadata); it refuses unless the gate is committed, and is then discarded (a
read changes nothing).  The directory's journal (:mod:`.ckpt_journal`) names the
tool and the source tree, and tells a restore under way from one that ended.

Resolution, idempotent, to exactly one runnable copy:

* the tool still runs: nothing is done (``in-progress``);
* every gate committed: the checkpoint is the copy.  A source tree a dead tool
  left fenced (stopped, same pid and start time) is killed: it must never run
  beside it; a tree a dead restore left held is removed (it never ran).  The
  outcome is ``restorable``: ``migsgx restore --dir`` makes it run;
* no gate committed: the source is the copy.  A fenced source is continued; the
  checkpoint's files, which can never open, are removed (``stayed``, or
  ``gone`` if the source died too: then its enclave state went with it, as in
  a crash);
* some committed, others not: ``in-doubt``, an operator decides (as for a
  migration);
* the journal says a restore ended, or was activating the enclaves when it
  died (the gates are consumed then): ``done``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from ..datapath.checkpoint import CheckpointIn
from ..errors import CheckpointGateError, MigSGXError
from ..system.process import continue_tree, process_state
from .checkpoint import CHECKPOINT_META, _remove_fenced_source, _remove_held_leftover
from .ckpt_journal import JOURNAL, read_journal, start_time, write_journal
from .recover import Resolution

__all__ = ["resolve_checkpoint"]


def _tool_alive(journal: dict[str, object]) -> bool:
    pid, start = journal.get("tool_pid"), journal.get("tool_start")
    return isinstance(pid, int) and pid != os.getpid() and start_time(pid) == start != ""


def _committed(directory: Path, count: int, platform_socket: Path, meta: bytes) -> list[bool]:
    """Per enclave, whether its gate is committed (raises if that cannot be learnt)."""

    found = []
    for index in range(count):
        try:
            CheckpointIn(directory, index, platform_socket, meta).probe()
        except CheckpointGateError:
            found.append(False)
        else:
            found.append(True)
    return found


def _continue_source(journal: dict[str, object]) -> bool:
    """Lift a dead tool's fence from the source tree; whether the source lives."""

    pid, start = journal.get("pid"), journal.get("start")
    if not isinstance(pid, int) or not start or start_time(pid) != start:
        return False
    if process_state(pid) in ("T", "t"):
        with contextlib.suppress(MigSGXError, ProcessLookupError):
            continue_tree(pid)
    return process_state(pid) not in ("", "Z", "X")


def _remove_files(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name != JOURNAL and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()


def resolve_checkpoint(directory: Path, platform_socket: Path | None) -> Resolution:
    """Resolve the checkpoint in ``directory`` (see the module docstring)."""

    directory = Path(directory)
    name = str(directory)
    journal = read_journal(directory)
    raw_meta: bytes | None = None
    with contextlib.suppress(OSError):
        raw_meta = (directory / CHECKPOINT_META).read_bytes()
    if journal is None and raw_meta is None:
        return Resolution(name, "-", "none", "done", "no checkpoint here")
    phase = str(journal["phase"]) if journal else "done"
    if journal is not None and _tool_alive(journal):
        return Resolution(name, phase, "-", "in-progress", "its tool still runs")
    if phase == "restored":
        return Resolution(name, phase, "commit", "done", "restored")
    meta: dict[str, object] = {}
    if raw_meta is not None:
        with contextlib.suppress(ValueError):
            loaded = json.loads(raw_meta)
            meta = loaded if isinstance(loaded, dict) else {}
    declared = meta.get("enclaves") or (journal or {}).get("enclaves") or 0
    count = declared if isinstance(declared, int) and 0 <= declared <= 64 else 0
    if raw_meta is None or phase == "aborted":
        committed = [False] * max(count, 1)  # no metadata: the commit never came
    elif count == 0:
        committed = [phase in ("committed", "done", "restoring")]
    else:
        if platform_socket is None:
            return Resolution(name, phase, "?", "in-doubt",
                              "name the host's --platform-socket to read the gates")  # fmt: skip
        try:
            committed = _committed(
                directory, count, platform_socket, hashlib.sha256(raw_meta).digest()
            )
        except (MigSGXError, OSError) as exc:
            return Resolution(name, phase, "?", "in-doubt", f"the gates cannot be read: {exc}")
    if all(committed):
        _remove_held_leftover(directory)  # a dead restore's tree: it never ran
        _remove_fenced_source(meta)  # the source gave its state up: it never runs again
        if phase not in ("committed", "done", "restoring"):
            write_journal(directory, "committed")
        return Resolution(name, phase, "commit", "restorable",
                          f"run: migsgx restore --dir {directory}")  # fmt: skip
    if any(committed):
        return Resolution(
            name, phase, "mixed", "in-doubt",
            "some enclaves committed, others did not: an operator decides",
        )  # fmt: skip
    if phase == "restoring":
        # The restore had loaded every enclave (so every gate was committed) and
        # was activating them: it consumed the gates.  Its tree runs, or it died
        # with its tool in that window (``spec/checkpoint.md``, section 4).
        return Resolution(name, phase, "commit", "done",
                          "a restore consumed the checkpoint (it restores only once)")  # fmt: skip
    # Nothing committed (the gates are pending or gone): the source is the copy.
    runs = _continue_source(journal or meta)
    _remove_files(directory)
    if journal is not None:
        write_journal(directory, "aborted")
    if runs:
        return Resolution(name, phase, "abort", "stayed", "the source runs on")
    return Resolution(name, phase, "abort", "gone",
                      "the source is gone too: its enclave state went with it")  # fmt: skip
