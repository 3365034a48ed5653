# `make demo`: set everything up in .venv and run the offline demo fine-tune.
# `make test`: set up (if needed) and run the test suite.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first. The default is the CPU wheel these docs are tested with;
# on a GPU machine use e.g. `make demo TORCH=torch` (CUDA build from PyPI).
TORCH ?= torch==2.13.0
# The exact versions the whole suite passed with (tools/lock.py; docs/development.md#dependencies).
LOCK := requirements/lock.txt
LOCK_PYTHON := 3.11
BIN := $(VENV)/bin
LATEST := .venv-latest

.PHONY: demo test test-fast lint setup lock test-latest

setup: $(VENV)/.installed

# torch first (a plain `torch` requirement would pull a CUDA build), then tunefleet with the lock as
# constraints. The lock was resolved for Python $(LOCK_PYTHON); another Python gets the newest
# versions pyproject.toml allows, and is told so.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	@if $(BIN)/python -c 'import sys; sys.exit(f"{sys.version_info[0]}.{sys.version_info[1]}" != "$(LOCK_PYTHON)")'; then \
		echo "$(BIN)/pip install -q -c $(LOCK) -e .[dev]"; \
		$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"; \
	else \
		echo "note: $(LOCK) was tested on Python $(LOCK_PYTHON), this is $$($(BIN)/python -V 2>&1):" \
			"installing the newest versions pyproject.toml allows (untested; make test-latest shows what moved)"; \
		$(BIN)/pip install -q -e ".[dev]"; \
	fi
	touch $@

demo: setup
	$(BIN)/tunefleet train recipes/demo.yaml --overwrite

# The whole suite; it ends with its 20 slowest tests, so a change sees what it costs.
test: setup
	$(BIN)/python -m pytest -q --durations=20

# The 2-minute subset: no multi-process training, no SLURM cluster.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not slurm"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy launch distributed slurm

# Resolve pyproject.toml's ranges anew into the lock (network to PyPI; uv).
lock: setup
	$(BIN)/python tools/lock.py compile

# Drift on purpose: the newest versions the ranges allow, in a venv of their own; what moved
# against the lock, then the fast suite on them.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q "$(TORCH)"
	$(LATEST)/bin/pip install -q --upgrade -e ".[dev]"
	$(LATEST)/bin/python tools/lock.py diff
	$(LATEST)/bin/python -m pytest -q -m "not slow and not slurm" -p no:cacheprovider
