"""The suite's zombie check (``tests/zombies.py``) fails a module that leaves one behind.

Each case runs a small test module in a pytest of its own (a subprocess: the
planted zombie must not be a child of this run) with the check loaded as a plugin.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS_DIR = Path(__file__).resolve().parents[1]

_PLANTED = """
import subprocess, time

def test_starts_and_kills_without_waiting():
    child = subprocess.Popen(["sleep", "60"])
    child.kill()
    while open(f"/proc/{child.pid}/stat").read().split(")")[1].split()[0] != "Z":
        time.sleep(0.01)
    test_starts_and_kills_without_waiting.child = child  # a Popen still waiting for it

def test_later_in_the_module():
    pass
"""

_WAITED = """
import subprocess

def test_starts_kills_and_waits():
    child = subprocess.Popen(["sleep", "60"])
    child.kill()
    assert child.wait() == -9
"""

_ORPHAN = """
import os, time

def test_an_orphan_of_ours_that_no_popen_waits_for():
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    while open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z":
        time.sleep(0.01)
"""


def test_only_the_module_with_a_killed_child_never_waited_for_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three modules in one run: the planted zombie fails its own module only; a child
    waited for, and an adopted orphan (reaped at the module's end), pass."""

    pytester.makepyfile(test_planted=_PLANTED, test_waited=_WAITED, test_orphan=_ORPHAN)
    env_path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", env_path)
    result = pytester.runpytest_subprocess("-p", "zombies", "-p", "no:cacheprovider", "-rE")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.re_match_lines(
        [r"ERROR test_planted.py::test_later_in_the_module - Failed: 1 zombie child"]
    )
    result.stdout.re_match_lines(
        [r".*1 zombie child\(ren\) of the test process left by this module .*"
         r"\(sleep, started as \['sleep', '60'\]\)"]
    )  # fmt: skip
