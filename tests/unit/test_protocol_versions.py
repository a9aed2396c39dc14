"""Control protocol versions: the negotiation table, and what each version's frames hold.

The previous release's schema is frozen in ``tests/compat/control-v1.json``; a
session of version 1 must send nothing that schema refuses, and every field
added since must be listed in ``versions.SINCE`` (or version 1 peers break).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from migsgx.agent.protocol import CONTROL
from migsgx.agent.versions import (
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
from migsgx.wire import Schema

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

    assert set(V1.messages) == set(CONTROL.messages)
    for t, fields in CONTROL.messages.items():
        added = {k for k, since in SINCE.get(t, {}).items() if since > 1}
        assert set(fields) - added == set(V1.messages[t]), t
        for key in set(fields) - added:
            assert set(_kinds(fields[key])) == set(_kinds(V1.messages[t][key])), (t, key)
        for key in added:  # an added field is optional: its absence means what it did
            assert type(None) in _kinds(fields[key]), (t, key)


@pytest.mark.parametrize("t", sorted(CONTROL.messages))
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


def test_a_field_newer_than_the_session_is_refused_on_receipt() -> None:
    begin = _full("begin")
    check_version(begin, 2)
    with pytest.raises(ProtocolError, match="memory_bytes is not in control protocol version 1"):
        check_version(begin, 1)
    images_ok = {"t": "images_ok", "page_bytes": 0, "seconds": 0.1, "images_fs": "tmpfs"}
    with pytest.raises(ProtocolError, match="images_fs"):
        check_version(images_ok, 1)
    check_version({"t": "hello", "version": 9, "host_id": "h"}, 1)  # (old fields: always)
