"""When the guardian takes an enclave that did not answer its abort for dead.

Only when the enclave's end of the connection is closed (an enclave closes it
only as its process ends), never while it is open (a slow enclave may still
commit), and only where the store file, read, records no COMMIT.
"""

from __future__ import annotations

import socket
from pathlib import Path

from migsgx.agent.lost_enclaves import hung_up, no_commit


def test_a_closed_end_is_gone_an_open_one_is_not() -> None:
    ours, enclave = socket.socketpair()
    with ours:
        assert not hung_up(ours)  # alive, silent
        enclave.sendall(b"x")
        assert not hung_up(ours)  # something to read: not an end of file
        assert ours.recv(1) == b"x"
        enclave.close()
        assert hung_up(ours)
        assert ours.getblocking()  # (left as it was)


def test_no_commit_needs_readable_records(tmp_path: Path) -> None:
    assert not no_commit([])  # nothing read proves nothing
    assert not no_commit([str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_text("{")
    assert not no_commit([str(tmp_path / "bad.json")])
