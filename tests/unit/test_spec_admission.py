"""The destination's allow list for a peer's OCI configuration (``containers/admission.py``).

Real specifications as runc (the lab's), podman (``config.dump`` and
``spec.dump`` of an export) and containerd (``ctr run``) made them are
admitted; any one thing beyond the list, planted anywhere hypothesis likes,
is a typed refusal naming the field.
"""

from __future__ import annotations

import copy
import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migsgx.containers import ContainerSettings
from migsgx.containers.admission import (
    DEFAULT_CAPABILITIES,
    REQUIRED_NAMESPACES,
    SpecPolicy,
    SpecRefused,
)
from migsgx.containers.image_admission import CAPABILITY_NUMBERS, admit_images, localize_images
from migsgx.containers.oci import Localization, localize
from migsgx.containers.podman import PODMAN_MOUNTS
from migsgx.errors import error_from_wire
from migsgx.lab.container_spec import runtime_spec

SPECS = Path(__file__).parent / "specs"
POLICY = SpecPolicy(
    bind_sources=tuple(
        Path(p) for p in ("/usr", "/etc", "/opt/python", "/opt/migsgx", "/srv/deployment/images")
    ),
    rlimits=lambda: {"RLIMIT_NOFILE": 1 << 20, "RLIMIT_NPROC": -1},
    resolve=lambda p: p,
)
HERE = Localization(
    platform_socket=Path("/srv/deployment/host-dst/enclave.sock"),
    netns=Path("/run/netns/dst"),
    cgroups_path="/migsgx-dst/kv1",
    criu_config=Path("/var/lib/dst/criu.conf"),
    policy=POLICY,
    engine_mounts=PODMAN_MOUNTS,
)


def lab_runc() -> dict[str, Any]:
    binds = [
        ("/usr", "/usr", True),
        ("/etc", "/etc", True),
        ("/opt/migsgx/src", "/opt/migsgx/src", True),
        ("/srv/deployment/images/kvstore", "/opt/enclave", True),
        ("/srv/deployment/host-src/enclave.sock", "/run/migsgx/enclave.sock", False),
    ]
    return runtime_spec(
        ["python3", "app.py"],
        ["PATH=/usr/bin", "MIGSGX_PLATFORM_SOCKET=/run/migsgx/enclave.sock"],
        binds,
        netns=Path("/run/netns/src"),
        cgroups_path="/lab-src/kv1",
        hostname="kv1",
    )


def engine_specs() -> dict[str, dict[str, Any]]:
    out = {"runc": lab_runc()}
    for name in ("podman-config-spec", "podman-spec-dump", "containerd-spec"):
        out[name] = json.loads((SPECS / f"{name}.json").read_text())
    return out


ENGINE_SPECS = engine_specs()


@pytest.mark.parametrize("engine", sorted(ENGINE_SPECS))
def test_what_the_engines_make_is_admitted(engine: str) -> None:
    original = ENGINE_SPECS[engine]
    out = localize(original, HERE)
    sources = {m["destination"]: m.get("source") for m in out["mounts"]}
    assert sources["/run/migsgx/enclave.sock"] == str(HERE.platform_socket)
    assert not PODMAN_MOUNTS & {d for d, s in sources.items() if str(s).startswith("/run/lab")}
    assert original == ENGINE_SPECS[engine]  # the input is not changed


# --- one thing too many, anywhere -------------------------------------------------------------
def mounts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec["mounts"]  # type: ignore[no-any-return]


def linux(spec: dict[str, Any]) -> dict[str, Any]:
    return spec.setdefault("linux", {})  # type: ignore[no-any-return]


def process(spec: dict[str, Any]) -> dict[str, Any]:
    return spec.setdefault("process", {})  # type: ignore[no-any-return]


