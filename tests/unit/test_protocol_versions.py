"""Control protocol versions: the negotiation table, and what each version's frames hold.

The previous release's schema is frozen in ``tests/compat/control-v1.json``; a
session of version 1 must send nothing that schema refuses, and every field
added since must be listed in ``versions.SINCE`` (or version 1 peers break).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from migsgx.agent.control import AgentConnection
from migsgx.agent.protocol import CONTROL, CONTROL_FRAME_MAX
from migsgx.agent.versions import (
    MESSAGES_SINCE,
    NEEDS,
    OLDEST,
    SINCE,
    VERSION,
    ProtocolVersionError,
    agent_choice,
    check_needs,
    check_version,
    for_version,
    retry_offer,
    tool_accepts,
)
from migsgx.errors import FrameError, MigrationError, ProtocolError
from migsgx.wire import Schema, recv_frame, send_frame

FROZEN = Path(__file__).resolve().parents[1] / "compat" / "control-v1.json"
_TYPES: dict[str, type] = {
    "tstr": str, "bstr": bytes, "int": int, "float": float, "bool": bool,
    "array": list, "map": dict, "null": type(None),
}  # fmt: skip


def _v1() -> Schema:
    doc = json.loads(FROZEN.read_text())
    return Schema(
        "agent-control-v1",
        {
            t: {k: tuple(_TYPES[x] for x in v.split("|")) for k, v in fields.items()}
            for t, fields in doc["messages"].items()
        },
    )


V1 = _v1()
_SAMPLE: dict[type, Any] = {str: "x", bytes: b"\0" * 16, int: 7, float: 0.5, bool: True,
                            list: [], dict: {}}  # fmt: skip


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _full(t: str) -> dict[str, Any]:
    """A message of today's schema with every field it has, each of its first non-null type."""

    msg: dict[str, Any] = {"t": t}
    for key, kind in CONTROL.messages[t].items():
        msg[key] = _SAMPLE[next(k for k in _kinds(kind) if k is not type(None))]
    return CONTROL.validate(msg)


# --- the negotiation table ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("offered", "oldest", "newest", "session"),
    [
        (2, 1, 2, 2),  # this tool, this agent
        (1, 1, 2, 1),  # the previous release's tool, this agent: version 1's frames
        (3, 1, 2, 2),  # a newer tool speaks down to this agent
        (2, 2, 2, 2),  # an agent told --min-protocol 2, this tool
        (1, 2, 2, None),  # ... the previous release's tool: refused at hello
        (2, 3, 4, None),  # an agent too new for this tool: refused at hello
    ],
)
def test_the_agent_answers_the_older_of_the_offer_and_its_newest(
    offered: int, oldest: int, newest: int, session: int | None
) -> None:
    if session is None:
        with pytest.raises(ProtocolVersionError, match=f"up to {offered}") as caught:
            agent_choice(offered, oldest, newest)
        assert caught.value.code == "protocol-version"
        assert isinstance(caught.value, MigrationError)  # exit 6: nothing moved
        assert "upgrade migsgx on the source host" in str(caught.value)
    else:
        assert agent_choice(offered, oldest, newest) == session
        assert tool_accepts(offered, session) == session


def test_a_version_that_does_not_exist_is_a_protocol_error() -> None:
    for offered in (0, -1):
        with pytest.raises(ProtocolError, match="does not exist"):
            agent_choice(offered)


def test_this_release_speaks_both_versions_by_default() -> None:
    assert (OLDEST, VERSION) == (1, 2)
    assert agent_choice(VERSION) == VERSION and agent_choice(1) == 1


@pytest.mark.parametrize(
    ("offered", "code", "again"),
    [
        (2, "protocol", 1),  # a version 1 agent's refusal of any other version: offer 1
        (1, "protocol", None),  # refused at 1 as well: a real protocol error, no loop
        (2, "protocol-version", None),  # a newer agent's refusal names versions: final
        (2, "frame", None),
        (2, "agent", None),
    ],
)
def test_the_tool_greets_again_only_a_version_1_agent(
    offered: int, code: str, again: int | None
) -> None:
    assert retry_offer(offered, code) == again


