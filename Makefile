# README's two commands: `make demo` and `make test`. Each creates .venv when needed and installs the project
# (editable) with what it needs, at the exact versions of requirements/dev-lock.txt (a pip constraints file that is
# known to pass the suite); it reinstalls only when pyproject.toml or the lock changes. docs/development.md says
# when to refresh the lock (`make lock`) and what `make test-latest` is for.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.seqlab-installed
LOCK   := requirements/dev-lock.txt
LATEST := .venv-latest
DEMO_ARGS ?=
LADDER_ARGS ?=
# pytest-xdist workers (2: measured on the 2-core VM, docs/development.md) and extra pytest arguments,
# e.g. `make test TEST_WORKERS=0 PYTEST_ARGS="-k ssd"`
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
PYTEST := pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

.PHONY: demo ladder test lint format test-latest lock bench install clean

# --no-build-isolation: seqlab is built with the locked setuptools in .venv, not with whatever setuptools is newest
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c $(LOCK) pip setuptools wheel
	$(BIN)/python -m pip install -c $(LOCK) --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/seqlab demo $(DEMO_ARGS)

# every rung of the seed article on one model (docs/ladder.md): about 18 minutes on 2 cores; LADDER_ARGS="--quick"
# for the tiny form the suite runs
ladder: $(STAMP)
	$(BIN)/seqlab ladder $(LADDER_ARGS)

# pytest's own command (not `python -m pytest`, which puts the working directory on sys.path)
test: $(STAMP)
	$(BIN)/$(PYTEST)

# ruff (lint and format check, settings in pyproject.toml) over the whole tree, then mypy on seqlab/; .ci/run runs it
# before the tests. `make format` rewrites the files in ruff's format and applies its safe fixes.
LINT_PATHS := seqlab kernels domains pipelines tests bench examples
lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

# The newest versions pyproject allows, in a fresh environment of their own, through the whole suite: run it to
# find the next break on purpose (it is not part of `make test`). The versions it used: $(LATEST)/versions.txt.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --upgrade pip setuptools wheel
	$(LATEST)/bin/python -m pip install --no-build-isolation -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/$(PYTEST)

# Refresh the lock: `make test-latest`, and only if the whole suite passed there, its versions become the lock.
lock: test-latest
	{ sed -n '/^# /p' $(LOCK) | grep -v '^# refreshed'; \
	  echo "# refreshed $$(date -u +%F) by make lock: $$($(LATEST)/bin/python -c 'import platform as p; print(p.python_implementation(), p.python_version(), p.system(), p.machine())')"; \
	  cat $(LATEST)/versions.txt; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# The CPU benches at modest sizes, each printing its own machine line and tables (docs/benchmarks.md has the full
# runs and their commands): forward (seqlab native and chunked vs HF), training forward + backward (vs HF),
# seqlab vs llama.cpp on the same GGUF weights (says "skipped" and goes on where llama-cpp-python is not
# installed), decode against context length. Roughly 10 minutes on the idle 2-core VM (an estimate from the
# single benches' run times; several times longer when the machine is busy).
bench: $(STAMP)
	$(BIN)/python bench/cpu_forward.py --lengths 2048 8192 --skip-stream
	$(BIN)/python bench/train_speed.py --lengths 512 2048
	$(BIN)/python bench/llamacpp.py --lengths 2048
	$(BIN)/python bench/generate.py --contexts 1024 8192

clean:
	rm -rf $(VENV) $(LATEST) build dist *.egg-info .pytest_cache .hypothesis
