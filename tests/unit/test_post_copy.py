"""Post-copy pieces that need no root: the pipe-size check, the served port, the errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from migsgx.cli import EXIT_MIGRATION, EXIT_SOURCE_LOST, _exit_code
from migsgx.containers.postcopy import check_pipe_max_size, served_port
from migsgx.errors import (
    CriuError,
    PostCopyError,
    PostCopyUnavailableError,
    SourceLostError,
    error_from_wire,
)


def test_pipe_max_size_too_low_is_named(tmp_path: Path) -> None:
    fake = tmp_path / "pipe-max-size"
    fake.write_text("1048576\n")
    with pytest.raises(PostCopyUnavailableError) as caught:
        check_pipe_max_size(fake)
    assert "fs.pipe-max-size is 1048576" in str(caught.value)
    assert "sysctl -w fs.pipe-max-size=4194304" in str(caught.value)
    fake.write_text("4194304\n")
    assert check_pipe_max_size(fake) == 4194304


def test_unreadable_pipe_max_size_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PostCopyUnavailableError):
        check_pipe_max_size(tmp_path / "missing")


def test_served_port_is_read_from_the_dump_log(tmp_path: Path) -> None:
    (tmp_path / "dump.log").write_bytes(
        b"(00.2) Starting page server on port 0\n(00.2) Using 40123 port\n"
    )
    assert served_port(tmp_path, timeout=1, alive=lambda: True) == 40123


def test_served_port_of_a_dump_that_ended_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "dump.log").write_bytes(b"(00.1) Error (criu/cr-dump.c:1): Dumping FAILED.\n")
    with pytest.raises(CriuError) as caught:
        served_port(tmp_path, timeout=30, alive=lambda: False)
    assert "did not start serving pages" in str(caught.value)


def test_source_lost_has_its_own_exit_status_and_code() -> None:
    lost = SourceLostError("gone")
    assert _exit_code(lost) == EXIT_SOURCE_LOST == 9
    assert _exit_code(PostCopyUnavailableError("small pipes")) == EXIT_MIGRATION
    for cls in (PostCopyError, PostCopyUnavailableError, SourceLostError):
        assert type(error_from_wire(cls.code, "x")) is cls


# --- the lazy dump in a migration (agent/lazy.py) ----------------------------------------------
def test_lazy_dump_returns_once_post_dump_returned(tmp_path: Path) -> None:
    """The dump goes on (serving pages) after ``post-dump``; the caller goes on too."""

    import threading

    from migsgx.agent.lazy import LazyDump

    served = threading.Event()
    seen: list[str] = []

    def dump(on_dumped: Callable[[], None]) -> None:
        on_dumped()
        served.wait(10)  # CRIU serving pages until the destination has them all

    lazy = LazyDump(dump, lambda: seen.append("post-dump"), tmp_path)
    lazy.wait_dumped()
    assert seen == ["post-dump"] and lazy.thread.is_alive()
    assert not lazy.finish(0.01)
    served.set()
    assert lazy.finish(10) and lazy.error is None


def test_lazy_dump_raises_what_ended_it_before_post_dump_returned(tmp_path: Path) -> None:
    from migsgx.agent.lazy import LazyDump

    def veto() -> None:
        raise PostCopyError("the enclaves did not load")

    def dump(on_dumped: Callable[[], None]) -> None:
        try:
            on_dumped()
        except PostCopyError as exc:  # CRIU resumes the tree and fails the dump
            raise CriuError("post-dump callback failed") from exc

    lazy = LazyDump(dump, veto, tmp_path)
    with pytest.raises(CriuError):
        lazy.wait_dumped()
    lazy.stop()  # nothing to end: returns at once


def test_the_post_copy_messages_are_in_the_schema() -> None:
    from migsgx.agent.protocol import CONTROL
    from migsgx.errors import FrameError

    CONTROL.validate({"t": "restore", "lazy_port": 4002})
    CONTROL.validate({"t": "restore"})
    CONTROL.validate({"t": "window", "seconds": 1.5})
    with pytest.raises(FrameError):
        CONTROL.validate({"t": "restore", "lazy_port": "4002"})
