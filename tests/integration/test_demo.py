"""The README's first command: the demo migrates a live application and keeps its state.

By default the app runs in a runc container that owns its address: the client's one
TCP connection stays open across the move and no request fails; its memory, smaller
than ``--post-copy-min``, moves while frozen.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from migsgx.agent.postcopy_choice import POST_COPY_MIN
from migsgx.lab.demo import run_demo

pytestmark = pytest.mark.integration


def test_demo_migrates_the_kvstore_app(tmp_path: Path, require_root: None) -> None:
    console = Console(file=(tmp_path / "out.txt").open("w"), width=120)
    result = run_demo(tmp_path / "work", console=console)
    assert result["state_kept"] is True
    assert result["canary_found"] == 0
    assert result["copies"] == {"src": 0, "dst": 1}
    stats = result["stats"]
    assert stats["downtime"] > 0 and stats["bytes"] > 0
    # The app owns its address (a runc container): one TCP connection, kept, no failure.
    assert stats["details"]["tcp_established"] is True
    assert result["client"]["failed"] == 0 and result["client"]["ok"] > 0
    assert result["client"]["connections"] == 1
    out = (tmp_path / "out.txt").read_text()
    assert "canary found" in out
    # --live chose how the container's memory moves by its size: the kvstore holds less
    # than --post-copy-min, where post-copy's own costs outweigh it, so it moved frozen.
    memory = stats["details"]["memory"]
    assert memory["path"] == "frozen" and memory["post_copy_min"] == POST_COPY_MIN
    assert 0 < memory["private_bytes"] < POST_COPY_MIN
    assert "post_copy_window" not in stats
    assert "below --post-copy-min 64 MiB" in out
    # Every step of the downtime is in the table (the decision and the resume too).
    assert "commit (the enclaves decide)" in out and "resume (dst runs" in out
