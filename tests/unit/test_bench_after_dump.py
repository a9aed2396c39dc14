"""``bench process``'s ``after_dump_seconds``: the end of CRIU's dump to the destination running."""

from __future__ import annotations

from migsgx.lab.bench.migrate_figures import _after_dump


def test_from_the_dump_s_end_to_the_resume_s_end() -> None:
    spans = {"tool": {"criu_dump": [1.0, 3.5], "restore": [3.5, 4.0], "resume": [4.2, 4.75]}}
    assert _after_dump({"origin": 0.0, "spans": spans}) == 1.25


def test_none_without_both_phases() -> None:
    assert _after_dump(None) == 0.0
    assert _after_dump({"origin": 0.0, "spans": {"tool": {"criu_dump": [1.0, 2.0]}}}) == 0.0
