"""Records written atomically: a file found at the temporary name is never written through."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from migsgx._fs import write_durably, write_private


@pytest.mark.parametrize("private", [True, False])
def test_a_planted_temporary_file_does_not_become_the_record(tmp_path: Path, private: bool) -> None:
    """Someone who may write the directory plants the temporary file (mode 0666, a
    hard link they keep): the record must still be a fresh file of the mode asked
    for, and what they hold must not receive its bytes."""

    path = tmp_path / "held.json"
    own = f".held.json.tmp{os.getpid()}-{threading.get_ident()}"
    tmp = tmp_path / (own if private else "held.json.tmp")
    tmp.write_bytes(b"planted")
    tmp.chmod(0o666)
    kept = tmp_path / "kept"
    os.link(tmp, kept)
    if private:
        write_private(path, b"{}")
    else:
        write_durably(path, b"{}", mode=0o644)
    assert path.read_bytes() == b"{}"
    assert path.stat().st_mode & 0o777 == (0o600 if private else 0o644)
    assert path.stat().st_ino != kept.stat().st_ino
    assert kept.read_bytes() == b"planted"
    assert not tmp.exists()
