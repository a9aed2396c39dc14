"""What a destination grants a peer's container configuration: an allow list, checked first.

A container's OCI configuration comes from the source host, and the source is
a peer: even one with the deployment's certificate must not get, on *this*
host, what this host's operator never granted.  A configuration names host
paths to bind-mount, capabilities, namespaces to join, devices, sysctls and
security labels; each is a way onto the host.  :func:`admit` checks the
configuration *after* :func:`~.oci.localize` rewrote what is this host's
business (the platform socket's source, the network namespace's path, the
cgroup path) and before any engine sees it; whatever is not on the list is a
:class:`SpecRefused` naming the field, and nothing is launched.

The list, in short (``docs/containers.md``, "What a peer's configuration may ask"):

* mounts: the kinds a container engine makes itself (``proc``, ``sysfs``,
  ``tmpfs``, ``devpts``, ``mqueue``, ``cgroup``), the platform socket this
  host put there, and bind mounts of host paths under a source the operator
  allowed (``bind_sources`` in ``containers.toml``, read-only;
  ``writable_bind_sources``, read-write), symlinks resolved on this host; no
  shared propagation;
* capabilities: at most the engines' default set (:data:`DEFAULT_CAPABILITIES`);
* namespaces: new ones of every kind, at least pid, ipc, uts and mount; a
  path only for the network namespace, and only the one this host assigned;
* devices: at most the default character devices (``/dev/null`` and friends),
  and device-cgroup rules that allow no more;
* sysctls: only namespaced ones (IPC, message queues; ``net.*`` only in a
  network namespace of the container's own);
* rlimits: known kinds, no higher than this host's own hard limits;
* seccomp: any filter, but no listener (a host socket); AppArmor and SELinux:
  nothing, an engine's default profile, or what the operator allowed;
* no hooks, no terminal, no Intel RDT, no annotations that engines turn into
  host settings (``org.systemd.property.*``, ``run.oci.*``), and no key the
  list does not know.

* the kernel interfaces every engine masks (``/proc/kcore``, ``/proc/sys`` ...)
  stay masked or read-only.

The list's terms, the operator's additions and the refusal are in
:mod:`.admission_list`; here, the checks of one configuration against them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .admission_list import (
    CAPABILITY_SETS,
    DEFAULT_CAPABILITIES,
    DEFAULT_DEVICES,
    ENGINE_APPARMOR,
    ENGINE_FILESYSTEMS,
    LINUX_KEYS,
    MASKED_PATHS,
    MOUNT_KEYS,
    NAMESPACE_TYPES,
    PROCESS_KEYS,
    PTS_MAJOR,
    READONLY_PATHS,
    REFUSED_ANNOTATIONS,
    REQUIRED_NAMESPACES,
    RLIMITS,
    SECCOMP_FLAGS,
    SHARED_PROPAGATION,
    TOP_KEYS,
    SpecPolicy,
    SpecRefused,
    _known_keys,
    _list,
    _mapping,
    _refuse,
    host_rlimits,
)

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
    "admit",
    "check_shape",
    "host_rlimits",
]


class _Each:
    """An object of any names (strings), each value of ``shape``."""

    def __init__(self, shape: Any) -> None:
        self.shape = shape


_DEVICE: dict[str, Any] = {"type": str, "major": int, "minor": int, "path": str, "access": str}
#: The type of every field the localization and the admission read, by path: an object
#: (a dict: these fields), a list (of one shape), an :class:`_Each` (an object of any
#: names, each value of one shape), a type, or ``object`` (anything).  ``None`` stands
#: for an absent field anywhere but in a list.
SHAPE: dict[str, Any] = {
    "hooks": object,
    "process": {
        "terminal": object,
        "env": [str],
        "capabilities": {name: [str] for name in CAPABILITY_SETS},
        "user": {"uid": int, "gid": int, "umask": int, "additionalGids": [int]},
        "rlimits": [{"type": str, "soft": int, "hard": int}],
        "apparmorProfile": str,
        "selinuxLabel": str,
    },
    "mounts": [{"destination": str, "source": str, "type": str, "options": [str]}],
    "linux": {
        "namespaces": [{"type": str, "path": str}],
        "cgroupsPath": str,
        "sysctl": _Each(str),
        "devices": [_DEVICE],
        "resources": {"devices": [{**_DEVICE, "allow": object}]},
        "maskedPaths": [str],
        "readonlyPaths": [str],
        "seccomp": {"flags": [str], "listenerPath": object, "listenerMetadata": object},
        "rootfsPropagation": str,
        "mountLabel": str,
    },
    "root": {"path": str, "readonly": bool},
    "annotations": _Each(str),
}


def check_shape(spec: Any) -> Mapping[str, Any]:
    """``spec`` if every field the localization and :func:`admit` read has its type.

    A peer's configuration is any JSON: a list where an object belongs, a
    number for a name, is a :class:`SpecRefused` naming the field (before any
    code reads it), never another exception.
    """

    if not isinstance(spec, Mapping):
        raise _refuse("(the configuration)", "not an object")
    _shape(spec, SHAPE, "")
    return spec


def _shape(value: Any, shape: Any, where: str) -> None:
    if value is None or shape is object:
        return
    if isinstance(shape, dict | _Each):
        if not isinstance(value, Mapping):
            raise _refuse(where, "not an object")
        for key, item in value.items():
            if not isinstance(key, str):
                raise _refuse(f"{where}[{key!r}]", "not a name")
            if isinstance(shape, _Each):
                _shape(item, shape.shape, f"{where}[{key!r}]")
            elif key in shape:
                _shape(item, shape[key], f"{where}.{key}" if where else key)
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise _refuse(where, "not a list")
        for i, item in enumerate(value):
            if item is None:
                raise _refuse(f"{where}[{i}]", "null in a list")
            _shape(item, shape[0], f"{where}[{i}]")
    elif not isinstance(value, shape) or (shape is int and isinstance(value, bool)):
        # (``True`` is an ``int`` to Python: a peer's ``"uid": true`` is no integer)
        raise _refuse(where, f"not a {_TYPE_NAMES[shape]}")


_TYPE_NAMES: dict[type, str] = {str: "string", int: "integer", bool: "boolean"}


def admit(
    spec: Mapping[str, Any],
    policy: SpecPolicy,
    *,
    platform_mount: int | None,
    netns: Path | None,
) -> None:
    """Refuse ``spec`` (already localized) unless every part of it is on the allow list.

    ``platform_mount``: the index in ``mounts`` of the platform socket's bind
    mount, whose source this host set; ``netns``: the network namespace this
    host assigned to a container that joined its host's (``None``: none).
    """

    check_shape(spec)
    _known_keys(spec, TOP_KEYS, "")
    if spec.get("hooks"):
        raise _refuse("hooks", "OCI hooks are commands on the host")
    process = _mapping(spec.get("process"), "process")
    linux = _mapping(spec.get("linux"), "linux")
    _known_keys(process, PROCESS_KEYS, "process.")
    _known_keys(linux, LINUX_KEYS, "linux.")
    if process.get("terminal"):
        raise _refuse("process.terminal", "a container with a terminal cannot be migrated")
    own_netns = _namespaces(linux, netns)
    _mounts(spec, policy, platform_mount)
    _capabilities(process)
    _user(process)
    _rlimits(process, policy)
    _labels(process, linux, policy)
    _devices(linux)
    _masks(linux)
    _sysctls(linux, own_netns)
    _seccomp(linux)
    propagation = linux.get("rootfsPropagation")
    if propagation is not None and (
        not isinstance(propagation, str) or propagation.lstrip("r") not in ("", "private", "slave")
    ):
        raise _refuse("linux.rootfsPropagation", f"{propagation!r} shares mounts with the host")
    for key, value in _mapping(spec.get("annotations"), "annotations").items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise _refuse(f"annotations[{key!r}]", "annotations are strings")
        if key.startswith(REFUSED_ANNOTATIONS):
            raise _refuse(f"annotations[{key!r}]", "an engine turns it into a host setting")


def _masks(linux: Mapping[str, Any]) -> None:
    for key, required in (("maskedPaths", MASKED_PATHS), ("readonlyPaths", READONLY_PATHS)):
        have = _list(linux.get(key), f"linux.{key}")
        missing = [p for p in required if p not in have]
        if missing:
            raise _refuse(f"linux.{key}", f"leaves {missing[0]} open (a privileged container)")


def _namespaces(linux: Mapping[str, Any], netns: Path | None) -> bool:
    """Check the namespaces; whether the container has a network namespace of its own."""

    seen: set[str] = set()
    own_netns = False
    for i, ns in enumerate(_list(linux.get("namespaces"), "linux.namespaces")):
        where = f"linux.namespaces[{i}]"
        ns = _mapping(ns, where)
        _known_keys(ns, frozenset({"type", "path"}), f"{where}.")
        kind = ns.get("type")
        if kind not in NAMESPACE_TYPES:
            raise _refuse(f"{where}.type", f"unknown namespace {kind!r}")
        if kind in seen:
            raise _refuse(f"{where}.type", f"a second {kind} namespace")
        seen.add(kind)
        path = ns.get("path")
        if path:
            if kind != "network" or netns is None or str(path) != str(netns):
                raise _refuse(f"{where}.path", f"joins an existing {kind} namespace ({path})")
        elif kind == "network":
            own_netns = True
    missing = REQUIRED_NAMESPACES - seen
    if missing:
        raise _refuse("linux.namespaces", f"shares the host's {', '.join(sorted(missing))}")
    return own_netns


def _is_bind(mount: Mapping[str, Any], options: Sequence[Any]) -> bool:
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def _mounts(spec: Mapping[str, Any], policy: SpecPolicy, platform_mount: int | None) -> None:
    writable = [str(p) for p in policy.writable_bind_sources]
    roots = [str(p) for p in policy.bind_sources] + writable
    for i, mount in enumerate(_list(spec.get("mounts"), "mounts")):
        where = f"mounts[{i}]"
        mount = _mapping(mount, where)
        _known_keys(mount, MOUNT_KEYS, f"{where}.")
        options = _list(mount.get("options"), f"{where}.options")
        if not all(isinstance(o, str) for o in options):
            raise _refuse(f"{where}.options", "not a list of strings")
        shared = SHARED_PROPAGATION.intersection(options)
        if shared:
            raise _refuse(f"{where}.options", f"{sorted(shared)[0]} propagates to the host")
        dest = mount.get("destination")
        if not isinstance(dest, str) or not dest.startswith("/"):
            raise _refuse(f"{where}.destination", "not an absolute path")
        if i == platform_mount:
            continue  # its source is this host's platform socket, set by localize
        if not _is_bind(mount, options):
            if mount.get("type") not in ENGINE_FILESYSTEMS:
                raise _refuse(f"{where}.type", f"{mount.get('type')!r} is not a kind an engine "
                              "mounts itself")  # fmt: skip
            continue
        source = mount.get("source")
        if not isinstance(source, str) or not source.startswith("/") or "\0" in source:
            raise _refuse(f"{where}.source", "a bind mount's source must be an absolute path")
        real = policy.resolve(posixpath.normpath(source))
        if not any(_below(real, root) for root in roots):
            raise _refuse(
                f"{where}.source",
                f"bind mount of the host path {source} (this host allows "
                f"{', '.join(roots) or 'none'}: bind_sources in containers.toml)",
            )
        if "ro" not in options and not any(_below(real, root) for root in writable):
            raise _refuse(f"{where}.options", f'{source} is granted read-only here (no "ro")')


def _below(path: str, root: str) -> bool:
    root = posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _capabilities(process: Mapping[str, Any]) -> None:
    caps = _mapping(process.get("capabilities"), "process.capabilities")
    _known_keys(caps, frozenset(CAPABILITY_SETS), "process.capabilities.")
    for name in CAPABILITY_SETS:
        for cap in _list(caps.get(name), f"process.capabilities.{name}"):
            if cap not in DEFAULT_CAPABILITIES:
                raise _refuse(f"process.capabilities.{name}",
                              f"{cap} is beyond the default set")  # fmt: skip


def _user(process: Mapping[str, Any]) -> None:
    user = _mapping(process.get("user"), "process.user")
    _known_keys(user, frozenset({"uid", "gid", "umask", "additionalGids"}), "process.user.")
    ids = [(f"process.user.{k}", user[k]) for k in ("uid", "gid", "umask") if k in user]
    groups = _list(user.get("additionalGids"), "process.user.additionalGids")
    ids += [(f"process.user.additionalGids[{i}]", g) for i, g in enumerate(groups)]
    for where, value in ids:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32 - 1:
            raise _refuse(where, "not a user or group id")


def _rlimits(process: Mapping[str, Any], policy: SpecPolicy) -> None:
    caps = policy.rlimits()
    seen: set[str] = set()
    for i, item in enumerate(_list(process.get("rlimits"), "process.rlimits")):
        where = f"process.rlimits[{i}]"
        item = _mapping(item, where)
        kind, soft, hard = item.get("type"), item.get("soft"), item.get("hard")
        if kind not in RLIMITS or kind in seen:
            raise _refuse(f"{where}.type", f"unknown or repeated limit {kind!r}")
        seen.add(kind)
        for value, name in ((soft, "soft"), (hard, "hard")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _refuse(f"{where}.{name}", "not a non-negative integer")
        assert isinstance(soft, int) and isinstance(hard, int)
        if soft > hard:
            raise _refuse(f"{where}.soft", "above the hard limit")
        cap = caps.get(kind, -1)
        if cap >= 0 and hard > cap:
            raise _refuse(f"{where}.hard", f"{kind} {hard} is above this host's {cap}")


def _labels(process: Mapping[str, Any], linux: Mapping[str, Any], policy: SpecPolicy) -> None:
    profile = process.get("apparmorProfile")
    allowed = isinstance(profile, str) and (
        profile.startswith(ENGINE_APPARMOR) or profile in policy.security_labels
    )
    if profile and not allowed:
        raise _refuse("process.apparmorProfile", f"profile {profile!r} is not allowed here")
    for where, label in (
        ("process.selinuxLabel", process.get("selinuxLabel")),
        ("linux.mountLabel", linux.get("mountLabel")),
    ):
        if label and label not in policy.security_labels:
            raise _refuse(where, f"label {label!r} is not allowed here")


def _devices(linux: Mapping[str, Any]) -> None:
    for i, dev in enumerate(_list(linux.get("devices"), "linux.devices")):
        where = f"linux.devices[{i}]"
        dev = _mapping(dev, where)
        key = (dev.get("type"), dev.get("major"), dev.get("minor"))
        known = {k: v for k, v in DEFAULT_DEVICES.items() if k == key}
        if not known or next(iter(known.values())) != dev.get("path"):
            raise _refuse(where, f"device {dev.get('path')!r} {key} is not a default device")
    resources = _mapping(linux.get("resources"), "linux.resources")
    for i, rule in enumerate(_list(resources.get("devices"), "linux.resources.devices")):
        where = f"linux.resources.devices[{i}]"
        rule = _mapping(rule, where)
        if not rule.get("allow"):
            continue  # a deny rule only takes away
        access = rule.get("access", "rwm")
        if not isinstance(access, str) or not access or set(access) - set("rwm"):
            raise _refuse(f"{where}.access", f"bad access {access!r}")
        if access == "m" and rule.get("type") in ("c", "b"):
            continue  # mknod only (the engines' default): a node it cannot open
        major, minor = rule.get("major"), rule.get("minor")
        if rule.get("type") == "c" and major == PTS_MAJOR:
            continue
        if rule.get("type") != "c" or ("c", major, minor) not in DEFAULT_DEVICES:
            raise _refuse(where, f"allows device {rule.get('type')} {major}:{minor} "
                          "beyond the defaults")  # fmt: skip


def _sysctls(linux: Mapping[str, Any], own_netns: bool) -> None:
    for key in _mapping(linux.get("sysctl"), "linux.sysctl"):
        where = f"linux.sysctl[{key!r}]"
        if not isinstance(key, str):
            raise _refuse(where, "not a name")
        if key.startswith("net."):
            if not own_netns:
                raise _refuse(where, "changes a network namespace that is not the container's")
            continue
        if key == "kernel.sem" or key.startswith(("kernel.shm", "kernel.msg", "fs.mqueue.")):
            continue  # the container's own IPC namespace
        raise _refuse(where, "not a namespaced sysctl: it would change the host")


def _seccomp(linux: Mapping[str, Any]) -> None:
    seccomp = _mapping(linux.get("seccomp"), "linux.seccomp")
    for key in ("listenerPath", "listenerMetadata"):
        if seccomp.get(key):
            raise _refuse(f"linux.seccomp.{key}", "a seccomp listener is a socket on the host")
    for flag in _list(seccomp.get("flags"), "linux.seccomp.flags"):
        if flag not in SECCOMP_FLAGS:
            raise _refuse("linux.seccomp.flags", f"{flag!r} is not allowed")
