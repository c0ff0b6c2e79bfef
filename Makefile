# README's two commands: `make demo` and `make test`. Each creates .venv when needed and installs the
# project (editable) with what it needs; reinstalls only when pyproject.toml changes.
PYTHON ?= python3
DEMO_ARGS ?=
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.seqlab-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=23" "setuptools>=68" wheel
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/seqlab demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/cpu_forward.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