HOST_PATHS = st.sampled_from(
    [
        "/",
        "/root",
        "/var/lib/migsgx",
        "/etc/../var",
        "/usr2",
        "/proc/1",
        "/run/containerd/containerd.sock",
        "/dev/sda",
        "/srv/deployment",
    ]
)
EXTRA_CAPS = st.sampled_from(
    [
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_SYS_MODULE",
        "CAP_NET_ADMIN",
        "CAP_DAC_READ_SEARCH",
        "CAP_SYS_RAWIO",
        "CAP_BPF",
        "CAP_SYSLOG",
    ]
)
CAP_SETS = st.sampled_from(["bounding", "effective", "inheritable", "permitted", "ambient"])
NS_KINDS = st.sampled_from(sorted(REQUIRED_NAMESPACES | {"cgroup", "user"}))


def host_bind(path: str, dest: str) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        mounts(spec).append(
            {"destination": dest, "type": "bind", "source": path, "options": ["rbind", "rw"]}
        )
        return f"mounts[{len(mounts(spec)) - 1}].source"

    return plant


def bind_by_option(path: str) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:  # "type": "none" with a bind option is a bind too
        mounts(spec).append(
            {"destination": "/x", "type": "none", "source": path, "options": ["bind"]}
        )
        return f"mounts[{len(mounts(spec)) - 1}].source"

    return plant


def odd_filesystem(kind: str) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        mounts(spec).append({"destination": "/mnt", "type": kind, "source": "/dev/sda1"})
        return f"mounts[{len(mounts(spec)) - 1}].type"

    return plant


def shared_mount(spec: dict[str, Any]) -> str:
    mounts(spec)[0].setdefault("options", []).append("rshared")
    return "mounts[0].options"


def extra_cap(cap: str, which: str) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        caps = process(spec).setdefault("capabilities", {})
        caps[which] = [*caps.get(which, []), cap]
        return f"process.capabilities.{which}"

    return plant


def joined_namespace(kind: str, path: str) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        nss = linux(spec)["namespaces"]
        i = next((i for i, ns in enumerate(nss) if ns["type"] == kind), len(nss))
        nss[i : i + 1] = [{"type": kind, "path": path}]
        return f"linux.namespaces[{i}].path"

    return plant


def missing_namespace(kind: str) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        linux(spec)["namespaces"] = [ns for ns in linux(spec)["namespaces"] if ns["type"] != kind]
        return "linux.namespaces"

    return plant


def device(path: str, major: int, minor: int) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        devs = linux(spec).setdefault("devices", [])
        devs.append({"path": path, "type": "c", "major": major, "minor": minor})
        return f"linux.devices[{len(devs) - 1}]"

    return plant


def device_rule(rule: dict[str, Any]) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        rules = linux(spec).setdefault("resources", {}).setdefault("devices", [])
        rules.append(rule)
        return f"linux.resources.devices[{len(rules) - 1}]"

    return plant


def sysctl(key: str) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        linux(spec).setdefault("sysctl", {})[key] = "1"
        return f"linux.sysctl[{key!r}]"

    return plant


def setting(where: str, value: Any) -> Callable[[dict[str, Any]], str]:
    """Set a dotted path (``process.apparmorProfile``) to ``value``."""

    def plant(spec: dict[str, Any]) -> str:
        *parents, last = where.split(".")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        return where

    return plant


def annotation(key: str) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        spec.setdefault("annotations", {})[key] = "x"
        return f"annotations[{key!r}]"

    return plant


def rlimit(kind: str, hard: int) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        limits = [r for r in process(spec).get("rlimits", []) if r["type"] != kind]
        limits.append({"type": kind, "soft": 0, "hard": hard})
        process(spec)["rlimits"] = limits
        return f"process.rlimits[{len(limits) - 1}].hard"

    return plant


def unmasked(key: str, path: str) -> Callable[[dict[str, Any]], str]:
    def plant(spec: dict[str, Any]) -> str:
        linux(spec)[key] = [p for p in linux(spec).get(key, []) if p != path]
        return f"linux.{key}"

    return plant


