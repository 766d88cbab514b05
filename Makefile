# Jalur: the two set-up commands are `make demo` and `make test`.
# Each bootstraps .venv on a fresh machine (python3 -m venv + pip install -e '.[test,load]').

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all demo test lint format venv clean fuzz generate

# Rewrite the generated files (config/k8s/prometheus-rule.yaml, docs/configuration.md) from
# their sources; make test fails while they differ (tests/test_generated.py).
generate: $(STAMP)
	$(BIN)/python scripts/generate.py

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,load]'
	touch $(STAMP)

venv: $(STAMP)

# ARGS go to `jalur demo`, e.g. make demo ARGS="--port-base 18080" (every port moves together).
demo: $(STAMP)
	$(BIN)/jalur demo $(ARGS)

.PHONY: demo-trail audit-bench

# `jalur demo` plus a scripted migration (a ramp, a rollback, blocked paths), stopped by PID;
# then `jalur audit verify` and `jalur report` on its trail, into demo-trail/ (about two
# minutes; docs/audit.md).
demo-trail: $(STAMP)
	$(BIN)/python scripts/demo_trail.py --dir demo-trail

# What chaining costs per audited record (on and off) and how fast `jalur audit verify` reads
# a million records (about a minute; loadtests/RESULTS.md).
audit-bench: $(STAMP)
	$(BIN)/python loadtests/audit_bench.py

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
	$(BIN)/ruff check proxy tests loadtests
	$(BIN)/ruff format --check proxy tests loadtests
	$(BIN)/mypy

test: lint test-tools
	$(BIN)/pytest -q

# The real components the tests run (Debian packages), installed once when missing:
# promtool + prometheus (metrics tests), redis-server (idempotency store), nginx + wrk
# (benchmark smoke), php-cli + default-jdk-headless + nodejs + npm + golang (the back ends
# of tests/test_differential.py; it installs the npm `cookie` package into its own cache).
# Nothing is started as a system service; tests start their own.
.PHONY: test-tools
test-tools:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	{ command -v nginx >/dev/null || test -x /usr/sbin/nginx; } || missing="$$missing nginx"; \
	command -v php >/dev/null || missing="$$missing php-cli"; \
	command -v javac >/dev/null || missing="$$missing default-jdk-headless"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v go >/dev/null || missing="$$missing golang"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi

# The long property tests: 100,000 generated request targets through a running proxy, none of
# which may reach the social back end as a transaction path (make test runs 2,000); and the
# differential suite with 2,000 generated spellings per family and stack (make test: 40)
# against the PHP, Java, Node and Go back ends. JALUR_DIFF_SEED picks another sample.
fuzz: $(STAMP) test-tools
	JALUR_FUZZ_EXAMPLES=100000 $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_pathconfusion.py::test_no_generated_path_reaches_social_as_a_transaction \
		tests/test_fuzz_components.py --hypothesis-show-statistics
	JALUR_DIFF_EXAMPLES=2000 $(BIN)/pytest -q -p no:cacheprovider tests/test_differential.py

.PHONY: loadtest loadtest-distributed bench bench-tls install-bench-tools

# Locust shoppers against `jalur demo` (started and stopped by loadtests/run.py) for
# LOADTEST_TIME; CSV + HTML reports in loadtests/reports/; fails on any failed request.
# LOADTEST_SHAPE: migration (ramp the demo's split forward only, live share -> halfway -> 100 %),
# rollback (the on-call drill: 95 %, an audited rollback to 80 %, then 100 %),
# step (add users in steps) or none (LOADTEST_USERS at LOADTEST_RATE per second).
# ARGS: more options, after these (so they win): loadtests/run.py's own (--users 200,
# --shape none, --proxy-workers 1) and any Locust option, passed on unchanged
# (--tags payment, --exclude-tags retry): make loadtest ARGS="--time 5m --tags transaction".
# docs/load-testing.md shows the web UI and a distributed run by hand.
LOADTEST_TIME  ?= 60s
LOADTEST_USERS ?= 50
LOADTEST_RATE  ?= 10
LOADTEST_SHAPE ?= migration
# As deployed: `jalur run --workers 2` sharing a redis-server (1: `jalur demo` in one process).
LOADTEST_PROXY_WORKERS ?= 2
LOADTEST_ARGS   = --time $(LOADTEST_TIME) --users $(LOADTEST_USERS) \
                  --spawn-rate $(LOADTEST_RATE) --shape $(LOADTEST_SHAPE) \
                  --proxy-workers $(LOADTEST_PROXY_WORKERS) $(ARGS)

