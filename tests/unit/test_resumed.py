"""The destination's ``resumed`` markers: the commit point of a tree without enclaves."""

from __future__ import annotations

import os
import time
from pathlib import Path

from migsgx.agent.resumed import KEEP, mark_resumed, was_resumed


def test_a_marker_says_resumed_for_its_session_only(tmp_path: Path) -> None:
    ours, other = os.urandom(16), os.urandom(16)
    assert not was_resumed(tmp_path, ours)
    mark_resumed(tmp_path, ours)
    assert was_resumed(tmp_path, ours)
    assert not was_resumed(tmp_path, other)
    path = tmp_path / "resumed" / ours.hex()
    assert path.stat().st_mode & 0o077 == 0  # private, like every record of the agent
    mark_resumed(tmp_path, ours)  # idempotent
    assert was_resumed(tmp_path, ours)


def test_a_link_planted_in_its_place_is_no_marker(tmp_path: Path) -> None:
    sid = os.urandom(16)
    (tmp_path / "resumed").mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("resumed\n")
    (tmp_path / "resumed" / sid.hex()).symlink_to(target)
    assert not was_resumed(tmp_path, sid)


def test_old_markers_go_when_the_next_is_written(tmp_path: Path) -> None:
    old, new = os.urandom(16), os.urandom(16)
    mark_resumed(tmp_path, old)
    stale = time.time() - KEEP - 60
    os.utime(tmp_path / "resumed" / old.hex(), (stale, stale))
    mark_resumed(tmp_path, new)
    assert not was_resumed(tmp_path, old)
    assert was_resumed(tmp_path, new)
