"""The driver seam without engines: the table, targets, settings, configurations, archives."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from migsgx import cli
from migsgx.containers import (
    DRIVERS,
    ContainerError,
    ContainerSettings,
    Driver,
    HostConfig,
    make_driver,
)
from migsgx.containers.admission import SpecPolicy, SpecRefused
from migsgx.containers.cgroups import thaw_file
from migsgx.containers.command import json_object
from migsgx.containers.frozen import write_criu_config
from migsgx.containers.oci import (
    CRIU_CONFIG_ANNOTATION,
    Localization,
    extract_tree,
    joined_host_netns,
    localize,
    platform_mount,
    tar_tree,
)
from migsgx.criu import Criu
from migsgx.errors import ConfigError, CriuError, MigSGXError, ProtocolError

HERE = Localization(
    platform_socket=Path("/var/lib/dst/enclave.sock"),
    netns=Path("/run/netns/dst"),
    cgroups_path="/migsgx-dst/kv1",
    criu_config=Path("/var/lib/dst/agent/runc/kv1/criu-restore.conf"),
    policy=SpecPolicy(bind_sources=(Path("/usr"),), resolve=lambda p: p),
)


def host() -> HostConfig:
    return HostConfig(Criu("/bin/true"), ContainerSettings(), Path("/x/enclave.sock"), Path("/x"))


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "process": {
            "terminal": False,
            "args": ["python", "app.py"],
            "env": ["PATH=/usr/bin", "MIGSGX_PLATFORM_SOCKET=/run/migsgx/enclave.sock"],
        },
        "root": {"path": "rootfs", "readonly": True},
        "mounts": [
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
            {
                "destination": "/run/migsgx/enclave.sock",
                "type": "bind",
                "source": "/var/lib/src/enclave.sock",
                "options": ["rbind"],
            },
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/run/netns/src"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
            "cgroupsPath": "/migsgx-src/kv1",
            "sysctl": {"net.ipv4.ping_group_range": "0 0", "kernel.msgmax": "8192"},
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
        "annotations": {"keep": "me"},
    }
    base.update(overrides)
    return base


# --- the table -------------------------------------------------------------------------------
def test_one_table_names_every_driver() -> None:
    assert sorted(DRIVERS) == ["containerd", "pid", "podman", "runc"]
    for name in DRIVERS:
        driver: Driver = make_driver(name, host())
        assert driver.name == name
        for method in ("uses_page_server", "locate", "dump", "check_target", "admit_spec",
                       "restore", "discard", "reclaim"):  # fmt: skip
            assert callable(getattr(driver, method))


def test_an_unknown_driver_is_refused() -> None:
    with pytest.raises(ContainerError, match="no driver 'lxc'"):
        make_driver("lxc", host())


def test_page_servers_by_driver() -> None:
    pid, runc, podman = (make_driver(n, host()) for n in ("pid", "runc", "podman"))
    assert pid.uses_page_server(True) and pid.uses_page_server(False)
    assert not runc.uses_page_server(True)  # runc's page server has no TLS
    assert runc.uses_page_server(False)
    assert not podman.uses_page_server(False)  # the export archive carries the pages


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("pid", {}, {"id": "x"}),
        ("runc", {"id": "kv-1.a"}, {"id": "../etc"}),
        ("runc", {"id": "kv"}, {"id": "kv", "extra": 1}),
        ("podman", {"name": "kv_1"}, {"name": ""}),
        ("podman", {"name": "kv"}, {"id": "kv"}),
    ],
)
def test_targets_from_the_wire_are_checked(name: str, good: dict[str, Any], bad: Any) -> None:
    driver = make_driver(name, host())
    assert driver.check_target(good) == good
    with pytest.raises(ProtocolError):
        driver.check_target(bad)


@pytest.mark.parametrize(
    ("name", "handle"),
    [
        ("pid", {"id": "kv"}),  # a process tree is its pid alone
        ("runc", {"id": "../etc", "bundle": "/", "netns": ""}),  # never a path from a record
        ("runc", {"id": "kv", "bundle": "/x/agent/runc/kv", "rootfs": "/"}),
        ("containerd", {"id": "kv", "bundle": "/"}),
        ("containerd", {"id": "kv/../x"}),
        ("podman", {"id": "kv"}),
        ("podman", {"name": ""}),
    ],
)
def test_a_recorded_handle_that_is_not_the_drivers_is_not_reclaimed(
    name: str, handle: dict[str, str]
) -> None:
    """Refused before any engine is asked (a damaged or planted held-tree record)."""

    with pytest.raises((ContainerError, ProtocolError)):
        make_driver(name, host()).reclaim(handle, os.getpid())


def test_pid_driver_reclaims_a_tree_by_its_pid() -> None:
    restored = make_driver("pid", host()).reclaim({}, 4242)
    assert (restored.pid, restored.handle, restored.before_resume) == (4242, {}, None)


def test_pid_driver_locates_a_process() -> None:
    source = make_driver("pid", host()).locate(str(os.getpid()))
    assert source.root == os.getpid() and source.target == {}
    with pytest.raises(MigSGXError):
        make_driver("pid", host()).locate("not-a-pid")


# --- settings --------------------------------------------------------------------------------
def test_settings_round_trip(tmp_path: Path) -> None:
    assert ContainerSettings.load(tmp_path) == ContainerSettings()
    settings = ContainerSettings(
        runc_root=Path("/run/a/runc"), podman_root=Path("/run/a/podman"),
        podman_storage_driver="vfs", cgroup_parent="/migsgx-a", netns=Path("/run/netns/a"),
    )  # fmt: skip
    settings.save(tmp_path)
    assert ContainerSettings.load(tmp_path) == settings


@pytest.mark.parametrize(
    "text",
    ['runc_root = 3\n', 'colour = "blue"\n', 'cgroup_parent = "relative"\n',
     'cgroup_parent = "/a/../b"\n', "not toml ["],
)  # fmt: skip
def test_bad_settings_are_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "containers.toml").write_text(text)
    with pytest.raises(ConfigError):
        ContainerSettings.load(tmp_path)


# --- localizing a configuration --------------------------------------------------------------
def test_localize_points_the_container_at_this_host() -> None:
    original = spec()
    out = localize(original, HERE)
    mounts = {m["destination"]: m for m in out["mounts"]}
    assert mounts["/run/migsgx/enclave.sock"]["source"] == "/var/lib/dst/enclave.sock"
    assert mounts["/usr"]["source"] == "/usr"  # everything else as it was
    assert out["linux"]["namespaces"][1]["path"] == "/run/netns/dst"
    assert out["linux"]["cgroupsPath"] == "/migsgx-dst/kv1"
    assert out["annotations"] == {"keep": "me", CRIU_CONFIG_ANNOTATION: str(HERE.criu_config)}
    # The namespace is this host's: the source's net.* sysctls stay behind.
    assert out["linux"]["sysctl"] == {"kernel.msgmax": "8192"}
    assert original == spec()  # the input is not changed


def test_localize_a_bind_mounted_directory() -> None:
    mounts = [{"destination": "/run/migsgx", "type": "bind", "source": "/var/lib/src",
               "options": ["rbind"]}]  # fmt: skip
    out = localize(spec(mounts=mounts), HERE)
    assert out["mounts"][0]["source"] == "/var/lib/dst"
    renamed = [{**mounts[0]}]
    env = ["MIGSGX_PLATFORM_SOCKET=/run/migsgx/aesm.sock"]
    with pytest.raises(ContainerError, match=r"aesm\.sock"):
        localize(spec(mounts=renamed, process={"env": env}), HERE)


def test_localize_refuses_what_a_destination_must_not_run() -> None:
    with pytest.raises(ContainerError, match="hooks"):
        localize(spec(hooks={"prestart": [{"path": "/bin/sh"}]}), HERE)
    with pytest.raises(ContainerError, match="terminal"):
        localize(spec(process={"terminal": True}), HERE)
    with pytest.raises(ContainerError, match="not on a bind mount"):
        localize(spec(mounts=[]), HERE)
    no_platform = Localization(None, HERE.netns, None, None)
    with pytest.raises(ContainerError, match="no platform service"):
        localize(spec(), no_platform)


def test_localize_without_enclaves_or_shared_netns() -> None:
    plain = spec(process={"env": ["PATH=/usr/bin"]}, mounts=spec()["mounts"][:1])
    assert platform_mount(plain) is None
    bare = Localization(None, Path("/run/netns/dst"), None, None, policy=HERE.policy)
    out = localize(plain, bare)
    assert out["mounts"] == plain["mounts"]
    kinds = ("pid", "ipc", "uts", "mount", "network")
    own = spec(linux={**spec()["linux"], "namespaces": [{"type": t} for t in kinds]})
    assert not joined_host_netns(own)
    assert joined_host_netns(spec())
    assert localize(own, HERE)["linux"]["namespaces"] == [{"type": t} for t in kinds]


def test_net_sysctls_go_when_the_engine_shares_the_namespace() -> None:
    here = Localization(**{**HERE.__dict__, "engine_in_netns": True})
    assert localize(spec(), here)["linux"]["sysctl"] == {"kernel.msgmax": "8192"}


def test_criu_configuration_holds_the_restore(tmp_path: Path) -> None:
    write_criu_config(tmp_path / "a.conf", tcp_close=True)
    assert (tmp_path / "a.conf").read_text().split() == ["leave-stopped", "file-locks", "tcp-close"]
    write_criu_config(tmp_path / "b.conf", tcp_close=False)
    assert (tmp_path / "b.conf").read_text().split() == ["leave-stopped", "file-locks"]


# --- root file systems -----------------------------------------------------------------------
def test_an_engines_json_answer_is_an_object_or_none() -> None:
    assert json_object('{"status": "running"}', "runc state kv1") == {"status": "running"}
    assert json_object("null", "runc state kv1") is None  # (runc: no such container)
    assert json_object("[1]", "runc state kv1") is None
    with pytest.raises(ContainerError, match="ctr containers info kv1: not JSON"):
        json_object("ctr: container not found", "ctr containers info kv1")


def test_tree_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "usr" / "bin").mkdir(parents=True)
    (src / "etc").mkdir()
    (src / "etc" / "motd").write_text("hello")
    (src / "bin").symlink_to("usr/bin")
    tool = src / "usr" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    tool.chmod(0o4755)
    tar_tree(src, tmp_path / "root.tar")
    dst = tmp_path / "dst"
    dst.mkdir()
    extract_tree(tmp_path / "root.tar", dst)
    assert (dst / "etc" / "motd").read_text() == "hello"
    assert os.readlink(dst / "bin") == "usr/bin"
    assert (dst / "usr" / "bin" / "tool").stat().st_mode & 0o7777 == 0o755  # no set-id


def test_a_failed_migration_stops_the_archive_at_the_next_file(tmp_path: Path) -> None:
    """``stop`` (the dump's cancel) is asked before every file and ends the archive."""

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x")
    asked: list[int] = []

    def stop() -> None:
        asked.append(1)
        if len(asked) == 3:
            raise CriuError("the dump was cancelled: enclave 0 failed")

    with pytest.raises(CriuError, match="cancelled"):
        tar_tree(src, tmp_path / "root.tar", stop=stop)
    assert len(asked) == 3  # nothing after the cancel


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info


@pytest.mark.parametrize(
    "members",
    [
        [(_member("/etc/passwd"), b"x")],
        [(_member("../outside"), b"x")],
        [(_member("a/../../outside"), b"x")],
        [(_member("esc", tarfile.SYMTYPE, "/tmp"), b""), (_member("esc/file"), b"x")],
        [(_member("dev", tarfile.CHRTYPE), b"")],
        [(_member("hard", tarfile.LNKTYPE, "etc/passwd"), b"")],
    ],
    ids=["absolute", "dotdot", "inner-dotdot", "through-symlink", "device", "hardlink"],
)
def test_extraction_refuses_escapes(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    archive = _archive(tmp_path / "evil.tar", members)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ProtocolError):
        extract_tree(archive, root)
    assert not (tmp_path / "outside").exists()


def test_thaw_only_touches_freezer_files(tmp_path: Path) -> None:
    target = tmp_path / "freezer.state"
    target.write_text("FROZEN")
    with pytest.raises(MigSGXError):
        thaw_file(str(target))  # not under /sys/fs/cgroup
    with pytest.raises(MigSGXError):
        thaw_file("/etc/passwd")
    assert target.read_text() == "FROZEN"


# --- the command line -------------------------------------------------------------------------
def test_migrate_takes_exactly_one_workload(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for argv in ([], ["12", "--runc", "kv"], ["--runc", "kv", "--podman", "kv"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(["migrate", *argv, "--to", "10.250.0.2:7070", "--state", str(tmp_path)])
        assert exited.value.code == cli.EXIT_USAGE  # bad usage, not configuration
        assert "exactly one" in capsys.readouterr().err


def test_begin_carries_the_driver() -> None:
    from migsgx.agent.protocol import CONTROL
    from migsgx.wire import decode_body, encode

    msg = {"t": "begin", "session_id": b"m" * 16, "enclaves": [], "pids": [1], "pidns": True,
           "tcp_close": True, "page_tls": False, "driver": "runc", "target": {"id": "kv"},
           "page_server": False}  # fmt: skip
    assert decode_body(encode(msg)[4:], CONTROL) == msg
    old = {k: v for k, v in msg.items() if k not in ("driver", "target", "page_server")}
    assert decode_body(encode(old)[4:], CONTROL) == old  # the fields are optional
    with pytest.raises(ProtocolError):
        decode_body(encode({**msg, "driver": 3})[4:], CONTROL)


def test_begin_carries_what_the_destination_checks_before_the_freeze() -> None:
    from migsgx.agent.protocol import CONTROL
    from migsgx.wire import decode_body, encode

    msg = {"t": "begin", "session_id": b"m" * 16, "enclaves": [], "pids": [1], "pidns": True,
           "tcp_close": True, "page_tls": True, "spec": spec(),
           "ports": [{"proto": "tcp", "address": "0.0.0.0", "port": 7001}]}  # fmt: skip
    assert decode_body(encode(msg)[4:], CONTROL) == msg
    with pytest.raises(ProtocolError):
        decode_body(encode({**msg, "spec": [1]})[4:], CONTROL)


@pytest.mark.parametrize("name", ["runc", "podman", "containerd"])
def test_an_announced_specification_is_admitted_as_the_restore_would(
    name: str, tmp_path: Path
) -> None:
    """``begin``'s specification meets the allow list before the source freezes (and again
    at the restore); a refusal names the field, and nothing is written for an engine."""

    settings = ContainerSettings(bind_sources=(Path("/usr"),), netns=Path("/run/netns/dst"))
    driver = make_driver(name, HostConfig(Criu("/bin/true"), settings, Path("/x/e.sock"), tmp_path))
    target = {"name": "kv1"} if name == "podman" else {"id": "kv1"}
    good = spec()
    driver.admit_spec(target, good)
    assert good == spec()  # the announcement is not changed
    bad = spec()
    bad["process"]["capabilities"] = {"bounding": ["CAP_SYS_ADMIN"]}
    with pytest.raises(SpecRefused) as refused:
        driver.admit_spec(target, bad)
    assert refused.value.field == "process.capabilities.bounding"
    assert not (tmp_path / "agent").exists()  # nothing written for an engine
    with pytest.raises(ProtocolError):
        make_driver("pid", host()).admit_spec({}, good)


# --- containerd ------------------------------------------------------------------------------
def test_containerd_settings_round_trip(tmp_path: Path) -> None:
    from migsgx.containers.containerd import Ctr

    settings = ContainerSettings.from_mapping(
        {"containerd_address": "/run/x/containerd.sock", "containerd_namespace": "migsgx",
         "containerd_snapshotter": "native"}
    )  # fmt: skip
    settings.save(tmp_path)
    again = ContainerSettings.load(tmp_path)
    assert again == settings
    ctr = Ctr(again, Path("/opt/criu/bin/criu"))
    assert ctr.argv("tasks", "list") == [
        "ctr",
        "--address",
        "/run/x/containerd.sock",
        "--namespace",
        "migsgx",
        "tasks",
        "list",
    ]
    assert ctr.runc_root == Path("/run/containerd/runc/migsgx")
    assert ctr.env["PATH"].startswith("/opt/criu/bin:")


def test_containerd_destination_checks_what_a_peer_sends(tmp_path: Path) -> None:
    import json

    from migsgx.containers.containerd import CONTAINERD_RECORD, ContainerdDriver

    driver = ContainerdDriver(host())
    with pytest.raises(ProtocolError, match="a containerd target is"):
        driver.check_target({"name": "x"})
    with pytest.raises(ProtocolError, match="bad container id"):
        driver.check_target({"id": "../etc"})
    record = {"image": "localhost/app:1", "runtime": "/usr/bin/evil-shim", "spec": {}}
    (tmp_path / CONTAINERD_RECORD).write_text(json.dumps(record))
    with pytest.raises(MigSGXError, match="is not accepted here"):
        driver._record(tmp_path)
    record.update(runtime="io.containerd.runc.v2", image="")
    (tmp_path / CONTAINERD_RECORD).write_text(json.dumps(record))
    with pytest.raises(ProtocolError, match="names no image"):
        driver._record(tmp_path)
    record.update(image="localhost/app:1")
    (tmp_path / CONTAINERD_RECORD).write_text(json.dumps(record))
    assert driver._record(tmp_path) == ("localhost/app:1", "io.containerd.runc.v2", {})


# --- what a dead agent's restore left ---------------------------------------------------------
@pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed")
def test_runc_removes_only_a_bundle_its_restore_marked_for_the_session(tmp_path: Path) -> None:
    """A record (damaged or forged) names the container: the bundle goes only if its
    mark names the record's session."""

    from migsgx.containers.runc import OWNER_MARK

    settings = ContainerSettings(runc_root=tmp_path / "runc")
    host_config = HostConfig(Criu("/bin/true"), settings, Path("/x/e.sock"), tmp_path)
    driver = make_driver("runc", host_config)
    bundle = tmp_path / "agent" / "runc" / "kv1"
    bundle.mkdir(parents=True)
    (bundle / OWNER_MARK).write_text("ab" * 16)
    for owner in ("cd" * 16, ""):
        with pytest.raises(ContainerError, match="not this agent's to remove"):
            driver.remove_made({"id": "kv1"}, owner, keep_running=False)
        assert (bundle / OWNER_MARK).exists()
    (bundle / OWNER_MARK).unlink()  # (resumed)
    with pytest.raises(ContainerError):
        driver.remove_made({"id": "kv1"}, "", keep_running=False)
    with pytest.raises(MigSGXError):
        driver.remove_made({"id": "../kv1"}, "ab" * 16, keep_running=False)
    (bundle / OWNER_MARK).write_text("ab" * 16)
    other = bundle.parent / "kv2"
    other.mkdir()
    (other / OWNER_MARK).write_text("cd" * 16)
    # A damaged name: the session's mark finds what its restore made, and only that.
    assert driver.remove_made({"id": "kv1-x"}, "ab" * 16, keep_running=True) == (
        f"its bundle {bundle}"  # (runc does not know the container: the bundle alone)
    )
    assert not bundle.exists() and (other / OWNER_MARK).exists()
    # (before any engine is asked: a handle of another engine's shape)
    for name, handle in (("podman", {"id": "kv1"}), ("containerd", {"name": "kv1"}),
                         ("pid", {})):  # fmt: skip
        with pytest.raises(ContainerError):
            make_driver(name, host_config).remove_made(handle, "ab" * 16, keep_running=False)


def test_an_engine_store_mark_names_one_session(tmp_path: Path) -> None:
    from migsgx.containers import owner

    mark = owner.mark_path(tmp_path, "kv1")
    owner.write(mark, "ab" * 16, "kv1")
    owner.check(mark, "ab" * 16, "kv1")
    for other in ("cd" * 16, ""):
        with pytest.raises(ContainerError, match="not this agent's to remove"):
            owner.check(mark, other, "kv1")
    owner.clear(mark)
    owner.clear(mark)  # (twice: no error)
    with pytest.raises(ContainerError):
        owner.check(mark, "ab" * 16, "kv1")
    assert owner.alive(os.getpid()) and not owner.alive(0)


def test_an_engine_store_mark_is_made_once_and_whole(tmp_path: Path) -> None:
    """Two sessions restoring one name at once both found no container; the mark is
    what lets only one of them on (as runc's bundle does).  A mark no session of
    this agent wrote (a former agent's, its container gone) is replaced, never
    written through."""

    from migsgx.containers import owner

    mark = owner.mark_path(tmp_path, "kv1")
    owner.write(mark, "ab" * 16, "kv1")
    try:
        with pytest.raises(ContainerError, match="another session of this agent"):
            owner.write(mark, "cd" * 16, "kv1")
        assert owner.read(mark) == "ab" * 16
    finally:
        owner.clear(mark)
    target = tmp_path / "elsewhere"
    left = owner.mark_path(tmp_path, "kv2")
    left.symlink_to(target)  # (left, or planted: the name is taken by something)
    owner.write(left, "cd" * 16, "kv2")
    try:
        assert not target.exists() and not left.is_symlink()
        assert owner.read(left) == "cd" * 16
        with pytest.raises(ContainerError):
            owner.write(left, "ef" * 16, "kv2")
    finally:
        owner.clear(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    owner.write(mark, "ef" * 16, "kv1")  # (cleared: free again)
    owner.clear(mark)


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_a_podman_restore_of_a_name_another_session_marked_changes_nothing(
    tmp_path: Path,
) -> None:
    """The second session is refused before it writes anything: its failure path
    cleared the first session's mark (and removed the container it had restored)."""

    from migsgx.containers import owner
    from migsgx.containers.base import RestoreRequest
    from migsgx.containers.podman import PODMAN_ARCHIVE

    driver = make_driver(
        "podman", HostConfig(Criu("/bin/true"), ContainerSettings(), Path("/x/e.sock"), tmp_path)
    )
    name = f"migsgx-unit-{os.getpid()}"
    conf = tmp_path / "agent" / "podman"
    conf.mkdir(parents=True)
    mark = owner.mark_path(conf, name)
    owner.write(mark, "ab" * 16, name)  # (the first session's restore is under way)
    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(images / PODMAN_ARCHIVE, "w") as tar:
        data = b"{}"
        info = tarfile.TarInfo("config.dump")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    request = RestoreRequest(images, {"name": name}, tcp_close=False, owner="cd" * 16)
    try:
        with pytest.raises(ContainerError, match="another session of this agent"):
            driver.restore(request)
        assert owner.read(mark) == "ab" * 16
        assert not (conf / f"{name}.criu.conf").exists()
    finally:
        owner.clear(mark)
    # A former agent's mark (its container gone, the engine knows none) is replaced:
    # the restore goes on (and fails later here, on the bare archive, clearing it).
    mark.write_text("ab" * 16)
    shutil.rmtree(images / "podman-import")
    with pytest.raises(MigSGXError) as failed:
        driver.restore(request)
    assert "another session" not in str(failed.value)
    assert not mark.exists()
