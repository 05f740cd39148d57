# buildcell — the two set-up commands on a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help setup system-deps test-deps demo test test-rootless lint typecheck unit bench stress clean

help:
	@echo "make demo   build and run a C program in a cell, then watch a hostile build be contained"
	@echo "make test   lint, type-check and run the whole test suite"
	@echo "make bench  measure against raw bubblewrap, podman, cp -a, bare builds (writes bench/results.md)"
	@echo "make stress the fault and load suite, bounded, loopback only (writes stress/results.md)"

system-deps:
	@scripts/system-deps.sh

# What the test suite uses besides (busybox-static, git, curl, diffoscope, ...): installed as
# root, else named in one apt-get line (the tests that need them then skip, saying why).
test-deps:
	@scripts/system-deps.sh --test

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "buildcell needs Python >= 3.11 (found $$($(PYTHON) --version 2>&1)); set PYTHON=/path/to/python3.11"; exit 1; }
	@echo "setup: installing buildcell and its Python dependencies into $(VENV)/ with $(PYTHON)"
	@echo "setup: (pip install -e '.[dev]' from pip's configured index; once, about 15-30 s)"
	@$(PYTHON) -m venv $(VENV) || \
	  { echo "cannot create a virtualenv: install python3-venv (apt-get install python3-venv)"; exit 1; }
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@echo "setup: done: $(BIN)/buildcell (not on PATH; '. $(BIN)/activate' puts it there)"
	@touch $@

setup: system-deps $(VENV)/.installed

demo: setup
	@$(BIN)/python examples/demo.py

lint: setup
	$(BIN)/ruff check src tests bench examples stress
	$(BIN)/ruff format --check src tests bench examples stress

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest tests/unit -q

# Tests mostly wait on sandboxes starting and ending: three workers on two cores halve the
# wall time (PYTEST_WORKERS=0 runs them in one process).
PYTEST_WORKERS ?= 3

test: test-deps lint typecheck
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

# The part of the suite that CI runs again as an unprivileged user (.ci/run), bounded to stay
# a few minutes: every test of rootless mode, and the cell's own quick tests (limits fallback,
# seccomp, mounts), which take other paths without root.
test-rootless: test-deps setup
	$(BIN)/python -m pytest -q -k rootless
	$(BIN)/python -m pytest -q -m "not slow" tests/unit/cell

bench: setup
	@scripts/bench-deps.sh
	$(BIN)/python bench/run.py

stress: setup
	$(BIN)/python stress/run.py
	BUILDCELL_KILL_TRIALS=50 $(BIN)/python -m pytest -q tests/reliability/test_killed_supervisor.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache buildcell-out
