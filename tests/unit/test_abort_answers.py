"""What a driver reads from a source enclave's answer to ``__mig_abort``.

Only a return is an abort.  The trusted half's known refusals keep their names
(``committed``, ``group-decided``, ``group-unchecked``); any other error (an
enclave that failed inside its abort, a runtime of another version) is no abort
either: it reads as still frozen, so that neither the guardian nor ``recover``
gives the source back beside an enclave that gave no ABORT.
"""

from __future__ import annotations

import pytest

from migsgx.agent.enclave_ask import Answer
from migsgx.agent.handback import _abort_of


def test_a_return_is_an_abort_and_carries_its_frame() -> None:
    assert _abort_of(Answer({"t": "ret", "id": 1, "value": b"F"}, "answered")) == ("aborted", b"F")
    assert _abort_of(Answer({"t": "ret", "id": 1, "value": None}, "answered")) == ("aborted", b"")


@pytest.mark.parametrize("code", ["committed", "group-decided", "group-unchecked"])
def test_the_known_refusals_keep_their_names(code: str) -> None:
    answer = Answer({"t": "err", "id": 1, "code": code, "message": "m"}, "answered")
    assert _abort_of(answer) == (code, b"")


@pytest.mark.parametrize(
    "code", ["migration", "protocol", "internal", "enclave-lost", "decision-unknown", None, 7]
)
def test_any_other_refusal_is_no_abort(code: object) -> None:
    answer = Answer({"t": "err", "id": 1, "code": code, "message": "m"}, "answered")
    assert _abort_of(answer) == ("group-unchecked", b"")


def test_no_answer_is_none() -> None:
    assert _abort_of(Answer(None, "hung")) == (None, b"")
    assert _abort_of(Answer(None, "dead")) == (None, b"")
