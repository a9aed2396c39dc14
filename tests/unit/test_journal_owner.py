"""A migration journal counts only if the tool's user wrote it: planted ones do nothing.

A journal makes ``recover`` kill its ``fenced`` pids, take descriptors from its
``holders``, remove its ``dump_dir`` and carry decisions to its ``to``.  These
tests plant what a state directory others may write could hold, and what a
crash or a vanishing file leaves, and check that nothing trips or is obeyed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from migsgx.agent.journal import Journal, journal_dir
from migsgx.agent.recover import recover
from migsgx.errors import RecordDamagedError


def _start(agent: Path) -> Journal:
    journal = Journal.start(agent, os.urandom(16), ("10.0.0.2", 7070), 1, "-")
    journal.update(phase="done", tool_pid=2**22 + 1)
    return journal


def test_a_dangling_link_among_the_journals_ends_nothing(tmp_path: Path) -> None:
    """(``Journal.all`` sorted by a ``stat`` that followed the link: FileNotFoundError.)"""

    agent = tmp_path / "agent"
    journal = _start(agent)
    dangling = journal_dir(agent) / "gone.json"
    dangling.symlink_to(tmp_path / "nowhere.json")
    assert [j.path for j in Journal.all(agent)] == [journal.path]
    assert [p for p, _ in Journal.damaged(agent)] == [dangling]
    # (reported in doubt, as every journal that does not load is)
    assert sorted(r.outcome for r in recover(tmp_path)) == ["done", "in-doubt"]


def test_a_link_to_a_journal_elsewhere_is_refused(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    elsewhere = _start(tmp_path / "other")
    link = journal_dir(agent) / elsewhere.path.name
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere.path)
    with pytest.raises(RecordDamagedError, match="symbolic link"):
        Journal.load(link)
    assert Journal.all(agent) == []
    assert Journal.load(elsewhere.path).phase == "done"  # (the file itself is sound)


def test_a_journal_others_may_write_is_refused(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    journal = _start(agent)
    for mode in (0o666, 0o620):
        journal.path.chmod(mode)
        with pytest.raises(RecordDamagedError, match="not a journal this user wrote"):
            Journal.load(journal.path)
        assert Journal.all(agent) == []
    journal.path.chmod(0o644)  # (readable by others: nothing in it is secret)
    assert [j.path for j in Journal.all(agent)] == [journal.path]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_journal_of_another_user_is_refused(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    journal = _start(agent)
    os.chown(journal.path, 65534, 65534)
    with pytest.raises(RecordDamagedError, match="uid 65534"):
        Journal.load(journal.path)
    assert Journal.all(agent) == [] and [p for p, _ in Journal.damaged(agent)] == [journal.path]


@pytest.mark.timeout(60)  # (a hang guard: the read of a FIFO without a writer never ended)
def test_a_fifo_named_like_a_journal_neither_blocks_nor_loads(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    journal = _start(agent)
    fifo = journal_dir(agent) / "fifo.json"
    os.mkfifo(fifo, 0o600)
    assert [j.path for j in Journal.all(agent)] == [journal.path]
    assert [p for p, _ in Journal.damaged(agent)] == [fifo]
