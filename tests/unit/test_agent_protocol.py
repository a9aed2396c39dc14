"""The agent's control protocol core: schema, state table, names, fault points."""

from __future__ import annotations

import pytest

from migsgx.agent.faults import InjectedFault, fault
from migsgx.agent.protocol import (
    CONTROL,
    SessionMachine,
    SessionState,
    check_image_name,
    plain_stats,
)
from migsgx.errors import FrameError, ProtocolError
from migsgx.wire import decode_body, encode

HAPPY = ["hello", "begin", "enclaves_done", "image", "image", "images_done", "restore", "resume"]
#: The tool's default order: the images and the restore while the enclaves still load.
OVERLAPPED = ["hello", "begin", "image", "images_done", "restore", "enclaves_done", "resume"]


def test_the_happy_path_ends_resumed() -> None:
    machine = SessionMachine()
    for request in HAPPY:
        machine.advance(request)
    assert machine.state is SessionState.RESUMED and machine.finished
    assert machine.history == HAPPY


def test_the_overlapped_path_ends_resumed_through_held_loading() -> None:
    machine = SessionMachine()
    states = [machine.advance(request) for request in OVERLAPPED]
    assert states[2:6] == [
        SessionState.EARLY_IMAGES,
        SessionState.EARLY_IMAGES_COMPLETE,
        SessionState.HELD_LOADING,
        SessionState.HELD,
    ]
    assert machine.state is SessionState.RESUMED and machine.finished


def test_images_early_and_the_restore_after_the_enclaves() -> None:
    """A tool may send the images early and still restore only after ``enclaves_done``."""

    machine = SessionMachine()
    for request in ["hello", "begin", "images_done", "enclaves_done", "restore", "resume"]:
        machine.advance(request)
    assert machine.state is SessionState.RESUMED


@pytest.mark.parametrize("path", [HAPPY, OVERLAPPED], ids=["sequential", "overlapped"])
@pytest.mark.parametrize("stop", range(1, len(HAPPY)))
def test_abort_is_allowed_until_the_resume(path: list[str], stop: int) -> None:
    machine = SessionMachine()
    for request in path[: min(stop, len(path) - 1)]:
        machine.advance(request)
    machine.advance("abort")
    assert machine.state is SessionState.ABORTED and machine.finished
    with pytest.raises(ProtocolError):
        machine.advance("resume")


def test_nothing_before_hello_and_nothing_after_the_end() -> None:
    with pytest.raises(ProtocolError, match="not allowed in state new"):
        SessionMachine().advance("abort")
    machine = SessionMachine()
    for request in HAPPY:
        machine.advance(request)
    for request in ("abort", "resume", "hello"):
        with pytest.raises(ProtocolError):
            machine.advance(request)


@pytest.mark.parametrize(
    ("done", "wrong"),
    [
        (["hello"], "restore"),
        (["hello", "begin"], "restore"),
        (["hello", "begin"], "resume"),
        (["hello", "begin", "image"], "restore"),
        (["hello", "begin", "images_done"], "image"),
        (["hello", "begin", "images_done"], "resume"),
        # held-loading: nothing commits or resumes before every enclave LOADED
        (["hello", "begin", "images_done", "restore"], "resume"),
        (["hello", "begin", "images_done", "restore"], "redeliver"),
        (["hello", "begin", "images_done", "restore"], "restore"),
        (["hello", "begin", "images_done", "restore", "enclaves_done"], "enclaves_done"),
        (["hello", "begin", "enclaves_done"], "restore"),
        (["hello", "begin", "enclaves_done", "images_done"], "resume"),
        (["hello", "begin", "enclaves_done", "images_done"], "image"),
    ],
)
def test_requests_out_of_turn(done: list[str], wrong: str) -> None:
    machine = SessionMachine()
    for request in done:
        machine.advance(request)
    with pytest.raises(ProtocolError):
        machine.advance(wrong)


def test_a_failure_is_a_dead_end() -> None:
    machine = SessionMachine()
    machine.advance("hello")
    machine.fail()
    assert machine.finished
    with pytest.raises(ProtocolError):
        machine.advance("begin")


@pytest.mark.parametrize("name", ["core-1.img", "pagemap-12.img", "stats-dump", "inventory.img"])
def test_image_names_criu_writes(name: str) -> None:
    assert check_image_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".hidden", "../core-1.img", "a/b.img", "x" * 200, "sp ace", "nul\0"]
)
def test_image_names_that_could_escape(name: str) -> None:
    with pytest.raises(ProtocolError):
        check_image_name(name)


def test_the_schema_refuses_extra_and_mistyped_fields() -> None:
    good = {"t": "image", "name": "core-1.img", "data": b"x"}
    assert CONTROL.validate(dict(good)) == good
    with pytest.raises(FrameError, match="unexpected field"):
        CONTROL.validate(good | {"mode": 0o777})
    with pytest.raises(FrameError, match="wrong type"):
        CONTROL.validate({"t": "images_done", "files": True, "bytes": 1})
    with pytest.raises(FrameError, match="unknown message type"):
        CONTROL.validate({"t": "exec", "argv": ["sh"]})


def test_fault_points(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fault("agent.before-restore") is None
    monkeypatch.setenv("MIGSGX_FAULT", "agent.before-restore:corrupt,tool.after-prepare:fail")
    assert fault("agent.before-restore") == "corrupt"
    assert fault("agent.after-restore") is None
    with pytest.raises(InjectedFault):
        fault("tool.after-prepare")
    with pytest.raises(ValueError, match="unknown fault point"):
        fault("agent.nowhere")


def test_the_commands_register_into_a_group() -> None:
    import click

    from migsgx import cli_agent, cli_lab, cli_migrate

    group = click.Group("migsgx")
    for module in (cli_agent, cli_migrate, cli_lab):
        module.register(group)
    assert {"agent", "migrate", "checkpoint", "restore", "bench"} <= set(group.commands)
    bench = group.commands["bench"]
    assert isinstance(bench, click.Group) and "process" in bench.commands
    agent = group.commands["agent"]
    assert isinstance(agent, click.Group) and {"cert", "serve"} <= set(agent.commands)


def test_stats_carry_plain_scalars_only() -> None:
    stats = {
        "bytes": 3,
        "seconds": 0.5,
        "mode": "pipelined",
        "ok": True,
        "none": None,
        "destination": {"bytes": 3},
        "list": [1],
    }
    out = plain_stats(stats)
    assert out == {"bytes": 3, "seconds": 0.5, "mode": "pipelined", "ok": True, "none": None}
    assert decode_body(encode({"t": "enclaves_ready", "stats": [out]})[4:], CONTROL)


def test_a_connection_of_its_own_may_ask_for_the_state_again() -> None:
    """The source's guardian (no tool): ``redeliver`` names the session held in doubt."""

    machine = SessionMachine()
    machine.advance("hello")
    machine.advance("redeliver")
    assert machine.state is SessionState.DELIVERED and machine.finished
    with pytest.raises(ProtocolError):
        machine.advance("redeliver")  # one request per connection
    msg = {"t": "redeliver", "session_id": bytes(16), "index": 0}
    assert decode_body(encode(msg)[4:], CONTROL) == msg
    answer = {"t": "redelivery", "data_port": 4242, "data_key": bytes(32)}
    assert decode_body(encode(answer)[4:], CONTROL) == answer
