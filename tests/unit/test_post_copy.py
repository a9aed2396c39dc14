"""Post-copy pieces that need no root: the pipe-size check, the served port, the errors."""

from __future__ import annotations

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
