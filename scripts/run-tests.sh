#!/usr/bin/env bash
# The whole suite: lint, types, then every test (and the 40 slowest, for the
# suite's time budget). pytest exits 5 when it collected nothing; that is a
# failure here, never a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
"$VENV/bin/ruff" check src tests examples benchmarks
"$VENV/bin/ruff" format --check src tests examples benchmarks
"$VENV/bin/mypy"
# What an interrupted earlier run left (its hosts, container labs, daemons), if its
# owner is gone; a live run's and everything else stay.
if [ "$(id -u)" -eq 0 ]; then
    "$VENV/bin/python" -m migsgx.lab.sweep
fi
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=40 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "run-tests: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
