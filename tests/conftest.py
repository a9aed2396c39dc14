"""Suite-wide hooks.

In CI (``CI=true``) an integration test that is skipped is reported as a
failure: a machine without root or without a working CRIU must not pass the
suite silently. Elsewhere such tests skip with their reason.

Every module, unit or integration, ends without a zombie child of the test
process (:mod:`zombies`): what a test starts and kills, it also waits for.

Every process the run starts carries its run tag (``MIGSGX_LAB_RUN``,
:func:`migsgx.lab.sweep.tag_run`): should the run be killed, the next one's
sweep removes what it left, wherever it runs.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest
from zombies import no_zombie_children

from migsgx.lab.sweep import tag_run

__all__ = ["no_zombie_children"]  # autouse: every module ends without a zombie child

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_configure(config: pytest.Config) -> None:
    tag_run()  # before any test starts a process


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _is_integration(path: Path) -> bool:
    return Path(path).resolve().is_relative_to(INTEGRATION_DIR.resolve())


def _skip_reason(longrepr: object) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


_CI_SKIP = "integration test skipped under CI=true, which counts as a failure: "


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and in_ci()
        and _is_integration(item.path)
    ):
        report.outcome = "failed"
        report.longrepr = _CI_SKIP + _skip_reason(report.longrepr)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """The same for a whole module skipped while it is collected."""

    report = yield
    if report.skipped and in_ci() and _is_integration(collector.path):
        report.outcome = "failed"
        report.longrepr = _CI_SKIP + _skip_reason(report.longrepr)
    return report
