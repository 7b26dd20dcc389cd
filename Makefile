# kuberpc: `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_DIR := e2e/arith/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
PYTEST_ARGS ?=

.PHONY: setup tools demo test bench lint typecheck proto clean

setup: $(STAMP) $(NODE_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

# The Node.js example client (language-agnostic in fact); skipped with a message where npm is missing.
$(NODE_STAMP): $(NODE_DIR)/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found: the Node.js client tests will be skipped"; fi

# System tools the tests and benchmarks drive (h2load, nginx, promtool, ip): installed when we are root.
tools:
	@bash .ci/install-tools.sh

demo: setup
	$(PY) -m e2e.demo

test: setup tools
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup tools
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check sidecar webhook tests e2e bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

typecheck: lint

# The control-plane API's generated modules are committed (images carry no protoc); a test checks
# they match proto/identity.proto, so run this after changing it.
proto: setup
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/identity.proto

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .pytest_cache .mypy_cache .ruff_cache