BAD = st.one_of(
    st.builds(host_bind, HOST_PATHS, st.sampled_from(["/host", "/usr/local", "/etc/passwd"])),
    st.builds(bind_by_option, HOST_PATHS),
    st.builds(odd_filesystem, st.sampled_from(["ext4", "xfs", "overlay", "nfs", "fuse", "9p"])),
    st.just(shared_mount),
    st.builds(extra_cap, EXTRA_CAPS, CAP_SETS),
    st.builds(joined_namespace, NS_KINDS, st.sampled_from(["/proc/1/ns/x", "/run/netns/dst"])),
    st.builds(missing_namespace, st.sampled_from(sorted(REQUIRED_NAMESPACES))),
    st.builds(
        device,
        st.sampled_from(["/dev/sda", "/dev/kmsg", "/dev/mem", "/dev/null"]),
        st.sampled_from([8, 1, 10]),
        st.sampled_from([0, 1, 11, 4]),
    ),
    st.builds(
        device_rule,
        st.sampled_from(
            [
                {"allow": True, "access": "rwm"},
                {"allow": True, "type": "a", "access": "rwm"},
                {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "rw"},
                {"allow": True, "type": "c", "major": 1, "minor": 1, "access": "r"},  # /dev/mem
                {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"},
            ]
        ),
    ),
    st.builds(
        sysctl,
        st.sampled_from(
            [
                "kernel.core_pattern",
                "vm.overcommit_memory",
                "kernel.modprobe",
                "fs.file-max",
                "user.max_user_namespaces",
            ]
        ),
    ),
    st.builds(
        setting,
        st.sampled_from(["process.apparmorProfile", "process.selinuxLabel", "linux.mountLabel"]),
        st.sampled_from(["unconfined", "spc_t", "system_u:system_r:unconfined_t:s0"]),
    ),
    st.builds(setting, st.just("linux.seccomp.listenerPath"), st.just("/run/agent.sock")),
    st.builds(setting, st.just("linux.seccomp.flags"), st.just(["SECCOMP_FILTER_FLAG_SPEC_ALLOW"])),
    st.builds(setting, st.just("linux.rootfsPropagation"), st.sampled_from(["shared", "rshared"])),
    st.builds(setting, st.just("linux.intelRdt"), st.just({"closID": "x"})),
    st.builds(setting, st.just("linux.personality"), st.just({"domain": "LINUX32"})),
    st.builds(setting, st.just("process.user.uid"), st.sampled_from([-1, 2**32, "0", True])),
    st.builds(setting, st.just("hooks"), st.just({"prestart": [{"path": "/bin/sh"}]})),
    st.builds(annotation, st.sampled_from(["org.systemd.property.DeviceAllow", "run.oci.hooks"])),
    st.builds(rlimit, st.sampled_from(["RLIMIT_NOFILE"]), st.just((1 << 20) + 1)),
    st.builds(rlimit, st.just("RLIMIT_BOGUS"), st.just(1)),
    st.builds(unmasked, st.just("maskedPaths"), st.sampled_from(["/proc/kcore", "/sys/firmware"])),
    st.builds(unmasked, st.just("readonlyPaths"), st.sampled_from(["/proc/sys"])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(engine=st.sampled_from(sorted(ENGINE_SPECS)), plant=BAD)
def test_anything_beyond_the_list_is_refused_naming_the_field(
    engine: str, plant: Callable[[dict[str, Any]], str]
) -> None:
    spec = copy.deepcopy(ENGINE_SPECS[engine])
    where = plant(spec)
    with pytest.raises(SpecRefused) as caught:
        localize(spec, HERE)
    err = caught.value
    assert err.code == "container-spec"
    if where.startswith("linux.namespaces[") and where.endswith(".path"):
        assert err.field.startswith("linux.namespaces[")
    else:
        assert err.field.split("[")[0] == where.split("[")[0] or err.field == where, err
    assert err.field in str(err)


@settings(max_examples=100, deadline=None)
@given(
    engine=st.sampled_from(sorted(ENGINE_SPECS)),
    caps=st.lists(st.sampled_from(sorted(DEFAULT_CAPABILITIES)), unique=True),
    extra=st.sets(st.sampled_from(["cgroup", "user", "time"])),
    sysctls=st.dictionaries(
        st.sampled_from(
            [
                "kernel.shmmax",
                "kernel.msgmax",
                "kernel.sem",
                "fs.mqueue.msg_max",
                "net.ipv4.ping_group_range",
            ]
        ),
        st.just("1"),
        max_size=3,
    ),
)
def test_less_than_the_list_is_admitted(
    engine: str, caps: list[str], extra: set[str], sysctls: dict[str, str]
) -> None:
    """Fewer capabilities, more new namespaces, namespaced sysctls: all fine."""

    spec = copy.deepcopy(ENGINE_SPECS[engine])
    process(spec)["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps}
    linux(spec)["namespaces"] += [{"type": kind} for kind in sorted(extra)]
    linux(spec)["sysctl"] = sysctls
    out = localize(spec, HERE)
    # The container joined this host's namespace: the source's net.* sysctls stay behind.
    assert not [k for k in out["linux"].get("sysctl", {}) if k.startswith("net.")]


def test_a_peers_root_path_never_stays() -> None:
    """runc and containerd run the bundle's ``rootfs``; a peer's ``/`` would be the host's."""

    spec = copy.deepcopy(ENGINE_SPECS["containerd-spec"])
    spec["root"] = {"path": "/", "readonly": True}
    here = Localization(**{**HERE.__dict__, "root_path": "rootfs"})
    assert localize(spec, here)["root"] == {"path": "rootfs", "readonly": True}


def test_a_network_namespace_path_becomes_the_one_this_host_assigns() -> None:
    """Any path the peer names (its host's, or this host's own) is replaced, never joined."""

    for engine in ENGINE_SPECS:
        spec = copy.deepcopy(ENGINE_SPECS[engine])
        joined_namespace("network", "/proc/1/ns/net")(spec)
        nss = localize(spec, HERE)["linux"]["namespaces"]
        assert [ns.get("path") for ns in nss if ns["type"] == "network"] == [str(HERE.netns)]


def test_net_sysctls_in_a_namespace_of_its_own_are_admitted() -> None:
    spec = copy.deepcopy(ENGINE_SPECS["runc"])
    nss = linux(spec)["namespaces"]
    nss[:] = [ns for ns in nss if ns["type"] != "network"] + [{"type": "network"}]
    linux(spec)["sysctl"] = {"net.ipv4.ip_forward": "1"}
    assert localize(spec, HERE)["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}


def test_a_symlink_out_of_an_allowed_source_is_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    (allowed / "escape").symlink_to("/etc")
    policy = SpecPolicy(bind_sources=(allowed,))
    here = Localization(None, None, None, None, policy=policy)
    spec = copy.deepcopy(ENGINE_SPECS["runc"])
    spec["mounts"] = [m for m in mounts(spec) if m.get("type") != "bind"]
    process(spec)["env"] = ["PATH=/usr/bin"]
    linux(spec)["namespaces"] = [{"type": t} for t in (*sorted(REQUIRED_NAMESPACES), "network")]
    ok = {
        "destination": "/data",
        "type": "bind",
        "source": str(allowed / "data"),
        "options": ["rbind", "ro"],
    }
    localize({**spec, "mounts": [*spec["mounts"], ok]}, here)
    for source in (allowed / "escape", allowed / "data" / ".." / ".." / "other"):
        bad = {**ok, "source": str(source)}
        with pytest.raises(SpecRefused, match=r"mounts\[\d+\]\.source"):
            localize({**spec, "mounts": [*spec["mounts"], bad]}, here)


def test_a_host_without_grants_admits_no_bind_mount() -> None:
    here = Localization(HERE.platform_socket, HERE.netns, None, None)  # default policy
    with pytest.raises(SpecRefused, match="this host allows none"):
        localize(ENGINE_SPECS["runc"], here)


def test_podman_mounts_from_the_source_host_are_dropped() -> None:
    """podman makes /etc/hosts & co. anew; the peer's sources (any path) never reach it."""

    spec = copy.deepcopy(ENGINE_SPECS["podman-spec-dump"])
    for m in mounts(spec):
        if m["destination"] == "/etc/hosts":
            m["source"] = "/etc/shadow"
    out = localize(spec, HERE)
    assert not {m["destination"] for m in out["mounts"]} & PODMAN_MOUNTS
    without = Localization(**{**HERE.__dict__, "engine_mounts": frozenset()})
    with pytest.raises(SpecRefused, match="userdata"):
        localize(spec, without)


def test_an_allowed_source_is_read_only_unless_granted_writable() -> None:
    spec = copy.deepcopy(ENGINE_SPECS["runc"])
    etc = next(m for m in mounts(spec) if m["destination"] == "/etc")
    etc["options"] = ["rbind", "rw"]
    with pytest.raises(SpecRefused, match=r"mounts\[\d+\]\.options.*read-only"):
        localize(spec, HERE)
    del etc["options"]  # no "ro": writable
    with pytest.raises(SpecRefused, match="read-only"):
        localize(spec, HERE)
    writable = SpecPolicy(
        bind_sources=POLICY.bind_sources,
        writable_bind_sources=(Path("/etc"),),
        rlimits=POLICY.rlimits,
        resolve=POLICY.resolve,
    )
    localize(spec, Localization(**{**HERE.__dict__, "policy": writable}))


def test_the_refusal_is_one_typed_error_that_travels() -> None:
    spec = copy.deepcopy(ENGINE_SPECS["runc"])
    extra_cap("CAP_SYS_ADMIN", "bounding")(spec)
    with pytest.raises(SpecRefused) as caught:
        localize(spec, HERE)
    err = caught.value
    assert err.field == "process.capabilities.bounding"
    assert "CAP_SYS_ADMIN" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, SpecRefused) and again.field == err.field
    wired = error_from_wire(**err.to_wire())  # as the source's tool gets it
    assert isinstance(wired, SpecRefused) and "process.capabilities.bounding" in str(wired)


def test_settings_carry_the_grants(tmp_path: Path) -> None:
    (tmp_path / "containers.toml").write_text(
        'bind_sources = ["/srv/data", "/usr"]\nsecurity_labels = ["my-profile"]\n'
        'writable_bind_sources = ["/srv/data/out"]\n'
    )
    loaded = ContainerSettings.load(tmp_path)
    assert loaded.bind_sources == (Path("/srv/data"), Path("/usr"))
    assert loaded.writable_bind_sources == (Path("/srv/data/out"),)
    policy = SpecPolicy.from_settings(loaded)
    assert policy.security_labels == frozenset({"my-profile"})
    loaded.save(tmp_path)
    assert ContainerSettings.load(tmp_path) == loaded


@pytest.mark.parametrize(
    "text",
    [
        'bind_sources = "/usr"\n',
        'bind_sources = ["usr"]\n',
        'bind_sources = ["/"]\n',
        'bind_sources = ["/srv/../etc"]\n',
        "security_labels = [1]\n",
    ],
)
def test_bad_grants_are_refused(tmp_path: Path, text: str) -> None:
    from migsgx.errors import ConfigError

    (tmp_path / "containers.toml").write_text(text)
    with pytest.raises(ConfigError):
        ContainerSettings.load(tmp_path)


# --- CRIU's images: the credentials CRIU gives the restored threads ----------------------------
def core_image(caps: set[int] | None, *, apparmor: bytes = b"") -> bytes:
    """A ``core-TID.img`` as CRIU writes it (magics, one length-prefixed core entry)."""

    from migsgx.criu.images import CORE_MAGIC, IMG_COMMON_MAGIC, _cls

    core = _cls("core_entry")()
    core.tc.comm = "python3"
    if caps is not None:
        creds = core.thread_core.creds
        words = [sum(1 << (c - 32 * w) for c in caps if c // 32 == w) for w in (0, 1)]
        for field in ("cap_inh", "cap_prm", "cap_eff", "cap_bnd"):
            getattr(creds, field).extend(words if field != "cap_inh" else [0, 0])
        creds.apparmor_data = apparmor
    raw = core.SerializeToString()
    return struct.pack("<III", IMG_COMMON_MAGIC, CORE_MAGIC, len(raw)) + raw


def test_images_within_the_bounding_set_are_admitted(tmp_path: Path) -> None:
    spec = localize(ENGINE_SPECS["runc"], HERE)  # AUDIT_WRITE, KILL, NET_BIND_SERVICE
    granted = {CAPABILITY_NUMBERS[c] for c in spec["process"]["capabilities"]["bounding"]}
    (tmp_path / "core-1.img").write_bytes(core_image(granted))
    (tmp_path / "core-2.img").write_bytes(core_image(set()))  # a thread that dropped all
    (tmp_path / "pages-1.img").write_bytes(b"\0" * 16)
    admit_images(tmp_path, spec)


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"core-7.img": core_image({CAPABILITY_NUMBERS["CAP_SYS_ADMIN"]})}, "CAP_SYS_ADMIN"),
        ({"core-7.img": core_image({40})}, "CAP_CHECKPOINT_RESTORE"),
        ({"core-7.img": core_image({63})}, "capability 63"),
        ({"core-7.img": core_image(None)}, "carries no credentials"),
        ({"core-7.img": core_image(set()), "creds-7.img": b""}, "an old format"),
        ({"core-7.img": core_image(set(), apparmor=b"profile")}, "AppArmor policy"),
        ({"core-7.img": b"\x19\x43\x56\x54"}, "unreadable"),
    ],
)
def test_images_beyond_the_configuration_are_refused(
    tmp_path: Path, files: dict[str, bytes], match: str
) -> None:
    spec = localize(ENGINE_SPECS["runc"], HERE)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(SpecRefused, match=match) as caught:
        admit_images(tmp_path, spec)
    assert caught.value.field.startswith("images/")


FS = {"unsupported": 0, "proc": 1, "sysfs": 2, "devtmpfs": 3, "tmpfs": 5, "devpts": 6,
      "debugfs": 11, "cgroup": 12, "mqueue": 14, "auto": 16, "overlay": 17}  # fmt: skip


def mount_image(rows: list[tuple[int, int, str, str, str, bool]]) -> bytes:
    """``mountpoints-ID.img``: (id, parent, fstype, mountpoint, source, external) per mount."""

    from migsgx.criu.images import IMG_COMMON_MAGIC, MNTS_MAGIC, _cls

    out = struct.pack("<II", IMG_COMMON_MAGIC, MNTS_MAGIC)
    for mnt_id, parent, fstype, mountpoint, source, external in rows:
        m = _cls("mnt_entry")()
        m.mnt_id, m.parent_mnt_id, m.fstype = mnt_id, parent, FS[fstype]
        m.mountpoint, m.source, m.root = mountpoint, source, "/"
        if fstype == "auto":
            m.fsname = "ext4"
        if external:
            m.ext_key = mountpoint
        raw = m.SerializeToString()
        out += struct.pack("<I", len(raw)) + raw
    return out


#: As runc's dump of the lab's container lists them (ids and parents as CRIU wrote them).
RUNC_MOUNTS = [
    (110, 58, "unsupported", "/", "/dev/vda", False),
    (111, 110, "proc", "/proc", "proc", False),
    (112, 110, "tmpfs", "/dev", "tmpfs", False),
    (113, 112, "devpts", "/dev/pts", "devpts", False),
    (115, 112, "mqueue", "/dev/mqueue", "mqueue", False),
    (116, 110, "sysfs", "/sys", "sysfs", False),
    (118, 110, "unsupported", "/usr", "/dev/vda", True),
    (64, 111, "tmpfs", "/proc/keys", "tmpfs", True),
    (62, 111, "proc", "/proc/sys", "proc", False),
]


def test_the_engines_mounts_in_images_are_admitted(tmp_path: Path) -> None:
    (tmp_path / "mountpoints-13.img").write_bytes(mount_image(RUNC_MOUNTS))
    admit_images(tmp_path, localize(ENGINE_SPECS["runc"], HERE))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ((130, 110, "auto", "/mnt", "/dev/vda", False), r"/mnt.*auto \(ext4\) mount of '/dev/vda'"),
        ((130, 110, "overlay", "/mnt", "overlay", False), "overlay mount"),
        ((130, 110, "debugfs", "/sys/kernel/debug", "debugfs", False), "debugfs mount"),
        ((130, 110, "devtmpfs", "/dev/host", "devtmpfs", False), "devtmpfs mount"),
        ((130, 110, "unsupported", "/host", "/dev/vda", False), "unsupported mount"),
        ((130, 999, "tmpfs", "/", "tmpfs", False), "2 root mounts"),
    ],
)
def test_other_mounts_in_images_are_refused(
    tmp_path: Path, extra: tuple[int, int, str, str, str, bool], match: str
) -> None:
    (tmp_path / "mountpoints-13.img").write_bytes(mount_image([*RUNC_MOUNTS, extra]))
    with pytest.raises(SpecRefused, match=match) as caught:
        admit_images(tmp_path, localize(ENGINE_SPECS["runc"], HERE))
    assert caught.value.field.startswith("images/mountpoints-13.img")


