# Jalur: the two set-up commands are `make demo` and `make test`.
# Each bootstraps .venv on a fresh machine (python3 -m venv + pip install -e '.[test,load]').

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all demo test lint format venv clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,load]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/jalur demo

lint: $(STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

format: $(STAMP)
	$(BIN)/ruff format proxy tests
	$(BIN)/ruff check --fix proxy tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
