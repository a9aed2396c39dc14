"""The README's first command: the demo migrates a live application and keeps its state.

By default the app runs in a runc container that owns its address: the client's one
TCP connection stays open across the move and no request fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

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
    # --live moved the container's memory by post-copy: after the commit, no page frozen.
    assert stats["post_copy_window"] > 0 and stats["details"]["page_bytes"] == 0
    assert "post-copy window" in out