#: ``deleted = true`` (field 16, a varint: its tag takes two bytes).
DELETED = bytes([0x80, 0x01, 1])


def deleted_mount_image(deleted: dict[str, bool]) -> bytes:
    """RUNC_MOUNTS plus the platform socket's bind and one more host file's, each
    external and marked deleted as ``deleted`` says, with fields CRIU writes that
    the reader does not declare (``root_dev`` 3, ``flags`` 5, ``options`` 9)."""

    from migsgx.criu.images import IMG_COMMON_MAGIC, MNTS_MAGIC, entries

    rows = [*RUNC_MOUNTS, (120, 110, "unsupported", "/run/migsgx/enclave.sock", "/dev/vda", True),
            (121, 110, "unsupported", "/etc/hostname", "/dev/vda", True)]  # fmt: skip
    undeclared = bytes([3 << 3, 0x2A, 5 << 3, 0x81, 0x20, 9 << 3 | 2, 2]) + b"rw"
    out = struct.pack("<II", IMG_COMMON_MAGIC, MNTS_MAGIC)
    for raw, row in zip(entries(mount_image(rows), MNTS_MAGIC, "test"), rows, strict=True):
        raw += undeclared
        if deleted.get(row[3]):
            raw += DELETED  # deleted = true
        out += struct.pack("<I", len(raw)) + raw
    return out


