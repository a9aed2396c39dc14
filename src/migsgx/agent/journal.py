"""The migration tool's journal on the source host: what ``migsgx recover`` starts from.

One small file per migration, ``STATE/agent/migrations/<mid>.json``, written
atomically at each step that matters to a recovery: where the migration went,
which source enclaves (by their own migration ids) take part, which pids were
fenced, and the phase.  The decisions themselves are not here: they are the
source enclaves' records in the platform store (``docs/spec/commit.md``); the
journal only says where to carry them.  Nothing in it is secret.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .._fs import write_private
from .._records import hex_text, json_record, non_negative_int, own_record
from ..containers.engine_notes import ENGINE_NOTES
from ..errors import RecordDamagedError
from .ckpt_journal import start_time

__all__ = ["PHASES", "Journal", "journal_dir"]

#: begun -> loaded (enclave ids known) -> fenced -> committed -> done, or -> aborted ->
#: done.  A phase is written only once what it says is true: ``aborted`` stays until
#: the source runs again with its enclaves (``docs/spec/commit.md`` 4).
PHASES: Final = ("begun", "loaded", "fenced", "committed", "done", "aborted")
_KEYS: Final = {
    "mid": str,
    "to": list,
    "tool_pid": int,
    "app_pid": int,
    "app_name": str,
    "enclave_mids": list,
    "fenced": list,
    "phase": str,
}
#: Keys a journal may lack (written later, absent from older journals, or not needed
#: by every source).  ``guardian_pid``: the guardian that holds the source enclaves;
#: ``undo``: how to give a container back (the guardian's ``criu``, ``netup``,
#: ``thaw``, ``ungate`` notes), for a ``recover`` that finds the source is the copy, and which
#: engine record a committed one leaves (its ``runc``, ``podman``, ``containerd``
#: note: :mod:`migsgx.containers.engine_notes`);
#: ``holders``: per enclave ``[pid, fd, start, nonce]``, the duplicate of its connection
#: each source enclave holds (``__mig_hold``), and ``enclaves``: per enclave what
#: its offer names (the guardian's ``enclave`` note payload, hex CBOR), so that
#: ``recover`` can deliver a committed enclave's state again once the tool and
#: the guardian are both gone; ``tool_start``: the tool's start time (its pid may
#: be reused); ``dump_dir``: the tool's own images directory, removed once the
#: tool is gone (:mod:`.dumpdirs`).  ``aborts``: per enclave the ABORT frame (hex;
#: "" for none) its ``__mig_abort`` returned to the guardian or ``recover``, kept
#: for an abort whose store record failed (its platform service died with the
#: tool, ``docs/spec/commit.md`` 1 rule 4): then the store holds nothing to carry.
#: ``fenced_starts``: each fenced pid's start time, so that a pid reused since
#: (the tree ended, another process got the number) is never signalled.
#: ``source_lost``: indices of source enclaves the tool, the guardian or ``recover``
#: found dead undecided while the others aborted and no COMMIT was recorded (``docs/spec/commit.md``
#: section 5): every ABORT delivery names them, so that their destination copies,
#: which no decision can ever reach, end with the held tree.
#: ``unconfirmed``: indices of source enclaves whose abort the tool's roll-back could
#: not confirm (no answer, or a refusal): still frozen until one answers an abort
#: asked again (``docs/spec/commit.md`` section 4).  ``closed_gates``: the ``ungate``
#: notes whose gate could not be opened yet; ``migsgx recover`` tries them again.
#: ``handed_back``: under ``aborted``, the guardian gave the source back (it runs, its
#: enclaves handed back); what it still does is tell the destination, which
#: ``recover`` may do beside it (delivering an ABORT twice changes nothing).
_OPTIONAL: Final = {
    "guardian_pid": int,
    "undo": list,
    "holders": list,
    "enclaves": list,
    "tool_start": str,
    "dump_dir": str,
    "aborts": list,
    "fenced_starts": list,
    "source_lost": list,
    "unconfirmed": list,
    "closed_gates": list,
    "handed_back": bool,
}


#: A pid, a descriptor number: what the kernel's ``int`` arguments take.
_INT_LIMIT: Final = 1 << 31
_DECIMAL: Final = re.compile(r"[0-9]{1,10}")


def _holder_ok(item: object) -> bool:
    """``[]`` (no duplicate held) or ``[pid, fd, start]`` and a hex nonce, each in range:
    :func:`.holders.take_held` hands ``pid`` and ``fd`` to ``pidfd_getfd``."""

    if not isinstance(item, list) or len(item) not in (0, 3, 4):
        return False
    if not item:
        return True
    pid, fd, start = item[:3]
    nonce = item[3] if len(item) == 4 else "00"
    return (non_negative_int(pid, _INT_LIMIT) and pid > 0 and non_negative_int(fd, _INT_LIMIT)
            and isinstance(start, str) and isinstance(nonce, str) and bool(nonce)
            and hex_text(nonce))  # fmt: skip


def _note_ok(note: object) -> bool:
    """An ``undo`` note of a known kind and shape: ``criu PID...`` (pids to kill),
    ``netup PATH``, ``thaw PATH``; an ``ungate`` or engine note (``runc``,
    ``podman``, ``containerd``) whose own reader (:func:`~migsgx.containers.gate.parse_ungate`,
    :func:`~migsgx.containers.engine_notes.engine_records`) skips it when garbled:
    that leaves a gate or a record for an operator, never the wrong one touched."""

    if not isinstance(note, str) or "\0" in note:
        return False
    kind, _, arg = note.partition(" ")
    if kind == "criu":
        return all(_DECIMAL.fullmatch(p) and 0 < int(p) < _INT_LIMIT for p in arg.split())
    if kind in ("netup", "thaw"):
        return bool(arg.strip())
    return kind == "ungate" or kind in ENGINE_NOTES


def _damaged_field(data: dict[str, Any]) -> str | None:
    """The first field of ``data`` that is not what the tool writes, or None."""

    for key, kind in _KEYS.items():
        if not isinstance(data.get(key), kind):
            return key
    for key, kind in _OPTIONAL.items():
        if key in data and not isinstance(data[key], kind):
            return key
    if not all(_holder_ok(h) for h in data.get("holders") or []):
        return "holders"
    if not all(_note_ok(n) for n in data.get("undo") or []):
        return "undo"
    if not all(
        isinstance(n, str) and n.startswith("ungate ") for n in data.get("closed_gates") or []
    ):
        return "closed_gates"
    if not all(non_negative_int(i, _INT_LIMIT) for i in data.get("unconfirmed") or []):
        return "unconfirmed"
    return None


def journal_dir(agent_dir: Path) -> Path:
    return Path(agent_dir) / "migrations"


def _mtime(path: Path) -> float:
    """For the order of :meth:`Journal.all`: a name that is gone or a dangling link
    sorts first (:meth:`Journal.load` then refuses it), instead of ending ``recover``."""

    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


@dataclass
class Journal:
    path: Path
    data: dict[str, Any]

    @classmethod
    def start(
        cls, agent_dir: Path, mid: bytes, to: tuple[str, int], app_pid: int, app_name: str
    ) -> Journal:
        directory = journal_dir(agent_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        journal = cls(
            directory / f"{mid.hex()}.json",
            {
                "mid": mid.hex(),
                "to": [to[0], int(to[1])],
                "tool_pid": os.getpid(),
                "tool_start": start_time(os.getpid()),
                "app_pid": app_pid,
                "app_name": app_name,
                "enclave_mids": [],
                "fenced": [],
                "phase": "begun",
            },
        )
        journal.update()
        return journal

    @classmethod
    def load(cls, path: Path) -> Journal:
        """The journal in ``path``; :class:`RecordDamagedError` unless every field is usable.

        Every property below must then work: a crash or a local user may leave
        any bytes here, and ``migsgx recover`` must say so, not trip later.  And
        only a file the tool's user wrote counts (:func:`~migsgx._records.own_record`):
        a journal makes ``recover`` (and a guardian) kill its ``fenced`` pids, take
        descriptors from its ``holders``, remove its ``dump_dir`` and carry
        decisions to its ``to``; one planted by another user (a state directory
        others may write), or a link to one, must do none of that.
        """

        data = json_record(own_record(path, "a journal"), f"migration journal {path}")
        if (field := _damaged_field(data)) is not None:
            raise RecordDamagedError(f"{path} is not a migration journal: its {field} field")
        to = data["to"]
        if (
            not hex_text(data["mid"])
            or not data["mid"]
            or not (len(to) == 2 and isinstance(to[0], str) and non_negative_int(to[1], 1 << 16))
            or not all(hex_text(m) for m in data["enclave_mids"])
            or not all(non_negative_int(p, 1 << 31) for p in data["fenced"])
            or not all(non_negative_int(data[k], 1 << 31) for k in ("tool_pid", "app_pid"))
            or not all(hex_text(f) for f in data.get("aborts") or [])
            or not all(isinstance(t, str) for t in data.get("fenced_starts") or [])
        ):
            raise RecordDamagedError(f"{path} is not a migration journal")
        if data["phase"] not in PHASES:
            raise RecordDamagedError(f"{path}: unknown phase {data['phase']!r}")
        return cls(path, data)

    @classmethod
    def all(cls, agent_dir: Path) -> list[Journal]:
        """Every readable journal, oldest first (unreadable ones are skipped)."""

        directory = journal_dir(agent_dir)
        if not directory.is_dir():
            return []
        found = []
        for path in sorted(directory.glob("*.json"), key=_mtime):
            try:
                found.append(cls.load(path))
            except (OSError, ValueError):
                continue
        return found

    @classmethod
    def damaged(cls, agent_dir: Path) -> list[tuple[Path, str]]:
        """Every journal :meth:`all` skips, with why: ``recover`` reports them in doubt."""

        directory = journal_dir(agent_dir)
        found = []
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            try:
                cls.load(path)
            except (OSError, ValueError) as exc:
                found.append((path, str(exc)))
        return found

    @property
    def mid(self) -> bytes:
        return bytes.fromhex(self.data["mid"])

    @property
    def to(self) -> tuple[str, int]:
        return str(self.data["to"][0]), int(self.data["to"][1])

    @property
    def phase(self) -> str:
        return str(self.data["phase"])

    @property
    def enclave_mids(self) -> list[bytes]:
        return [bytes.fromhex(m) for m in self.data["enclave_mids"]]

    @property
    def guardian_pid(self) -> int:
        """The guardian holding the committed source enclaves; 0 if not recorded."""

        pid = self.data.get("guardian_pid")
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else 0

    @property
    def fenced(self) -> list[int]:
        return [int(p) for p in self.data["fenced"]]

    def fenced_now(self) -> list[int]:
        """The fenced pids that are still the tasks the tool stopped (the same start time).

        What ``recover`` may signal: a tree that ended gave its pids to whatever
        process came next, which a SIGKILL (or a SIGCONT) must never reach.  A
        journal without start times (an older tool's) names its pids alone.
        """

        starts = self.data.get("fenced_starts")
        if not isinstance(starts, list) or len(starts) != len(self.data["fenced"]):
            return self.fenced
        return [p for p, t in zip(self.fenced, starts, strict=True) if t and start_time(p) == t]

    @property
    def holders(self) -> list[object]:
        return list(self.data.get("holders") or [])

    @property
    def enclaves(self) -> list[str]:
        return [str(e) for e in self.data.get("enclaves") or []]

    @property
    def aborts(self) -> list[bytes]:
        """The ABORT frames the source enclaves returned; [] unless one per enclave."""

        frames = [bytes.fromhex(f) for f in self.data.get("aborts") or []]
        return frames if len(frames) == len(self.data["enclave_mids"]) else []

    @property
    def dump_dir(self) -> Path | None:
        """The tool's own images directory, if it made one (not a ``--work-dir``)."""

        text = self.data.get("dump_dir")
        return Path(text) if isinstance(text, str) and text else None

    @property
    def unconfirmed(self) -> list[int]:
        """The source enclaves whose abort was not confirmed (:data:`_OPTIONAL`)."""

        return [int(i) for i in self.data.get("unconfirmed") or []]

    @property
    def closed_gates(self) -> list[str]:
        """The ``ungate`` notes whose gate stays closed until opened (:data:`_OPTIONAL`)."""

        return [str(n) for n in self.data.get("closed_gates") or []]

    @property
    def undo(self) -> list[str]:
        return [str(n) for n in self.data.get("undo") or []]

    def update(self, **fields: Any) -> None:
        for key, value in fields.items():
            if key not in _KEYS and key not in _OPTIONAL:
                raise KeyError(key)
            self.data[key] = value
        write_private(self.path, json.dumps(self.data, sort_keys=True).encode())
