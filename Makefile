# The two commands the README opens with: `make demo` and `make test`.
# Each one prepares what it needs (system packages, CRIU, the virtual
# environment, the modules' bytecode) through scripts/setup.sh, which is idempotent and quick when
# nothing changed.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-process demo-container demo-podman demo-containerd test setup lint unit integration clean

setup:
	@bash scripts/setup.sh

# The kvstore app in a runc container that owns its address: the client's TCP
# connection stays open across the move.
demo: setup
	@$(VENV)/bin/migsgx demo

# The same app as a plain process (the client reconnects to the other host).
demo-process: setup
	@$(VENV)/bin/migsgx demo --process

# The app inside a runc (or podman) container sharing its host's network namespace.
demo-container: setup
	@$(VENV)/bin/migsgx demo --container runc

demo-podman: setup
	@$(VENV)/bin/migsgx demo --container podman

demo-containerd: setup
	@$(VENV)/bin/migsgx demo --container containerd

test: setup
	@bash scripts/run-tests.sh

unit: setup
	@$(PY) -m pytest tests/unit tests/test_vectors.py -q

integration: setup
	@$(PY) -m pytest tests/integration -q

lint: setup
	@$(VENV)/bin/ruff check src tests examples benchmarks
	@$(VENV)/bin/ruff format --check src tests examples benchmarks
	@$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .local build src/*.egg-info