@pytest.mark.parametrize(("offered", "answered"), [(2, 3), (1, 2), (2, 0)])
def test_the_tool_refuses_a_welcome_outside_its_offer(offered: int, answered: int) -> None:
    with pytest.raises(ProtocolError, match="answered protocol version"):
        tool_accepts(offered, answered)


def test_what_a_migration_needs_came_with_version_1() -> None:
    for version in (1, 2):
        check_needs(version, NEEDS)  # everything a migration asks for today
    with pytest.raises(KeyError):
        check_needs(2, ["teleport"])  # (a need must be named in the table)


def test_a_need_newer_than_the_session_is_refused_before_anything_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(NEEDS, "a-later-feature", 3)  # type: ignore[index]
    with pytest.raises(ProtocolVersionError) as caught:
        check_needs(2, ["process", "a-later-feature"], peer="the agent at 10.0.0.2:7000")
    text = str(caught.value)
    assert "the agent at 10.0.0.2:7000 speaks control protocol version 2" in text
    assert "a-later-feature (version 3)" in text and "nothing moved" in text
    check_needs(3, ["process", "a-later-feature"])


# --- what each version's frames hold --------------------------------------------------------
def test_the_frozen_schema_is_todays_without_the_fields_added_since() -> None:
    """Every field added after version 1 is in SINCE; nothing else changed."""

    added_messages = {t for t, since in MESSAGES_SINCE.items() if since > 1}
    assert set(V1.messages) == set(CONTROL.messages) - added_messages
    for t, fields in CONTROL.messages.items():
        if t in added_messages:
            continue
        added = {k for k, since in SINCE.get(t, {}).items() if since > 1}
        assert set(fields) - added == set(V1.messages[t]), t
        for key in set(fields) - added:
            assert set(_kinds(fields[key])) == set(_kinds(V1.messages[t][key])), (t, key)
        for key in added:  # an added field is optional: its absence means what it did
            assert type(None) in _kinds(fields[key]), (t, key)


@pytest.mark.parametrize("t", sorted(set(CONTROL.messages) - set(MESSAGES_SINCE)))
def test_a_version_1_peer_accepts_every_frame_of_a_version_1_session(t: str) -> None:
    full = _full(t)
    old = for_version(full, 1)
    assert V1.validate(old) == old
    check_version(old, 1)
    assert for_version(full, VERSION) == full  # a session of this version: all of it


def test_today_s_full_frames_break_a_version_1_peer() -> None:
    """Why the versions exist: without ``for_version`` a version 1 agent refuses begin."""

    with pytest.raises(FrameError, match="unexpected field 'memory_bytes'"):
        V1.validate(_full("begin"))
    with pytest.raises(FrameError, match="unexpected field 'images_fs'"):
        V1.validate(_full("images_ok"))


@pytest.mark.parametrize("t", sorted(MESSAGES_SINCE))
def test_a_request_newer_than_the_session_is_never_sent_and_refused_on_receipt(t: str) -> None:
    full = _full(t)
    since = MESSAGES_SINCE[t]
    assert for_version(full, since) == full
    with pytest.raises(ProtocolVersionError, match=f"has no {t!r} request"):
        for_version(full, since - 1)  # (it cannot be left out: the caller is told)
    with pytest.raises(ProtocolError, match=f"{t!r} is not in control protocol version"):
        check_version(full, since - 1)
    with pytest.raises(FrameError, match="unknown message type"):
        V1.validate(full)  # what a version 1 agent would make of it


def test_a_field_newer_than_the_session_is_refused_on_receipt() -> None:
    begin = _full("begin")
    check_version(begin, 2)
    with pytest.raises(ProtocolError, match="memory_bytes is not in control protocol version 1"):
        check_version(begin, 1)
    images_ok = {"t": "images_ok", "page_bytes": 0, "seconds": 0.1, "images_fs": "tmpfs"}
    with pytest.raises(ProtocolError, match="images_fs"):
        check_version(images_ok, 1)
    check_version({"t": "hello", "version": 9, "host_id": "h"}, 1)  # (old fields: always)


