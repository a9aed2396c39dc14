"""How one host runs its containers: ``STATE/containers.toml``.

Both the migration tool and the agent of a host read it from the host's state
directory; every key is optional and defaults to what the engines do on their
own, which is right for a host that is a machine of its own::

    runc_root = "/run/runc"              # runc --root
    podman_root = "/var/lib/migsgx-podman" # podman's storage, run, runc state and tmp under it
    podman_storage_driver = "vfs"        # podman --storage-driver
    cgroup_parent = "/migsgx"            # cgroup parent of containers restored here
    netns = "/run/netns/blue"            # the network namespace of containers that joined
                                         # their host's (default: the agent's own)
    containerd_address = "/run/containerd/containerd.sock"  # ctr --address
    containerd_namespace = "default"     # ctr --namespace
    containerd_snapshotter = "overlayfs" # for containers restored here
    bind_sources = ["/usr", "/srv/data"] # host paths a peer's container may bind-mount
                                         # read-only (and below them); default: none
    writable_bind_sources = ["/srv/data/out"]  # ... and read-write; default: none
    security_labels = ["my-profile"]     # AppArmor profiles / SELinux labels a peer's
                                         # container may name; default: none
    pod_bridge = "br0"                   # where containers that own their address attach
    pod_netns_prefix = "migsgx-pod-"     # names of the network namespaces made for them
    pod_addresses = ["10.1.0.100/24"]    # the addresses this host may hold for them

``bind_sources`` and ``security_labels`` are this host's grants to containers
that *arrive* from a peer (:mod:`.admission`): everything else a peer's
configuration asks beyond the engines' defaults is refused.

Several emulated hosts on one machine (tests, the demo, the benchmark) share
the machine's filesystem, cgroups and engine state, so each gets its own
roots and cgroup parent here.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import tomli_w

from ..errors import ConfigError

__all__ = ["SETTINGS_FILE", "ContainerSettings"]

SETTINGS_FILE: Final = "containers.toml"
_PATH_KEYS: Final = ("runc_root", "podman_root", "netns", "containerd_address")
_TEXT_KEYS: Final = (
    "podman_storage_driver",
    "cgroup_parent",
    "containerd_namespace",
    "containerd_snapshotter",
    "pod_bridge",
    "pod_netns_prefix",
)
_LIST_KEYS: Final = ("bind_sources", "writable_bind_sources", "security_labels", "pod_addresses")


@dataclass(frozen=True)
class ContainerSettings:
    runc_root: Path | None = None
    podman_root: Path | None = None
    podman_storage_driver: str | None = None
    cgroup_parent: str | None = None
    netns: Path | None = None
    containerd_address: Path | None = None
    containerd_namespace: str | None = None
    containerd_snapshotter: str | None = None
    bind_sources: tuple[Path, ...] = ()
    writable_bind_sources: tuple[Path, ...] = ()
    security_labels: tuple[str, ...] = ()
    #: Containers that own their address (:mod:`.podnet`): the host's bridge, the names
    #: of their network namespaces, and the only addresses the agent may take for them.
    pod_bridge: str | None = None
    pod_netns_prefix: str = "migsgx-pod-"
    pod_addresses: tuple[str, ...] = ()

    @classmethod
    def load(cls, state: Path | None) -> ContainerSettings:
        """The settings in ``STATE/containers.toml``; defaults when there is none."""

        if state is None:
            return cls()
        path = Path(state) / SETTINGS_FILE
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        return cls.from_mapping(data, where=str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, where: str = "settings") -> ContainerSettings:
        unknown = set(data) - set(_PATH_KEYS) - set(_TEXT_KEYS) - set(_LIST_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in _LIST_KEYS:
                values[key] = _strings(key, value, where)
                continue
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: {key} must be a non-empty string")
            values[key] = Path(value) if key in _PATH_KEYS else value
        for key in ("bind_sources", "writable_bind_sources"):
            values[key] = tuple(Path(p) for p in values.get(key, ()))
            for path in values[key]:
                if not path.is_absolute() or ".." in path.parts or path == Path("/"):
                    raise ConfigError(f"{where}: {key} holds absolute paths below / ({path})")
        parent = values.get("cgroup_parent")
        if parent is not None and (not parent.startswith("/") or ".." in parent.split("/")):
            raise ConfigError(f"{where}: cgroup_parent must be an absolute cgroup path")
        return cls(**values)

    def save(self, state: Path) -> Path:
        path = Path(state) / SETTINGS_FILE
        data: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key in _LIST_KEYS:
                if value:
                    data[key] = [str(v) for v in value]
            elif value is not None:
                data[key] = str(value)
        path.write_text(tomli_w.dumps(data))
        return path


def _strings(key: str, value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings, none empty")
    return tuple(value)
