"""The CRIU driver against a stand-in ``criu swrk`` (no root, no CRIU needed).

The stand-in speaks the same protobuf RPC over the socket it is handed, and
records what it received, so the request mapping, the NOTIFY handshake and
every failure path are checked without touching a process.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from migsgx.criu import Criu, InNetns, InTaskNamespaces, binary_version, find_criu, log_excerpt
from migsgx.criu.locate import ENV_VAR
from migsgx.errors import ConfigError, CriuError

pytest.importorskip("migsgx.criu._generated.rpc_pb2", reason="run scripts/setup.sh first")

FAKE_SWRK = """
import json, os, socket, struct, sys, time
from google.protobuf.json_format import MessageToDict
from migsgx.criu._generated import rpc_pb2 as pb

mode = os.environ["FAKE_CRIU_MODE"]
record_path = os.environ["FAKE_CRIU_RECORD"]
assert sys.argv[1] == "swrk"
sock = socket.socket(fileno=int(sys.argv[2]))
req = pb.criu_req.FromString(sock.recv(1 << 20))
peer = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
record = {"type": pb.criu_req_type.Name(req.type)}
images = None
if req.HasField("opts"):
    record["opts"] = MessageToDict(req.opts, preserving_proto_field_name=True)
    images = f"/proc/{peer}/fd/{req.opts.images_dir_fd}"
    record["images_dir_open"] = os.path.isdir(images)

def save():
    with open(record_path, "w") as f:
        json.dump(record, f)

def notify(script, pid=0):
    resp = pb.criu_resp(type=pb.NOTIFY, success=True)
    resp.notify.script = script
    resp.notify.pid = pid
    sock.send(resp.SerializeToString())
    answer = pb.criu_req.FromString(sock.recv(1 << 20))
    assert answer.type == pb.NOTIFY
    record.setdefault("answers", []).append([script, answer.notify_success])
    return answer.notify_success

final = pb.criu_resp(type=req.type, success=True)
if mode == "silent":
    save()
    print("fake criu: giving up", file=sys.stderr)
    sys.exit(3)
elif mode == "garbage":
    save()
    sock.send(b"\\xff\\xff\\xff\\xff")
    sock.recv(16)
    sys.exit(0)
elif mode == "hang":
    save()
    time.sleep(60)
elif mode == "hang-with-task":
    # As CRIU's restorer spinning on a truncated page image, with a task below it.
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    record["task"] = child
    save()
    notify("pre-resume", child)
    time.sleep(60)
elif mode == "dump":
    ok = notify("pre-dump") and notify("post-dump")
    notify("network-unlock")
    final.success = ok
    if not ok:
        final.cr_errmsg = "Error (criu/util.c:1): rlimit: Can't setup RLIMIT_NOFILE for self"
elif mode == "restore":
    notify("pre-restore")
    notify("post-restore", 4242)
    final.restore.pid = 4242
elif mode == "fail":
    with open(os.path.join(images, req.opts.log_file), "w") as log:
        log.write("(00.001) Error (criu/util.c:1): rlimit: Can't setup RLIMIT_NOFILE for self\\n")
        log.write("(00.002) Info: something harmless\\n")
        log.write("(00.003) Error (criu/image.c:563): Magic doesn't match for inventory.img\\n")
    final.success = False
    final.cr_errno = 2
    final.cr_errmsg = "Error (criu/util.c:1): rlimit: Can't setup RLIMIT_NOFILE for self"
elif mode == "version":
    final.version.major_number = 4
    final.version.minor_number = 2
    final.version.sublevel = 1
save()
sock.send(final.SerializeToString())
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Criu, Path]:
    binary = tmp_path / "criu"
    binary.write_text(f"#!{sys.executable}\n{FAKE_SWRK}")
    binary.chmod(0o755)
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_CRIU_RECORD", str(record))
    return Criu(binary, timeout=10), record


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