loadtest: $(STAMP) test-tools
	$(BIN)/python loadtests/run.py $(LOADTEST_ARGS)

# The same with a Locust master and two workers on loopback.
loadtest-distributed: $(STAMP) test-tools
	$(BIN)/python loadtests/run.py --distributed --workers 2 $(LOADTEST_ARGS)

# Soak: the same shoppers against `jalur run` for SOAK_TIME (10m) with faults injected: 1 % of
# upstream requests reset, one back-end process restarted every minute, and every 30 s a wave
# of 150 dripping payment uploads and 150 unfinished 60 KiB request heads (loadtests/soak.py).
# Prints and writes loadtests/reports/soak.txt; fails on a failure beyond the injected faults,
# a payment executed twice or served by social, or RSS / open fds growing 10 % or more.
.PHONY: soak
SOAK_TIME ?= 10m

soak: $(STAMP) test-tools
	$(BIN)/python loadtests/soak.py --time $(SOAK_TIME)

# Jalur (1 and 2 workers), two feature-less floors (loadtests/floor.py), NGINX and direct with
# wrk, rounds interleaved; then 1 vs 2 workers unpinned, and memory (1000 idle connections,
# 1 GiB streamed up and down: loadtests/bench_memory.py); writes loadtests/RESULTS.md (~14 min).
# BENCH_BEFORE=<git rev>: also `jalur-before`, the proxy/ package of that revision (git archive
# into a temp dir, run by this venv's Python with PYTHONPATH; bench.py checks where `proxy`
# imports from), interleaved with jalur-1 and reported side by side (same ~14 min).
# BENCH_QUICK=1: 3 s per cell, 50 connections only (~4 min, for development).
# ARGS: more bench.py options (--help), after these.
BENCH_BEFORE ?=
BENCH_QUICK  ?=
BENCH_ARGS    = $(if $(BENCH_BEFORE),--before $(BENCH_BEFORE)) \
                $(if $(filter 1 yes true,$(BENCH_QUICK)),--quick) $(ARGS)

bench: $(STAMP) install-bench-tools
	$(BIN)/python loadtests/bench.py $(BENCH_ARGS)

# Where jalur-1's CPU goes per request: py-spy samples it (500 Hz) while wrk drives 50
# connections of small requests for PROFILE_SECONDS; writes the collapsed stacks and a summary
# (the aiohttp listener's share, Jalur's own time by module and top functions) to
# loadtests/reports/profile-*.{txt,md} and prints the summary (~20 s). ARGS: more options
# (e.g. --sizes small,64k --conns 50,200; --cprofile: cProfile instead, exact calls per
# request, stats in loadtests/reports/cprofile-*.prof).
PROFILE_SECONDS ?= 8
.PHONY: profile
profile: $(STAMP) install-bench-tools
	@test -x $(BIN)/py-spy || $(BIN)/pip install --quiet 'py-spy>=0.4'
	$(BIN)/python loadtests/bench.py --profile --conns 50 --sizes small \
		--duration $(PROFILE_SECONDS) --rate 500 $(ARGS)

# TLS to the upstream: Jalur against NGINX's proxy_ssl (session reuse on), plain baseline in
# the same run (loadtests/bench_tls.py, ~4 min); prints a Markdown table.
bench-tls: $(STAMP) install-bench-tools
	$(BIN)/python loadtests/bench_tls.py

# What each traffic-policy feature (route timeout, local and fleet rate limits, trace context,
# OTLP spans) costs per request, off and on (loadtests/bench_policy.py, ~3 min; then the
# hooks alone in-process). Prints Markdown tables (docs/traffic-policy.md, RESULTS.md).
.PHONY: bench-policy
bench-policy: $(STAMP) install-bench-tools
	$(BIN)/python loadtests/bench_policy.py
	$(BIN)/python loadtests/bench_policy.py --micro 50000

# nginx and wrk (Debian packages) for `make bench` and tests/test_loadtests.py. The package's
# own nginx service is never used: bench.py runs nginx with its own -c config and -p prefix.
install-bench-tools:
	@{ command -v nginx >/dev/null || test -x /usr/sbin/nginx; } && command -v wrk >/dev/null || \
		{ $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx wrk; }

# The idempotency gate's cost per keyed payment: gate off, memory store, Redis, side by side
# (loadtests/gate_bench.py; writes its section of loadtests/RESULTS.md, ~1 min).
.PHONY: gate-bench
gate-bench: $(STAMP) install-bench-tools test-tools
	$(BIN)/python loadtests/gate_bench.py

format: $(STAMP)
	$(BIN)/ruff format proxy tests
	$(BIN)/ruff check --fix proxy tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
