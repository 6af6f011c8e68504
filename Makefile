# maas-serve: make serve · make test
# Both bootstrap .venv (Python 3.11) and install the project with its test extras.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.maas-installed
CONFIG ?= serve_configs/local.yaml
PYTEST_ARGS ?=

.PHONY: install serve test test-unit clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# A Ray cluster of its own (address "local"), unless RAY_ADDRESS names one to deploy onto.
serve: install
	$(VENV)/bin/serve run --address "$${RAY_ADDRESS:-local}" $(CONFIG)

test: install
	$(VENV)/bin/ruff check --select F,E9 src tests   # undefined names and syntax errors fail fast
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
