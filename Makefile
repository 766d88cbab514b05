# Jalur: the two set-up commands are `make demo` and `make test`.
# Each bootstraps .venv on a fresh machine (python3 -m venv + pip install -e '.[test,load]').

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all demo test lint format venv clean fuzz

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,load]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/jalur demo

.PHONY: observe install-prometheus

# The demo plus a real Prometheus (config/prometheus.yml) on 127.0.0.1:9090; Ctrl-C stops both.
observe: $(STAMP) install-prometheus
	scripts/observe.sh

# promtool and prometheus (Debian package), for `make observe` and tests/test_observe.py.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
install-prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus; }

lint: $(STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# The long property test: 100,000 generated request targets through a running proxy, none of
# which may reach the social back end as a transaction path (make test runs 2,000).
fuzz: $(STAMP)
	JALUR_FUZZ_EXAMPLES=100000 $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_pathconfusion.py -k generated --hypothesis-show-statistics

format: $(STAMP)
	$(BIN)/ruff format proxy tests
	$(BIN)/ruff check --fix proxy tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
