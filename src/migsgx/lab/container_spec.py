"""What a lab container is made of: its root file system and its OCI runtime configuration.

No registry and no image build: a skeleton of mount points whose ``/usr`` and
``/etc`` are the machine's, read-only, with the Python installation and this
project bind-mounted at their own paths, and a ``config.json`` as ``runc spec``
would write it.  These are plain values and files, made before any engine runs,
so they stand apart from :mod:`.containers`, which drives the engines on the
testbed's hosts; the spec admission tests use :func:`runtime_spec` alone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from .hosts import EXAMPLES

__all__ = [
    "ENCLAVE_INSIDE",
    "PLATFORM_DIR_INSIDE",
    "PLATFORM_INSIDE",
    "make_skeleton",
    "python_binds",
    "runtime_spec",
]


PACKAGE_ROOT = Path(__file__).resolve().parents[2]


PLATFORM_INSIDE: Final = "/run/migsgx/enclave.sock"


PLATFORM_DIR_INSIDE: Final = "/run/migsgx"


ENCLAVE_INSIDE: Final = "/opt/enclave"


MASKED_PATHS: Final = (
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
)


READONLY_PATHS: Final = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def runtime_spec(
    args: Sequence[str],
    env: Sequence[str],
    binds: Sequence[tuple[str, str, bool]],
    *,
    netns: Path | None,
    cgroups_path: str,
    hostname: str,
) -> dict[str, Any]:
    """An OCI runtime configuration for a non-interactive process (as ``runc spec`` makes)."""

    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]},
    ]  # fmt: skip
    for source, dest, readonly in binds:
        mounts.append({"destination": dest, "type": "bind", "source": source,
                       "options": ["rbind", "ro" if readonly else "rw"]})  # fmt: skip
    network: dict[str, str] = {"type": "network"}
    if netns is not None:
        network["path"] = str(netns)
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": list(env),
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": cgroups_path,
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")] + [network],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def python_binds() -> list[tuple[str, str, bool]]:
    """The interpreter, and this project with its virtual environment, at their own paths."""

    binds = [("/usr", "/usr", True), ("/etc", "/etc", True)]
    base = Path(sys.base_prefix).resolve()
    if not base.is_relative_to("/usr"):
        binds.append((str(base), str(base), True))
    # The directory that holds the migsgx package (src/ of a checkout, or
    # site-packages), the examples, and the virtual environment, each once.
    for path in (PACKAGE_ROOT, EXAMPLES.resolve(), Path(sys.prefix).resolve()):
        if path.is_relative_to("/usr") or any(path.is_relative_to(b[0]) for b in binds):
            continue
        binds.append((str(path), str(path), True))
    return binds


def make_skeleton(root: Path) -> Path:
    """A root file system of mount points and the merged-/usr links, nothing else."""

    root.mkdir(parents=True, exist_ok=True)
    for sub in ("usr", "etc", "proc", "dev", "sys", "tmp", "run/migsgx", "opt/enclave", "root"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if Path("/usr", link).is_dir() and not (root / link).is_symlink():
            (root / link).symlink_to(f"usr/{link}")
    for _source, dest, _ro in python_binds():
        (root / dest.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / PLATFORM_INSIDE.lstrip("/")).touch()
    return root
