# kuberpc: `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_DIR := e2e/arith/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
PYTEST_ARGS ?=

LOCK := requirements/dev.lock
# Kubernetes' own binaries for the cluster tests, built from the k8s.io/kubernetes Go module pinned in
# e2e/cluster/gobuild into a cache outside the repo (~/.cache/kuberpc/k8s/<version>-<hash>/bin).
K8S_BUILD := e2e/cluster/build-k8s.sh

.PHONY: setup tools k8s demo test test-cluster bench bench-discovery bench-proxy-churn lint typecheck proto lock clean

setup: $(STAMP) $(NODE_STAMP)

# Installs exactly what the lock pins, each file checked against its hash: a fresh machine gets what CI
# passed with. The project itself goes in last, editable, without touching the pinned set.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

# Regenerates the lock from pyproject.toml (runtime, dev and bench extras) with the newest allowed versions.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra bench --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet -o $(LOCK)

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

k8s:
	@bash $(K8S_BUILD) >/dev/null

# Lint first (CI enforces it), then the whole suite, the real-cluster tests included.
test: setup tools lint k8s
	$(PY) -m pytest $(PYTEST_ARGS)

# The real-cluster tests alone (tests/cluster/): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and the pod runner, all on this machine.
test-cluster: setup tools k8s
	$(PY) -m pytest tests/cluster $(PYTEST_ARGS)

bench: setup tools
	$(PY) -m bench

# The control plane's discovery at scale on a real API server (needs root, like test-cluster): 1,000 then 5,000
# Services, 200 subscribers; writes bench/results/discovery-latest.json. Heavy: run alone.
bench-discovery: setup tools k8s
	flock /tmp/kuberpc-heavy.lock $(PY) -m bench.discovery

# One proxy's CPU and memory while 20 EndpointSlices/s change elsewhere: control-plane discovery vs direct mode,
# on the real API server; writes bench/results/proxy-churn-latest.json. Heavy: run alone.
bench-proxy-churn: setup tools k8s
	flock /tmp/kuberpc-heavy.lock $(PY) -m bench.proxy_churn

lint: setup
	$(VENV)/bin/ruff check sidecar webhook tests e2e bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

typecheck: lint

# The control-plane API's generated modules are committed (images carry no protoc); a test checks
# they match proto/*.proto, so run this after changing one.
proto: setup
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/identity.proto proto/discovery.proto

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .pytest_cache .mypy_cache .ruff_cache