def test_a_deleted_platform_socket_mount_is_unmarked_and_nothing_else(tmp_path: Path) -> None:
    """The source's platform service restarted: CRIU saw the socket's bind deleted, and
    would make a file where this host's socket is; only that mark goes."""

    from migsgx.criu.images import MNTS_MAGIC, entries, mounts_of

    image = tmp_path / "mountpoints-13.img"
    image.write_bytes(deleted_mount_image({"/run/migsgx/enclave.sock": True,
                                           "/etc/hostname": True}))  # fmt: skip
    before = image.read_bytes()
    spec = localize(ENGINE_SPECS["runc"], HERE)
    assert localize_images(tmp_path, spec) == ["mountpoints-13.img"]
    after = image.read_bytes()
    deleted = {m.mountpoint: m.deleted for m in mounts_of(after, "test")}
    assert deleted["/run/migsgx/enclave.sock"] is False
    assert deleted["/etc/hostname"] is True  # (not the platform's: left as CRIU wrote it)
    old = list(entries(before, MNTS_MAGIC, "test"))
    new = list(entries(after, MNTS_MAGIC, "test"))
    assert len(old) == len(new) and after[:8] == before[:8]
    for was, now in zip(old, new, strict=True):
        assert bytes([3 << 3, 0x2A]) in now and b"rw" in now  # undeclared fields kept
        assert was == now or was.replace(DELETED, b"") == now
    admit_images(tmp_path, spec)
    assert localize_images(tmp_path, spec) == []  # nothing more to change
    assert image.read_bytes() == after


def test_images_without_a_deleted_platform_mount_are_left_as_they_are(tmp_path: Path) -> None:
    image = tmp_path / "mountpoints-13.img"
    image.write_bytes(deleted_mount_image({"/etc/hostname": True}))
    before = image.read_bytes()
    assert localize_images(tmp_path, localize(ENGINE_SPECS["runc"], HERE)) == []
    assert image.read_bytes() == before