# --- the tool's greeting, against agents of each version (in memory) -------------------------
def _agent_v1(sock: socket.socket, seen: list[dict[str, Any]]) -> None:
    """The previous release's agent, as far as a session's start: its schema and hello rule."""

    with sock:
        hello = recv_frame(sock, V1, max_size=CONTROL_FRAME_MAX)
        seen.append(hello)
        if hello["version"] != 1:  # its rule: refuse any other version, end the session
            message = f"protocol version {hello['version']} is not 1"
            send_frame(sock, {"t": "err", "code": "protocol", "message": message})
            return
        send_frame(sock, {"t": "welcome", "version": 1, "host_id": "old"})
        seen.append(recv_frame(sock, V1, max_size=CONTROL_FRAME_MAX))  # FrameError: unknown
        send_frame(sock, {"t": "ready", "data_port": 1, "page_port": 2, "data_key": b"k" * 32})


def _agent_refusing(sock: socket.socket, seen: list[dict[str, Any]]) -> None:
    """A later agent that no longer speaks this tool's versions."""

    with sock:
        hello = recv_frame(sock, CONTROL, max_size=CONTROL_FRAME_MAX)
        seen.append(hello)
        try:
            agent_choice(hello["version"], oldest=3, newest=4)
        except ProtocolVersionError as exc:
            send_frame(sock, {"t": "err", "code": exc.code, "message": exc.message})


def _tool(
    monkeypatch: pytest.MonkeyPatch, agent: Callable[[socket.socket, list[dict[str, Any]]], None]
) -> tuple[AgentConnection, list[dict[str, Any]], list[threading.Thread]]:
    """The tool's control connection with each (re)connection served by ``agent`` in a thread
    (in place of TCP and TLS: what is under test is the greeting and the frames)."""

    seen: list[dict[str, Any]] = []
    threads: list[threading.Thread] = []

    def connect() -> socket.socket:
        mine, theirs = socket.socketpair()
        mine.settimeout(10)
        thread = threading.Thread(target=agent, args=(theirs, seen), daemon=True)
        thread.start()
        threads.append(thread)
        return mine

    conn = AgentConnection.__new__(AgentConnection)
    conn.to, conn.timeout, conn.version = ("10.0.0.2", 7070), 10.0, 1
    monkeypatch.setattr(conn, "_connect", connect)
    conn.sock = connect()  # type: ignore[assignment]
    return conn, seen, threads


def test_the_tool_greets_a_version_1_agent_again_and_sends_it_version_1_frames(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    conn, seen, threads = _tool(monkeypatch, _agent_v1)
    with caplog.at_level(logging.INFO, logger="migsgx.migrate"):
        welcome = conn.greet("src", ["process", "post-copy"])
    assert "refused protocol version 2 (protocol version 2 is not 1)" in caplog.text
    assert "greeting it again with version 1" in caplog.text
    assert welcome["host_id"] == "old" and conn.version == 1
    assert [m["version"] for m in seen] == [VERSION, 1]  # refused, then greeted again
    assert len(threads) == 2  # on a fresh connection
    ready = conn.call(_full("begin"), "ready")  # today's begin, memory_bytes and all
    assert ready["data_port"] == 1
    assert seen[-1]["t"] == "begin" and "memory_bytes" not in seen[-1]
    conn.close()
    for thread in threads:
        thread.join(5)


def test_the_tool_stops_at_an_agent_too_new_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    conn, seen, threads = _tool(monkeypatch, _agent_refusing)
    with pytest.raises(ProtocolVersionError) as caught:
        conn.greet("src")
    text = str(caught.value)
    assert "the agent at 10.0.0.2:7070 refused this tool's control protocol" in text
    assert f"up to {VERSION}, this agent versions 3 to 4" in text
    assert isinstance(caught.value, MigrationError)  # exit 6: nothing moved
    assert len(threads) == 1 and [m["version"] for m in seen] == [VERSION]  # no retry
    conn.close()
