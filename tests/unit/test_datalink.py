"""The data connection's opening, both ends in memory (``agent/datalink.py``)."""

from __future__ import annotations

import pytest

from migsgx.agent.datalink import (
    CHALLENGE_SIZE,
    HELLO_SIZE,
    PROOF_SIZE,
    DestinationLink,
    SourceLink,
)
from migsgx.errors import DataLinkError

KEY = bytes(range(32))
MID = b"m" * 16


def _rand(seed: int):  # type: ignore[no-untyped-def]
    return lambda n: bytes([seed]) * n


def test_both_ends_agree_and_learn_the_index() -> None:
    dest = DestinationLink(KEY, MID, randbytes=_rand(1))
    src = SourceLink(KEY, MID, 3, randbytes=_rand(2))
    challenge = dest.challenge()
    assert len(challenge) == CHALLENGE_SIZE
    hello = src.hello(challenge)
    assert len(hello) == HELLO_SIZE
    assert dest.receive_hello(hello) == 3
    proof = dest.proof()
    assert len(proof) == PROOF_SIZE
    src.receive_proof(proof)


def test_the_key_never_appears_on_the_wire() -> None:
    dest = DestinationLink(KEY, MID)
    src = SourceLink(KEY, MID, 0)
    wire = dest.challenge() + src.hello(dest.challenge())
    dest.receive_hello(wire[CHALLENGE_SIZE:])
    wire += dest.proof()
    assert KEY not in wire


def test_a_wrong_key_is_refused() -> None:
    dest = DestinationLink(KEY, MID)
    src = SourceLink(bytes(32), MID, 0)
    with pytest.raises(DataLinkError):
        dest.receive_hello(src.hello(dest.challenge()))


def test_another_migration_id_is_refused() -> None:
    dest = DestinationLink(KEY, MID)
    src = SourceLink(KEY, b"n" * 16, 0)
    with pytest.raises(DataLinkError):
        dest.receive_hello(src.hello(dest.challenge()))


def test_a_recorded_hello_does_not_open_another_connection() -> None:
    first = DestinationLink(KEY, MID)
    src = SourceLink(KEY, MID, 0)
    hello = src.hello(first.challenge())
    first.receive_hello(hello)
    second = DestinationLink(KEY, MID)  # fresh nonce
    with pytest.raises(DataLinkError):
        second.receive_hello(hello)


def test_a_changed_index_is_refused() -> None:
    dest = DestinationLink(KEY, MID)
    hello = bytearray(SourceLink(KEY, MID, 0).hello(dest.challenge()))
    hello[9] ^= 1  # the low byte of the index
    with pytest.raises(DataLinkError):
        dest.receive_hello(bytes(hello))


@pytest.mark.parametrize("record", [b"", b"x" * HELLO_SIZE, b"MIGSGXS1" + b"\0" * 10])
def test_garbage_is_refused_without_parsing(record: bytes) -> None:
    with pytest.raises(DataLinkError):
        DestinationLink(KEY, MID).receive_hello(record)


def test_a_destination_without_the_key_cannot_prove_itself() -> None:
    src = SourceLink(KEY, MID, 0)
    impostor = DestinationLink(bytes(32), MID)
    src.hello(impostor.challenge())
    with pytest.raises(DataLinkError):
        src.receive_proof(b"\0" * PROOF_SIZE)


def test_a_proof_before_the_challenge_is_refused() -> None:
    with pytest.raises(DataLinkError):
        SourceLink(KEY, MID, 0).receive_proof(b"\0" * PROOF_SIZE)
