"""``--live``'s choice between post-copy and frozen memory (agent/postcopy_choice.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from migsgx import cli
from migsgx.agent import source as source_mod
from migsgx.agent.postcopy_choice import POST_COPY_MIN, choose, private_memory
from migsgx.agent.source import MigrationOutcome

MiB = 1 << 20


def _status(proc: Path, pid: int, rss_anon_kb: int) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "status").write_text(
        f"Name:\tpython3\nVmRSS:\t{rss_anon_kb + 9000} kB\nRssAnon:\t{rss_anon_kb} kB\n"
        "RssFile:\t9000 kB\n"
    )


def test_private_memory_sums_rss_anon_of_the_processes(tmp_path: Path) -> None:
    _status(tmp_path, 10, 4096)
    _status(tmp_path, 11, 1024)
    # (pid 12 ended meanwhile: it counts nothing)
    assert private_memory([10, 11, 12], proc=tmp_path) == 5 * MiB
    assert private_memory([], proc=tmp_path) == 0


def test_private_memory_of_this_process_is_what_it_holds() -> None:
    held = bytearray(32 * MiB)  # touched: resident, anonymous
    assert private_memory([os.getpid()]) >= len(held)
    del held


def _fake_tree(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr("migsgx.agent.postcopy_choice.private_memory", lambda pids: size)


def test_a_small_tree_moves_its_memory_frozen_though_post_copy_was_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_tree(monkeypatch, 14 * MiB)
    path = choose([1], post_copy=True, post_copy_min=POST_COPY_MIN)
    assert not path.post_copy
    assert path.describe() == {"path": "frozen", "private_bytes": 14 * MiB,
                               "post_copy_min": POST_COPY_MIN}  # fmt: skip
    line = path.notice()
    assert "14.0 MiB" in line and "64.0 MiB" in line and "--post-copy-min 0" in line


def test_a_large_tree_or_no_size_rule_keeps_post_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tree(monkeypatch, POST_COPY_MIN)
    assert choose([1], post_copy=True, post_copy_min=POST_COPY_MIN).post_copy
    _fake_tree(monkeypatch, 1 * MiB)
    kept = choose([1], post_copy=True, post_copy_min=0)
    assert kept.post_copy and kept.describe()["path"] == "post-copy"
    # Not asked for: frozen, whatever the size, and no rule was applied.
    assert choose([1], post_copy=False, post_copy_min=POST_COPY_MIN).describe() == {
        "path": "frozen", "private_bytes": 1 * MiB, "post_copy_min": 0,
    }  # fmt: skip


# --- the CLI: --live applies the size rule, an explicit --post-copy does not -------------------
@pytest.mark.parametrize(
    ("args", "post_copy", "size_rule"),
    [
        (["--live"], True, POST_COPY_MIN),
        (["--live", "--post-copy-min", "0"], True, 0),
        (["--live", "--post-copy-min", "16MiB"], True, 16 * MiB),
        (["--live", "--post-copy"], True, 0),
        (["--post-copy"], True, 0),
        (["--live", "--no-post-copy"], False, 0),
        ([], False, 0),
    ],
)
def test_migrate_passes_the_size_rule(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: list[str],
    post_copy: bool,
    size_rule: int,
) -> None:
    seen: list[Any] = []

    def fake_migrate(opts: Any) -> MigrationOutcome:
        seen.append(opts)
        stats = {"total": 1.0, "downtime": 0.5, "bytes": 1}
        return MigrationOutcome(stats, 42, None)

    monkeypatch.setattr(source_mod, "migrate", fake_migrate)
    monkeypatch.setattr("migsgx.agent.tls.AgentIdentity.of_state", lambda *a, **k: None)
    monkeypatch.setattr("migsgx.cli_migrate._post_copy_here", lambda console, driver: True)
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "1234", "--to", "10.250.0.2:7070", "--state", str(tmp_path), *args])
    assert exited.value.code == cli.EXIT_OK
    (opts,) = seen
    assert (opts.post_copy, opts.post_copy_min) == (post_copy, size_rule)
    assert opts.notice is not None
