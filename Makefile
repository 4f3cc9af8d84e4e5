# Prewarm developer commands. `make test` and `make demo` work on a fresh machine: they
# install the Python dependencies into .venv and build the control-plane binaries
# (cached under ~/.cache/prewarm, override with PREWARM_CACHE_DIR) when missing.
SHELL := bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLUSTER_DIR ?= .cache/cluster

.PHONY: help deps binaries test test-unit test-cluster bench demo cluster cluster-down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@echo "==> installing Python dependencies into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

deps: $(VENV)/.installed ## install Python dependencies into .venv

binaries: ## build kube-apiserver, etcd, kwok, helm, ... from Go modules (cached)
	hack/build-binaries.sh

test: deps binaries ## install what is needed and run every test (CI runs exactly this)
	$(PY) -m pytest -ra tests

test-unit: deps ## fast tests of pure logic, no cluster
	$(PY) -m pytest -ra tests/unit

test-cluster: deps binaries ## tests against the real control plane
	$(PY) -m pytest -ra tests/cluster

bench: deps binaries ## benchmarks: figures and ratios against baselines run alongside
	$(PY) -m bench

demo: deps binaries ## the whole loop on a local control plane (DEMO_EXIT=1: exit after printing)
	$(PY) -m hack.demo

cluster: deps binaries ## start a local control plane in the background; prints export KUBECONFIG=...
	$(PY) -m hack.controlplane up --dir $(CLUSTER_DIR)

cluster-down: deps ## stop the control plane started by `make cluster`
	$(PY) -m hack.controlplane down --dir $(CLUSTER_DIR)

clean: ## remove .venv and local state (not the binary cache)
	rm -rf $(VENV) .cache .pytest_cache
