# FitTracker backend: every set-up step is a target, so a fresh machine needs only `make up` / `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
UV_ENV := .cache/uv
UV     := $(UV_ENV)/bin/uv
BUF    := $(VENV)/bin/buf
export PYTHONPATH := $(CURDIR):$(CURDIR)/clients/python/generated
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/.cache/bin:/usr/local/go/bin:$(PATH)

.PHONY: help venv lock lock-check deps gen check-gen lint buf-lint buf-breaking typecheck test test-fast fuzz up observe observe-test loadtest seed-scale stream-scale bench-cdn bench chaos soak image image-test render-dev render-prod clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# uv is the one tool installed outside the lock, by hash, into a virtualenv of its own.
$(UV): tools/uv-requirements.txt
	@echo "==> uv (hash-pinned in tools/uv-requirements.txt)"
	@rm -rf $(UV_ENV) && python3 -m venv $(UV_ENV)
	@$(UV_ENV)/bin/pip install --quiet --require-hashes --no-deps -r tools/uv-requirements.txt
	@touch $@

# `--locked` refuses to run when uv.lock no longer matches pyproject.toml; sync is exact, so a package
# that is not in the lock is removed.
$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	@echo "==> Python environment ($(VENV)), exactly as uv.lock says"
	@$(UV) sync --locked --quiet
	@$(PY) tools/proto_deps.py .cache/proto-deps
	@touch $@

venv: $(VENV)/.installed ## Create the virtual environment with every locked Python package

lock: $(UV) ## Re-resolve uv.lock to the newest releases pyproject.toml admits (on purpose; then make test)
	@$(UV) lock --upgrade

lock-check: venv ## Fail when uv.lock and pyproject.toml disagree or .venv holds anything but the lock
	@echo "==> uv.lock"
	@$(UV) lock --check --quiet
	@$(UV) sync --locked --check --quiet

deps: venv ## Install the servers and tools the tests use (Redis, FerretDB, ghz, h2load, kustomize, istioctl, Prometheus, Alertmanager, Jaeger)
	@bash tools/install_deps.sh

gen: venv ## Regenerate code, descriptors and the edge configs (local and cluster) from proto/
	@$(PY) tools/gen.py
	@$(PY) tools/envoy_config.py
	@$(PY) tools/edge_configmap.py
	@$(PY) tools/dashboards.py

check-gen: venv ## Fail when generated code or the edge config is stale
	@$(PY) tools/gen.py --check
	@$(PY) tools/envoy_config.py --check
	@$(PY) tools/edge_configmap.py --check
	@$(PY) tools/dashboards.py --check

buf-lint: venv
	@echo "==> buf lint"
	@$(BUF) lint

buf-breaking: venv ## Compare the contracts with the previous commit's (wire + JSON compatibility)
	@$(PY) tools/buf_breaking.py

typecheck: venv
	@echo "==> mypy"
	@$(VENV)/bin/mypy

lint: venv buf-lint ## Lint contracts and Python
	@echo "==> ruff"
	@$(VENV)/bin/ruff check services tools tests

test: lock-check deps check-gen lint buf-breaking typecheck ## Run every check and the whole test suite
	@echo "==> pytest"
	@$(PY) -m pytest

test-fast: venv ## Only the tests, skipping the static checks
	@$(PY) -m pytest -x -q

observe-test: venv deps ## The observability tests, with the one that kills a replica and waits for the page (~2 min)
	@echo "==> pytest tests/observability (with the paging test)"
	@$(PY) -m pytest -q -m '' tests/observability

FUZZ_EXAMPLES ?= 200
fuzz: venv deps ## Fuzz every RPC through the edge (JSON) and the replicas (gRPC); FUZZ_EXAMPLES=200 per RPC
	@echo "==> fuzz: $(FUZZ_EXAMPLES) examples per RPC and protocol"
	@FITTRACKER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -v --timeout=0 tests/edge/test_fuzz.py

up: venv ## Run Envoy and all services locally on the embedded store (OBSERVE=1: with Prometheus, Alertmanager, Jaeger)
	@$(if $(filter-out 0,$(OBSERVE)),bash tools/install_deps.sh &&) $(PY) tools/devstack.py $(if $(filter-out 0,$(OBSERVE)),--observe)

observe: ## The stack with Prometheus, Alertmanager and Jaeger (same as make up OBSERVE=1)
	@$(MAKE) --no-print-directory up OBSERVE=1

