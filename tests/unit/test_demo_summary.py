"""The demo's closing table tells how the memory moved, and every step of the downtime."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from migsgx.agent.postcopy_choice import POST_COPY_MIN
from migsgx.lab.demo import summary

MiB = 1 << 20


def _stats(memory: dict[str, Any], window: float | None = None) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "downtime": 0.83, "freeze": 0.002, "criu_dump": 0.32, "enclave_dump": 0.32,
        "transfer": 0.13, "restore": 0.28, "enclave_load": 1.7, "total": 3.1, "precopy": 1.5,
        "bytes": 66_000_000,
        "details": {"commit": 0.005, "resume": 0.08, "image_bytes": 2_968_000,
                    "process_downtime": 0.8, "memory": memory},
    }  # fmt: skip
    if window is not None:
        stats["post_copy_window"] = window
    return stats


def _render(stats: dict[str, Any]) -> str:
    out = io.StringIO()
    clients = [("client's longest wait for an answer", "0.850 s"),
               ("client requests ok / failed", "87 / 0"),
               ("client TCP connections (kept open)", "1")]  # fmt: skip
    checks = [("state kept (secret, values, last write)", "True"),
              ("runnable copies src / dst", "0 / 1"), ("canary found", "0")]  # fmt: skip
    Console(file=out, width=80).print(summary("the demo", stats, clients, checks))
    return out.getvalue()


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("│")]


def test_memory_moved_frozen_by_the_size_rule_says_so_and_no_label_wraps() -> None:
    memory = {"path": "frozen", "private_bytes": 15 * MiB, "post_copy_min": POST_COPY_MIN}
    text = _render(_stats(memory))
    assert "process memory (15.0 MiB)" in text and "moved while frozen" in text
    assert "below --post-copy-min 64 MiB" in text
    assert "window" not in text
    # Every step of the downtime, the decision and the resume too.
    for step in ("freeze", "criu_dump", "transfer", "restore", "commit", "resume"):
        assert f"  {step} (" in text
    # One line per row at 80 columns: nothing a new user reads is cut in two.
    assert len(_rows(text)) == 20


def test_post_copy_prints_its_window_and_what_moved_frozen() -> None:
    memory = {"path": "post-copy", "private_bytes": 300 * MiB, "post_copy_min": POST_COPY_MIN}
    text = _render(_stats(memory, window=2.5))
    assert "post-copy, after the commit" in text
    assert "post-copy window (dst needs src)" in text and "2.500 s" in text
    assert "2,968,000 bytes" in text
    assert "--post-copy-min" not in text
    assert len(_rows(text)) == 22


def test_an_engine_without_post_copy_shows_no_size_rule() -> None:
    memory = {"path": "frozen", "private_bytes": 15 * MiB, "post_copy_min": 0}
    text = _render(_stats(memory))
    assert "moved while frozen" in text and "--post-copy-min" not in text
