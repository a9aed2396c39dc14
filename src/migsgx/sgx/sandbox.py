"""The sandbox every enclave process runs in (the emulation's isolation boundary).

On SGX the CPU keeps enclave memory from everything else on the host.  Here an
enclave is a process, so the platform service builds the boundary from the
kernel's parts (``docs/security.md``):

* its own unprivileged uid, chosen at random per launch (no other process has
  it: no signals, no ptrace, no ``/proc/PID/mem`` of or from anyone else) and a
  real gid that differs from its effective gid, which makes the kernel start the
  runtime *non-dumpable* at ``execve`` already, before any Python runs;
* a private mount namespace whose root is an empty read-only tmpfs holding only
  read-only binds of the runtime (the system's ``/usr``, the Python installation,
  the virtual environment and the migsgx package), ``/dev/null``, ``/dev/zero``,
  ``/dev/urandom`` and a ``/proc`` that shows only its own process
  (``hidepid=invisible,subset=pid``): nothing of the host's state;
* its own, empty network namespace (only a ``lo`` that is down), IPC and UTS
  namespaces;
* a seccomp allowlist (:mod:`.syscalls`), resource limits (a generic ceiling at
  launch, narrowed to the manifest's by the runtime before enclave code loads:
  :func:`manifest_limits`), and ``no_new_privs``.

The launcher (:mod:`.launcher`) does this as root, in the child, before it execs
the runtime.  Without root the service cannot build it and launches enclaves as
its own user (the old, weaker mode; ``platform serve`` says so).
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import migsgx

__all__ = [
    "DEFAULT_LIMITS",
    "UID_RANGE",
    "SandboxSpec",
    "launcher_command",
    "manifest_limits",
    "runtime_binds",
]

#: Per-launch uids come from here: far above any account, never reused on purpose.
UID_RANGE: Final = (0x40000000, 0x7FFF0000)
NOGROUP: Final = 65534

_HEADROOM_AS: Final = 4 << 30
"""Address space beyond the enclave memory: the interpreter, numpy's and glibc's
per-thread arenas and stacks reserve a lot of it without touching it."""

#: Ceilings at launch (the runtime narrows them once it knows the manifest).
DEFAULT_LIMITS: Final = {
    "RLIMIT_CORE": 0,
    "RLIMIT_NOFILE": 256,
    "RLIMIT_FSIZE": 16 << 20,  # the log, the only file it can write
    "RLIMIT_NPROC": 256,  # per uid, and the uid is this process's alone: threads
    "RLIMIT_MEMLOCK": 64 << 10,
}


@dataclass(frozen=True)
class SandboxSpec:
    """What the launcher needs; made by the service, passed as JSON on the command line."""

    root: str
    uid: int
    gid: int
    binds: list[str]
    limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    seccomp: bool = True

    @classmethod
    def fresh(cls, root: Path, binds: list[str], *, seccomp: bool = True) -> SandboxSpec:
        uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
        return cls(str(root), uid, uid, binds, seccomp=seccomp)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SandboxSpec:
        raw = json.loads(text)
        return cls(
            root=str(raw["root"]),
            uid=int(raw["uid"]),
            gid=int(raw["gid"]),
            binds=[str(b) for b in raw["binds"]],
            limits={str(k): int(v) for k, v in raw["limits"].items()},
            seccomp=bool(raw["seccomp"]),
        )


def runtime_binds() -> list[str]:
    """The host paths an enclave runtime needs, read-only: code, never state."""

    package_root = Path(migsgx.__file__).resolve().parent.parent
    candidates = [
        "/usr",
        "/etc/ld.so.cache",
        sys.base_prefix,
        sys.prefix,
        str(Path(sys.executable).resolve().parent.parent),
        str(package_root),
    ]
    seen: list[str] = []
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.exists(real) and not any(_inside(real, s) for s in seen):
            seen = [s for s in seen if not _inside(s, real)] + [real]
    # The virtual environment's own path is what sys.executable names (a symlink).
    venv = os.path.abspath(sys.prefix)
    if venv not in seen and not any(_inside(venv, s) for s in seen):
        seen.append(venv)
    return sorted(seen)


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def launcher_command(spec: SandboxSpec, argv: list[str]) -> list[str]:
    """The command that runs ``argv`` inside the sandbox ``spec`` describes."""

    return [sys.executable, "-P", "-m", "migsgx.sgx.launcher", spec.to_json(), "--", *argv]


def manifest_limits(memory_size: int, thread_slots: int) -> dict[str, int]:
    """The limits an enclave with this manifest runs under (applied by the runtime)."""

    return {
        "RLIMIT_AS": memory_size + _HEADROOM_AS,
        "RLIMIT_NPROC": 2 * thread_slots + 64,
        "RLIMIT_NOFILE": 64 + 4 * thread_slots,
    }


def apply_limits(limits: dict[str, int]) -> None:
    """Lower (never raise) each named limit; an unknown name is a programming error."""

    for name, value in limits.items():
        which = getattr(resource, name)
        _soft, hard = resource.getrlimit(which)
        new_hard = value if hard == resource.RLIM_INFINITY else min(hard, value)
        resource.setrlimit(which, (min(value, new_hard), new_hard))
