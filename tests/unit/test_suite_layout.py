"""The suite's own layout: what would stop ``make test`` before any test runs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_modules_share_a_name() -> None:
    """pytest imports test modules by their base name (no packages here): two files
    of one name in different directories fail the whole run's collection."""

    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []
