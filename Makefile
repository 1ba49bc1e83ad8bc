# Two commands do everything: `make run` and `make test`. Each builds .venv from the lock files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The dashboard tests drive Debian's chromium (Playwright's own browser download is not used);
# the load-balancer test runs Debian's haproxy in front of two routers.
CHROMIUM := /usr/bin/chromium
HAPROXY := /usr/sbin/haproxy
STRACE := /usr/bin/strace
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: run test lint typecheck unit mutation lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt | $(CHROMIUM) $(HAPROXY) $(STRACE)  ## tools, the browser, the load balancer and the tracer the tests drive
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime  ## the router on the embedded default: SQLite here, 4 simulated GPUs; PORT=… HOST=… CONFIG=…
	$(BIN)/gpurouter serve $(if $(CONFIG),--config $(CONFIG)) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

test: lint typecheck unit  ## everything CI runs

$(CHROMIUM):  ## the headless browser of tests/system/test_dashboard.py, from the distribution
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

$(HAPROXY):  ## the load balancer of tests/system/test_haproxy.py, from the distribution
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq haproxy

$(STRACE):  ## the tracer of scripts/aof_window.py (Redis's fsyncs), from the distribution
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq strace

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: $(VENV)/.dev
	$(BIN)/mypy

unit: $(VENV)/.dev  ## two workers; the system tests (processes, kills, timing) run one after another on one of them
	$(BIN)/pytest -q -n 2 --dist loadgroup

MUTATION_SAMPLE ?= 300
MUTATION_SEED ?= 20261206

mutation: $(VENV)/.dev  ## mutmut on core/: a seeded sample of MUTATION_SAMPLE mutants (or `all`); not in `test`
	nice -n 10 $(BIN)/python scripts/mutation.py --sample $(MUTATION_SAMPLE) --seed $(MUTATION_SEED) --max-children 2

lock:  ## re-pin requirements*.txt from pyproject.toml
	$(BIN)/pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links -o requirements.txt pyproject.toml
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links --extra dev -o requirements-dev.txt pyproject.toml

clean:
	rm -rf $(VENV) mutants .mypy_cache .ruff_cache .pytest_cache .hypothesis