loadtest: venv deps ## Load test every present service with ghz (edge + direct), verdicts, report; ARGS=...
	@$(PY) tools/loadtest.py $(ARGS)

SCALE_SMALL ?= 10000
SCALE_LARGE ?= 1000000
seed-scale: venv ## Seed users with history in bulk; hot-query p99 at SCALE_SMALL vs SCALE_LARGE users (long)
	@$(PY) tools/seed_scale.py --small $(SCALE_SMALL) --large $(SCALE_LARGE)

STREAMS ?= 2000
EDGE_STREAMS ?= 2000
stream-scale: venv deps ## Open STREAMS Subscribe streams on one replica and EDGE_STREAMS through the edge; memory, delivery p99
	@$(PY) tools/stream_scale.py --streams $(STREAMS) --edge-streams $(EDGE_STREAMS)

bench-cdn: venv deps ## Cached reads through Varnish vs the same reads at the edge (h2load); report in ghz-loadtests/reports
	@$(PY) tools/cdn_bench.py $(ARGS)

CHAOS_MINUTES ?= 3
CHAOS_SEED ?= 1
chaos: venv deps ## Seeded random faults under a user load through the edge; CHAOS_MINUTES=3 CHAOS_SEED=1; JSON+HTML report
	@$(PY) tools/chaos.py --minutes $(CHAOS_MINUTES) --seed $(CHAOS_SEED) $(ARGS)

SOAK_MINUTES ?= 60
soak: venv deps ## Steady load for SOAK_MINUTES (60): samples RSS, FDs, asyncio tasks, Redis and SQLite; flags growth
	@$(PY) tools/soak.py --minutes $(SOAK_MINUTES) $(ARGS)

bench: venv deps ## Measure runtime, edge, peer, worker and cache ratios against the targets; ARGS=--quick
	@$(PY) tools/bench.py $(ARGS)

# The overlay as committed, or with the image tag IMAGE_TAG through a scratch kustomization that
# names the overlay as its base (kustomize has no command-line override that leaves files alone).
RENDER := .cache/render
render-%: deps
	@test -f mesh/overlays/$*/kustomization.yaml || { echo "no overlay mesh/overlays/$*" >&2; exit 1; }
	@[[ -z '$(IMAGE_TAG)' || '$(IMAGE_TAG)' =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$$ ]] || \
		{ echo "IMAGE_TAG must be an image tag (letters, digits, _ . -; at most 128), got '$(IMAGE_TAG)'" >&2; exit 1; }
	@mkdir -p $(RENDER)
	@if [ -n "$(IMAGE_TAG)" ]; then \
		rm -rf $(RENDER)/$*-tagged && mkdir -p $(RENDER)/$*-tagged && \
		printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../../../mesh/overlays/%s]\nimages: [{name: fittracker/backend, newTag: "%s"}]\n' \
			'$*' '$(IMAGE_TAG)' >$(RENDER)/$*-tagged/kustomization.yaml && \
		kustomize build $(RENDER)/$*-tagged >$(RENDER)/$*.yaml; \
	else kustomize build mesh/overlays/$* >$(RENDER)/$*.yaml; fi
	@echo "==> $(RENDER)/$*.yaml: $$(grep -c '^kind:' $(RENDER)/$*.yaml) objects, images $$(grep -o 'image: .*' $(RENDER)/$*.yaml | sort -u | cut -d' ' -f2 | tr '\n' ' ')"

render-dev: ## Render the dev overlay into .cache/render/dev.yaml (IMAGE_TAG=... for another image tag)
render-prod: ## Render the prod overlay into .cache/render/prod.yaml (IMAGE_TAG=... for another image tag)

image: venv ## Build the services' OCI image into .cache/image (root; Debian packages, no container engine)
	@bash tools/image/build.sh

image-test: image ## Build the image, then run the user service from it with podman (read-only, uid 10001) and call it
	@bash tools/image/install_tools.sh podman runc
	@echo "==> pytest tests/image"
	@FITTRACKER_IMAGE_ARCHIVE=$(CURDIR)/.cache/image/backend.oci.tar $(PY) -m pytest -q tests/image

clean: ## Remove the environment, caches and local data
	rm -rf $(VENV) .cache .data .pytest_cache .mypy_cache .ruff_cache