def use(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("FAKE_CRIU_MODE", mode)


def test_dump_maps_options_and_answers_notifications(
    fake: tuple[Criu, Path], images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    criu, record = fake
    use(monkeypatch, "dump")
    seen: list[tuple[str, int]] = []
    criu.dump(
        1234,
        images,
        tcp_established=True,
        shell_job=True,
        notify=lambda script, pid: seen.append((script, pid)),
        extra={"external": ["net[1]:veth0"], "ghost_limit": 4096},
    )
    got = json.loads(record.read_text())
    assert got["type"] == "DUMP"
    assert got["images_dir_open"] is True  # our descriptor was still open for CRIU
    opts = got["opts"]
    assert opts["pid"] == 1234
    assert opts["tcp_established"] is True
    assert opts["shell_job"] is True
    assert opts["notify_scripts"] is True
    assert opts["log_file"] == "dump.log"
    assert opts["external"] == ["net[1]:veth0"]
    assert opts["ghost_limit"] == 4096
    assert seen == [("pre-dump", 0), ("post-dump", 0), ("network-unlock", 0)]
    assert got["answers"] == [["pre-dump", True], ["post-dump", True], ["network-unlock", True]]


def test_a_raising_callback_vetoes_and_is_the_cause(
    fake: tuple[Criu, Path], images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    criu, record = fake
    use(monkeypatch, "dump")

    def veto(script: str, _pid: int) -> None:
        if script == "post-dump":
            raise KeyError("not committed")

    with pytest.raises(CriuError) as caught:
        criu.dump(1, images, notify=veto)
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.context["notify_script"] == "post-dump"
    assert "CRIU aborted" in str(caught.value)
    assert "RLIMIT_NOFILE" not in str(caught.value)  # noise is kept out of the message
    answers = json.loads(record.read_text())["answers"]
    assert answers == [["pre-dump", True], ["post-dump", False], ["network-unlock", True]]


def test_no_callback_means_no_notifications_requested(
    fake: tuple[Criu, Path], images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    criu, record = fake
    use(monkeypatch, "restore")
    assert criu.restore(images, restore_detached=False) == 4242
    opts = json.loads(record.read_text())["opts"]
    assert "notify_scripts" not in opts
    assert opts["rst_sibling"] is True
    assert opts["log_file"] == "restore.log"


def test_failure_carries_errno_and_log_errors(
    fake: tuple[Criu, Path], images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    criu, _ = fake
    use(monkeypatch, "fail")
    with pytest.raises(CriuError) as caught:
        criu.restore(images)
    err = caught.value
    assert err.context["cr_errno"] == 2
    assert "No such file or directory" in str(err)
    assert "Magic doesn't match for inventory.img" in str(err)
    assert "RLIMIT_NOFILE" not in str(err)
    assert err.context["log_path"] == str(images / "restore.log")


def test_criu_exiting_without_answer(
    fake: tuple[Criu, Path], images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    criu, _ = fake
    use(monkeypatch, "silent")
    with pytest.raises(CriuError, match="exited without an answer") as caught:
        criu.dump(1, images)
    assert "exit status 3" in str(caught.value)
    assert "fake criu: giving up" in str(caught.value)


def test_undecodable_answer(
    fake: tuple[Criu, Path], images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    criu, _ = fake
    use(monkeypatch, "garbage")
    with pytest.raises(CriuError, match="undecodable") as caught:
        criu.dump(1, images)
    assert caught.value.__cause__ is not None


def test_timeout_kills_criu(tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "criu"
    binary.write_text(f"#!{sys.executable}\n{FAKE_SWRK}")
    binary.chmod(0o755)
    monkeypatch.setenv("FAKE_CRIU_RECORD", str(tmp_path / "record.json"))
    use(monkeypatch, "hang")
    with pytest.raises(CriuError, match="timed out") as caught:
        Criu(binary, timeout=0.5).dump(1, images)
    assert isinstance(caught.value.__cause__, TimeoutError)


def test_version_request(fake: tuple[Criu, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    criu, record = fake
    use(monkeypatch, "version")
    version = criu.version()
    assert (version.major, version.minor, version.sublevel) == (4, 2, 1)
    assert "opts" not in json.loads(record.read_text())


def test_bad_arguments_are_refused_before_criu_runs(
    fake: tuple[Criu, Path], images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    criu, record = fake
    use(monkeypatch, "dump")
    with pytest.raises(ConfigError):
        criu.dump(1, images, log_file="sub/dump.log")
    with pytest.raises(ConfigError, match="no_such_option"):
        criu.dump(1, images, extra={"no_such_option": True})
    with pytest.raises(CriuError, match="images directory"):
        criu.dump(1, images / "missing")
    assert not record.exists()


def test_namespace_prefixes() -> None:
    assert InNetns("hostb").argv_prefix() == ["nsenter", "--net=/run/netns/hostb", "--"]
    assert InTaskNamespaces(42).argv_prefix() == ["nsenter", "--target=42", "--net", "--mount"]
    assert InTaskNamespaces(42, mount=False).argv_prefix() == ["nsenter", "--target=42", "--net"]


# --- finding a binary ----------------------------------------------------------------


def fake_version_binary(tmp_path: Path, text: str) -> Path:
    binary = tmp_path / "criu-version"
    binary.write_text(f"#!/bin/sh\nprintf '{text}'\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def test_old_criu_is_refused(tmp_path: Path) -> None:
    old = fake_version_binary(tmp_path, "Version: 3.17.1\\n")
    with pytest.raises(CriuError, match=r"needs CRIU >= 4\.2"):
        find_criu(env={ENV_VAR: str(old)})


def test_env_var_wins_and_version_parses(tmp_path: Path) -> None:
    new = fake_version_binary(tmp_path, "Version: 4.2.1\\nGitID: v4.2.1-7-gabc\\n")
    assert find_criu(env={ENV_VAR: str(new)}) == new
    version = binary_version(new)
    assert (version.major, version.minor, version.sublevel, version.gitid) == (
        4,
        2,
        1,
        "v4.2.1-7-gabc",
    )
    assert str(version) == "4.2.1"


def test_env_var_naming_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CriuError, match="not an executable"):
        find_criu(env={ENV_VAR: str(tmp_path / "nope")})


def test_unreadable_version_is_an_error(tmp_path: Path) -> None:
    odd = fake_version_binary(tmp_path, "criu, some version\\n")
    with pytest.raises(CriuError, match="printed no version"):
        binary_version(odd)


def test_log_excerpt_prefers_errors_and_drops_noise(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    lines = [f"(00.{i:03d}) Info: step {i}" for i in range(30)]
    lines.insert(3, "(00.100) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE")
    log.write_text("\n".join(lines) + "\n")
    assert log_excerpt(log, lines=3) == "\n".join(lines[-3:])
    log.write_text("\n".join([*lines, "(01.000) Error (criu/x.c:1): real trouble", "(01.1) end"]))
    assert log_excerpt(log) == "(01.000) Error (criu/x.c:1): real trouble"
    assert log_excerpt(tmp_path / "missing.log") == ""


def test_criu_without_binary_uses_find_criu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    new = fake_version_binary(tmp_path, "Version: 4.2.0\\n")
    monkeypatch.setenv(ENV_VAR, str(new))
    assert Criu().binary == new
    assert os.access(Criu().binary, os.X_OK)


def test_an_aborted_restore_leaves_no_task_behind(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "criu"
    binary.write_text(f"#!{sys.executable}\n{FAKE_SWRK}")
    binary.chmod(0o755)
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_CRIU_RECORD", str(record))
    use(monkeypatch, "hang-with-task")

    class Interrupted(BaseException):
        """As a signal or a cancelled caller would cut the restore short."""

    def interrupt(_script: str, _pid: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        Criu(binary, timeout=30).restore(images, notify=interrupt)
    task = json.loads(record.read_text())["task"]
    # SIGKILLed (delivery is asynchronous): it dies, never to run its code again.
    stat_path = Path(f"/proc/{task}/stat")

    def state() -> str:
        try:
            return stat_path.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return ""

    deadline = time.monotonic() + 10
    while state() not in ("", "Z", "X") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state() in ("", "Z", "X")
