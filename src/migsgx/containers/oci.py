"""OCI runtime configurations as a destination host must adapt them, and safe tar files.

A container's configuration names things of the host it runs on: the
network namespace it joined, the cgroup it lives in, the host's platform
service socket bind-mounted into it (as the AESM socket and the SGX devices
are in real SGX containers).  Inside the container the socket's path is the
same on every host (``MIGSGX_PLATFORM_SOCKET`` in the container's environment
names it); its *source* is each host's own socket.  :func:`localize` rewrites
exactly those parts for the destination, then checks the result against this
host's allow list (:func:`~.admission.admit`): a peer gets no host path, no
capability, namespace, device or sysctl that this host did not grant.

The tar helpers move a container's root file system without following links
out of it or creating anything but directories, regular files and symlinks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import ProtocolError
from .admission import SpecPolicy, admit, check_shape
from .base import ContainerError

__all__ = [
    "CRIU_CONFIG_ANNOTATION",
    "PLATFORM_ENV",
    "Localization",
    "extract_tree",
    "load_json",
    "localize",
    "platform_mount",
    "tar_tree",
]

#: runc reads CRIU's configuration file (options over the RPC's) from this annotation.
CRIU_CONFIG_ANNOTATION: Final = "org.criu.config"
PLATFORM_ENV: Final = "MIGSGX_PLATFORM_SOCKET"
MAX_CONFIG_BYTES: Final = 4 << 20
MAX_TREE_BYTES: Final = 256 << 20
MAX_TREE_MEMBERS: Final = 100_000


def load_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file of bounded size (received from a peer)."""

    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ProtocolError(f"the source sent no {what}: {exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ProtocolError(f"the {what} exceeds {MAX_CONFIG_BYTES} bytes")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # (a peer may nest it too deep)
        raise ProtocolError(f"the {what} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"the {what} is not a JSON object")
    return value


@dataclass(frozen=True)
class Localization:
    """What a destination host puts into a container's configuration."""

    platform_socket: Path | None  # this host's platform service
    netns: Path | None  # for containers that joined their host's network namespace
    cgroups_path: str | None  # the container's cgroup here (None: keep)
    criu_config: Path | None  # CRIU's configuration file for the restore
    #: The engine runs in ``netns`` itself (runc and podman are run there).
    engine_in_netns: bool = False
    #: What this host grants a peer's configuration (its ``containers.toml``).
    policy: SpecPolicy = field(default_factory=SpecPolicy)
    #: Destinations of bind mounts the engine makes itself at the restore (podman's
    #: ``/etc/hosts`` ...): the peer's are dropped, with their source-host paths.
    engine_mounts: frozenset[str] = frozenset()
    #: The root file system's path in the bundle the engine makes (``rootfs``); ``None``:
    #: the engine sets its own (podman).  A peer's path (``/``: the host's) never stays.
    root_path: str | None = None


def _env(spec: Mapping[str, Any]) -> dict[str, str]:
    process = spec.get("process")
    env = process.get("env") if isinstance(process, Mapping) else None
    out: dict[str, str] = {}
    for item in env if isinstance(env, list) else []:
        if isinstance(item, str) and "=" in item:
            key, _, value = item.partition("=")
            out[key] = value
    return out


def platform_mount(spec: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The bind mount that brings the platform socket in, and the socket's name in it.

    ``None`` when the container names no platform socket (it holds no enclaves).
    ``spec`` has the shape :func:`~.admission.check_shape` checks.
    """

    inside = _env(spec).get(PLATFORM_ENV)
    if not inside:
        return None
    inside = posixpath.normpath(inside)
    best: tuple[dict[str, Any], str] | None = None
    for mount in spec.get("mounts") or []:
        dest = posixpath.normpath(str(mount.get("destination", "")))
        options = mount.get("options") or []
        if mount.get("type") != "bind" and "bind" not in options and "rbind" not in options:
            continue
        if dest == inside:
            return mount, ""
        if inside.startswith(dest.rstrip("/") + "/"):
            rest = inside[len(dest.rstrip("/")) + 1 :]
            if best is None or len(rest) < len(best[1]):
                best = (mount, rest)
    if best is None:
        raise ContainerError(
            f"the container's platform socket {inside} is not on a bind mount: "
            "it cannot be pointed at this host's platform service"
        )
    return best


def localize(spec: Mapping[str, Any], here: Localization) -> dict[str, Any]:
    """A copy of the OCI runtime ``spec`` fit to run on this host (see the module doc).

    A :class:`~.admission.SpecRefused` when the peer's configuration asks for
    more than this host grants, or is not of the shape a configuration has (a
    list where an object belongs ...: checked before anything here reads it);
    the input is never changed.
    """

    out = copy.deepcopy(dict(check_shape(spec)))
    process = out.get("process") or {}
    if isinstance(process, dict) and process.get("terminal"):
        raise ContainerError("a container with a terminal cannot be migrated")
    if here.engine_mounts and isinstance(out.get("mounts"), list):
        out["mounts"] = [m for m in out["mounts"] if not _engine_mount(m, here.engine_mounts)]
    found = platform_mount(out)
    platform_index: int | None = None
    if found is not None:
        mount, rest = found
        platform_index = next(i for i, m in enumerate(out["mounts"]) if m is mount)
        if here.platform_socket is None:
            raise ContainerError("this host has no platform service for the container's enclaves")
        if rest:
            if Path(rest).name != here.platform_socket.name or "/" in rest:
                raise ContainerError(
                    f"the container expects the platform socket as {rest!r} in a bind-mounted "
                    f"directory; this host's is {here.platform_socket.name!r}"
                )
            mount["source"] = str(here.platform_socket.parent)
        else:
            mount["source"] = str(here.platform_socket)
    if out.get("linux") is None:
        out["linux"] = {}
    linux = out["linux"]
    if not isinstance(linux, dict):
        raise ContainerError("the container's configuration has no linux section")
    joined = False
    for ns in linux.get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
            if here.netns is None:
                raise ContainerError("the container joined its host's network namespace; no netns")
            ns["path"] = str(here.netns)
            joined = True
    if (joined or joined_host_netns(out)) and isinstance(linux.get("sysctl"), dict):
        # The namespace is this host's, set up by its operator; the source set the
        # container's net.* sysctls on its own (and runc refuses them for a
        # namespace it runs in itself).
        sysctl = linux["sysctl"]
        linux["sysctl"] = {k: v for k, v in sysctl.items() if not str(k).startswith("net.")}
    if here.cgroups_path is not None:
        linux["cgroupsPath"] = here.cgroups_path
    if here.root_path is not None:
        root = out.get("root")
        readonly = bool(root.get("readonly", False)) if isinstance(root, dict) else False
        out["root"] = {"path": here.root_path, "readonly": readonly}
    if out.get("annotations") is None:
        out["annotations"] = {}
    annotations = out["annotations"]
    if here.criu_config is not None:
        annotations[CRIU_CONFIG_ANNOTATION] = str(here.criu_config)
    else:
        annotations.pop(CRIU_CONFIG_ANNOTATION, None)
    admit(out, here.policy, platform_mount=platform_index, netns=here.netns if joined else None)
    return out


def _engine_mount(mount: Any, destinations: frozenset[str]) -> bool:
    if not isinstance(mount, dict) or mount.get("type") != "bind":
        return False
    return posixpath.normpath(str(mount.get("destination", ""))) in destinations


def same_netns(path: Path) -> bool:
    """Whether ``path`` names the network namespace this process is in."""

    try:
        a, b = os.stat(path), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def joined_host_netns(spec: Mapping[str, Any]) -> bool:
    """Whether the container runs in a network namespace named by path (its host's).

    Any JSON is read without an exception (a driver asks before :func:`localize`
    checked the configuration's shape, which refuses what is misshapen).
    """

    linux = spec.get("linux") if isinstance(spec, Mapping) else None
    namespaces = linux.get("namespaces") if isinstance(linux, Mapping) else None
    for ns in namespaces if isinstance(namespaces, list) else []:
        if isinstance(ns, Mapping) and ns.get("type") == "network":
            return bool(ns.get("path"))
    return True  # no network namespace of its own: the host's


# --- root file systems ---------------------------------------------------------------------
def tar_tree(
    root: Path,
    out: Path,
    *,
    limit: int = MAX_TREE_BYTES,
    stop: Callable[[], None] | None = None,
) -> int:
    """Write the tree under ``root`` (not following links, one file system) as a tar.

    ``stop`` is called before each file and may raise to end the archive early
    (a migration that failed meanwhile: its source must run again).
    """

    root_dev = root.stat().st_dev
    total = 0
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk(root, root_dev):
            if stop is not None:
                stop()
            rel = path.relative_to(root).as_posix()
            info = tar.gettarinfo(str(path), arcname=rel)
            if info.isfile():
                total += info.size
                if total > limit:
                    raise ContainerError(f"the root file system exceeds {limit} bytes")
                with path.open("rb") as f:
                    tar.addfile(info, f)
            elif info.isdir() or info.issym():
                tar.addfile(info)
    return total


def _walk(root: Path, dev: int) -> Iterator[Path]:
    for dirpath, dirs, files in os.walk(root):
        base = Path(dirpath)
        keep = []
        for name in sorted(dirs):
            path = base / name
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                keep.append(name)
                yield path
            elif stat.S_ISLNK(st.st_mode):
                yield path
        dirs[:] = keep
        for name in sorted(files):
            yield base / name


def extract_tree(archive: Path, root: Path, *, limit: int = MAX_TREE_BYTES) -> None:
    """Unpack a tree made by :func:`tar_tree` from a peer into the empty directory ``root``.

    Plain relative names only; directories, regular files and symlinks only; no
    member is written through a symlink (so none lands outside ``root``).
    """

    try:
        with tarfile.open(archive, "r:") as tar:
            _extract(tar, root, limit)
    except (OSError, tarfile.TarError) as exc:
        raise ProtocolError(f"the archive {archive.name} is unreadable: {exc}") from exc


def _extract(tar: tarfile.TarFile, root: Path, limit: int) -> None:
    total = 0
    real_root = root.resolve()
    for count, member in enumerate(tar):
        if count >= MAX_TREE_MEMBERS:
            raise ProtocolError("the root file system archive has too many members")
        name = posixpath.normpath(member.name)
        if name.startswith(("/", "../")) or name in ("..", ".") or "\0" in name:
            raise ProtocolError(f"bad name in the root file system archive: {member.name!r}")
        dest = root / name
        parent = dest.parent.resolve()
        if not parent.is_relative_to(real_root):
            raise ProtocolError(f"{member.name!r} would leave the root file system")
        mode = member.mode & 0o7777 & ~0o6000  # no set-id bits from a peer
        if member.isfile():
            total += member.size
            if total > limit:
                raise ProtocolError(f"the root file system exceeds {limit} bytes")
        elif not (member.isdir() or member.issym()):
            raise ProtocolError(f"{member.name!r}: only directories, files and symlinks")
        try:
            _place(tar, member, dest, mode)
        except OSError as exc:
            raise ProtocolError(f"cannot unpack {member.name!r}: {exc}") from exc


def _place(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, mode: int) -> None:
    if dest.is_symlink():
        raise ProtocolError(f"{member.name!r} is already a symlink")
    if member.isdir():
        if not dest.is_dir():
            dest.mkdir(mode=0o700)
        os.chmod(dest, mode)
    elif member.issym():
        os.symlink(member.linkname, dest)
    else:
        src = tar.extractfile(member)
        assert src is not None
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with src, os.fdopen(fd, "wb") as f:
            _copy(src, f)


def _copy(src: io.BufferedReader | Any, dst: io.BufferedWriter | Any) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
