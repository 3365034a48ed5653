# `make demo`: set everything up in .venv and run the offline demo fine-tune.
# `make test`: set up (if needed) and run the test suite.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first. The default is the CPU wheel these docs are tested with;
# on a GPU machine use e.g. `make demo TORCH=torch` (CUDA build from PyPI).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/tunefleet train recipes/demo.yaml --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy launch distributed slurm
