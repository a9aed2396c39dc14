"""The allow list a destination holds a peer's container configuration to: its terms,
what the operator adds (:class:`SpecPolicy`, from ``containers.toml``), and the
refusal (:class:`SpecRefused`, naming the field).

What is granted changes only with this module, the operator's settings or this
host's own limits; the checks that read a configuration against it are in
:mod:`.admission` (the OCI configuration) and :mod:`.image_admission` (CRIU's
images), which both refuse through :func:`_refuse` and read the peer's values
through :func:`_mapping` and :func:`_list`.
"""

from __future__ import annotations

import posixpath
import resource
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import register_error
from .base import ContainerError
from .settings import ContainerSettings

__all__ = [
    "CAPABILITY_SETS",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_DEVICES",
    "ENGINE_FILESYSTEMS",
    "MASKED_PATHS",
    "READONLY_PATHS",
    "REQUIRED_NAMESPACES",
    "SpecPolicy",
    "SpecRefused",
    "host_rlimits",
]


@register_error
class SpecRefused(ContainerError):
    """A peer's container configuration asks for what this host does not grant."""

    code = "container-spec"

    @property
    def field(self) -> str:
        """The configuration field refused (``mounts[3].source``, ``linux.devices[0]`` ...)."""

        return str(self.context.get("field", ""))


#: File systems a container engine mounts itself; their ``source`` is a name, not a path.
ENGINE_FILESYSTEMS: Final = frozenset(
    {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"}
)
#: The capabilities Docker, containerd and podman give a container by default (their union).
DEFAULT_CAPABILITIES: Final = frozenset(
    {
        "CAP_AUDIT_WRITE",
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_MKNOD",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_RAW",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_CHROOT",
    }
)
CAPABILITY_SETS: Final = ("bounding", "effective", "inheritable", "permitted", "ambient")
NAMESPACE_TYPES: Final = frozenset(
    {"pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"}
)
#: Without one of these the container would share the host's.
REQUIRED_NAMESPACES: Final = frozenset({"pid", "ipc", "uts", "mount"})
#: (type, major, minor) -> path: what runc creates in every container anyway.
DEFAULT_DEVICES: Final[Mapping[tuple[str, int, int], str]] = {
    ("c", 1, 3): "/dev/null",
    ("c", 1, 5): "/dev/zero",
    ("c", 1, 7): "/dev/full",
    ("c", 1, 8): "/dev/random",
    ("c", 1, 9): "/dev/urandom",
    ("c", 5, 0): "/dev/tty",
    ("c", 5, 1): "/dev/console",
    ("c", 5, 2): "/dev/ptmx",
}
PTS_MAJOR: Final = 136  # /dev/pts/N: the container's own devpts instance
#: Masked (``maskedPaths``) and read-only (``readonlyPaths``) by runc, podman and containerd alike.
MASKED_PATHS: Final = ("/proc/kcore", "/proc/keys", "/sys/firmware")
READONLY_PATHS: Final = ("/proc/sys", "/proc/sysrq-trigger")
#: AppArmor profiles the engines load by default (a prefix: they carry a version).
ENGINE_APPARMOR: Final = ("containers-default-", "docker-default", "cri-containerd.apparmor.d")
RLIMITS: Final = frozenset(
    {
        "RLIMIT_AS",
        "RLIMIT_CORE",
        "RLIMIT_CPU",
        "RLIMIT_DATA",
        "RLIMIT_FSIZE",
        "RLIMIT_LOCKS",
        "RLIMIT_MEMLOCK",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_NOFILE",
        "RLIMIT_NPROC",
        "RLIMIT_RSS",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
        "RLIMIT_SIGPENDING",
        "RLIMIT_STACK",
    }
)
SECCOMP_FLAGS: Final = frozenset({"SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG"})
REFUSED_ANNOTATIONS: Final = ("org.systemd.property.", "run.oci.")
SHARED_PROPAGATION: Final = frozenset({"shared", "rshared"})

TOP_KEYS: Final = frozenset(
    {"ociVersion", "process", "root", "hostname", "domainname", "mounts", "linux",
     "annotations", "hooks"}
)  # fmt: skip
PROCESS_KEYS: Final = frozenset(
    {"terminal", "consoleSize", "user", "args", "commandLine", "env", "cwd", "capabilities",
     "rlimits", "noNewPrivileges", "apparmorProfile", "oomScoreAdj", "selinuxLabel", "umask"}
)  # fmt: skip
LINUX_KEYS: Final = frozenset(
    {"namespaces", "uidMappings", "gidMappings", "timeOffsets", "devices", "cgroupsPath",
     "resources", "sysctl", "seccomp", "rootfsPropagation", "maskedPaths", "readonlyPaths",
     "mountLabel"}
)  # fmt: skip
MOUNT_KEYS: Final = frozenset({"destination", "source", "type", "options", "uidMappings",
                               "gidMappings"})  # fmt: skip


def host_rlimits() -> dict[str, int]:
    """This process's hard limits by OCI name (``-1``: unlimited): what a peer may ask at most."""

    out: dict[str, int] = {}
    for name in RLIMITS:
        number = getattr(resource, name, None)
        if number is None:
            continue
        hard = resource.getrlimit(number)[1]
        out[name] = -1 if hard == resource.RLIM_INFINITY else int(hard)
    return out


@dataclass(frozen=True)
class SpecPolicy:
    """What this host's operator grants beyond the list (``containers.toml``)."""

    #: Host paths (and everything below them) a container may have bind-mounted read-only.
    bind_sources: tuple[Path, ...] = ()
    #: ... and read-write.
    writable_bind_sources: tuple[Path, ...] = ()
    #: AppArmor profiles or SELinux labels a container may ask for by name.
    security_labels: frozenset[str] = frozenset()
    #: Hard limits by OCI rlimit name (``-1``: unlimited); default: this process's own.
    rlimits: Callable[[], Mapping[str, int]] = field(default=host_rlimits, compare=False)
    #: How a bind source is resolved on this host (symlinks followed): a hook for tests.
    resolve: Callable[[str], str] = field(default=posixpath.realpath, compare=False)

    @classmethod
    def from_settings(cls, settings: ContainerSettings) -> SpecPolicy:
        return cls(
            bind_sources=tuple(settings.bind_sources),
            writable_bind_sources=tuple(settings.writable_bind_sources),
            security_labels=frozenset(settings.security_labels),
        )


def _refuse(where: str, why: str) -> SpecRefused:
    return SpecRefused(f"the container's configuration is refused: {where}: {why}", field=where)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _refuse(where, "not an object")
    return value


def _list(value: Any, where: str) -> Sequence[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _refuse(where, "not a list")
    return value


def _known_keys(value: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in value:
        if key not in allowed:
            raise _refuse(f"{where}{key}", "not on this host's allow list")
