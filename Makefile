# meshproxy: one Makefile for the developer, the demo user and CI.
# Every tool a target needs is installed by the target itself (into .venv or a
# cache outside the repo, $(CACHE)), never by hand.

# The interpreter .venv is built from: the distribution's python3 (>= 3.11), as in the
# images, else python3 from the PATH (scripts/python.sh says why). PYTHON=... overrides.
PYTHON ?= $(shell ./scripts/python.sh)
VENV   := .venv
BIN    := $(VENV)/bin
CACHE  ?= $(HOME)/.cache/meshproxy
export MESHPROXY_CACHE := $(CACHE)
PYTEST_ARGS ?=
COMPILE ?= 1  # the data path compiled with mypyc (see compile:); 0 keeps it interpreted

.PHONY: FORCE bench bench-telemetry all install demo test test-unit test-integration lint proto system-deps clean help k8s-bins jaeger bench-deps

help:
	@echo "make demo         install and run the local demo mesh (no cluster needed; root for network namespaces)"
	@echo "make test         lint + unit + integration tests (what CI runs)"
	@echo "make lint         ruff, mypy --strict, import-linter"
	@echo "make bench        sidecar vs nginx vs direct, fixed-rate load in network namespaces"
	@echo "make bench-peers  sidecar vs HAProxy, nginx, Traefik, direct: latency, saturation, CPU, RSS, TCP, gRPC"

install: $(VENV)/.installed proto $(if $(filter 1,$(COMPILE)),compile,uncompile)

# The data path compiled to C with mypyc (the modules meshproxy/compiled.py lists), as the
# images ship it; COMPILE=0 keeps everything interpreted. Rebuilt when a listed source
# changes; tests/conftest.py refuses to run on compiled modules older than their sources.
COMPILED_SRC := $(shell grep -o '"meshproxy\.[a-z0-9_.]*"' meshproxy/compiled.py | tr -d '"' | sed 's|\.|/|g; s|$$|.py|')
.PHONY: compile uncompile
compile: $(VENV)/.compiled
$(VENV)/.compiled: $(VENV)/.installed setup.py meshproxy/compiled.py $(COMPILED_SRC)
	@./scripts/system-deps.sh  # a C compiler and the Python headers
	@$(MAKE) --no-print-directory uncompile
	@echo "compiling the data path with mypyc (about 2 minutes; COMPILE=0 skips)"
	MESHPROXY_MYPYC=1 $(BIN)/python setup.py -q build_ext --inplace -j 2 >$(VENV)/compile.log 2>&1 || \
	  { tail -30 $(VENV)/compile.log; exit 1; }
	@# setuptools copies unchanged per-module stubs with their old times; all are current now.
	find meshproxy -name '*.so' -exec touch {} +
	touch $@
uncompile:
	find meshproxy -name '*.so' -delete
	rm -f *__mypyc*.so $(VENV)/.compiled

# The interpreter .venv was built from; rewritten only when the choice changes, which
# rebuilds .venv from scratch on the new one.
PYTHON_REAL = $$(readlink -f "$$(command -v $(PYTHON))")
$(VENV)/.base: FORCE
	@mkdir -p $(VENV)
	@[ "$$(cat $@ 2>/dev/null)" = "$(PYTHON_REAL)" ] || echo "$(PYTHON_REAL)" > $@

$(VENV)/.installed: pyproject.toml setup.py $(VENV)/.base
	$(PYTHON) -m venv --clear $(VENV)
	echo "$(PYTHON_REAL)" > $(VENV)/.base
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Generated code is produced from protos/ (never committed, never hand-edited).
proto: $(VENV)/.installed
	$(BIN)/python scripts/gen_protos.py

# kube-apiserver + etcd (pinned Go modules), kubectl, helm, Gateway API CRDs, into
# $(CACHE); a no-op once built. K8S_BINS_ARGS=--all adds the node binaries (e2e).
K8S_BINS_ARGS ?=
k8s-bins: $(VENV)/.installed
	./scripts/k8s-bins.sh $(K8S_BINS_ARGS)

system-deps:
	./scripts/system-deps.sh

# What the benchmark-config and plot tests check against (tests/unit/test_bench_peers.py,
# test_bench_report.py): Debian's HAProxy, nginx and iperf3, and matplotlib (the bench extra).
bench-deps: $(VENV)/.installed
	./scripts/system-deps.sh --bench
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q -e '.[bench]'

# The real Jaeger the trace tests export to (tests/integration/test_telemetry_jaeger.py),
# built from its Go module into $(CACHE); a no-op once built, and make e2e reuses it.
jaeger:
	./scripts/build-jaeger.sh >/dev/null

demo: system-deps install
	$(BIN)/meshproxy demo

lint: install
	$(BIN)/ruff check meshproxy controlplane meshctl meshdemo tests
	$(BIN)/ruff format --check meshproxy controlplane meshctl meshdemo tests
	$(BIN)/mypy
	$(BIN)/lint-imports

# The suite runs on the build `make install` made (compiled unless COMPILE=0); with the
# data path compiled, the unit tests run a second time on its sources (tests/conftest.py).
BUILD := $(if $(filter 1,$(COMPILE)),compiled,interpreted)
INTERPRETED_UNIT = $(if $(filter 1,$(COMPILE)),MESHPROXY_INTERPRETED=1 MESHPROXY_EXPECT_BUILD=interpreted $(BIN)/pytest -q tests/unit $(PYTEST_ARGS))

test-unit: install
	MESHPROXY_EXPECT_BUILD=$(BUILD) $(BIN)/pytest -q tests/unit $(PYTEST_ARGS)
	$(INTERPRETED_UNIT)

test-integration: install system-deps bench-deps k8s-bins jaeger
	MESHPROXY_EXPECT_BUILD=$(BUILD) $(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

test: lint install system-deps bench-deps k8s-bins jaeger
	MESHPROXY_EXPECT_BUILD=$(BUILD) $(BIN)/pytest -q tests $(PYTEST_ARGS)
	$(INTERPRETED_UNIT)

# The README's kind journey on a single-node Kubernetes made of processes (root;
# docs/e2e.md). Brings the cluster up, runs tests/e2e, always tears it down.
.PHONY: e2e
e2e: install
	./scripts/e2e/run.sh $(PYTEST_ARGS)

clean: uncompile
	rm -rf $(VENV) build dist *.egg-info meshapi/discovery/v1/*_pb2*.py meshapi/discovery/v1/*_pb2*.pyi

# Benchmarks: fixed-rate load in network namespaces, scenarios interleaved, ratios in the report.
BENCH_ARGS ?=
bench: install
	./scripts/system-deps.sh --bench
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-telemetry: install
	./scripts/system-deps.sh --bench
	$(BIN)/python -m bench.run --scenarios direct,nginx,meshproxy-notel,meshproxy --ablation $(BENCH_ARGS)

# meshproxy vs HAProxy, nginx, Traefik and direct (docs/benchmarks.md). Full mode ~20 min;
# bench-peers-quick is the CI-sized smoke (~2.5 min). Traefik is built once into $(CACHE).
.PHONY: bench-peers bench-peers-quick
bench-peers: install bench-deps
	$(BIN)/python -m bench.compare $(BENCH_ARGS)

bench-peers-quick: install
	./scripts/system-deps.sh --bench
	$(BIN)/python -m bench.compare --quick $(BENCH_ARGS)

# Control plane convergence: real API server, real control plane, simulated proxies
# (docs/benchmarks-controlplane.md). BENCH_CP_ARGS=--quick: the small mesh.
.PHONY: bench-controlplane
BENCH_CP_ARGS ?=
bench-controlplane: install k8s-bins
	$(BIN)/python -m bench.controlplane $(BENCH_CP_ARGS)

# Gateway API CRDs (HTTPRoute: a prerequisite of the Helm chart) into the cluster of the
# current kubeconfig, from the pinned release k8s-bins puts in $(CACHE).
.PHONY: gateway-api-crds images
gateway-api-crds: k8s-bins
	$(CACHE)/tools/bin/kubectl apply --server-side -f "$$(./scripts/k8s-bins.sh --print | sed -n 's/^GATEWAY_API_CRDS=//p')"

# The meshproxy image with buildah (root, no Docker, no registry): localhost/meshproxy:<version>
# plus an OCI archive in $(CACHE)/images (docs/install.md).
images:
	./scripts/system-deps.sh --k8s
	./scripts/build-images.sh

# The kind walkthrough of the README (needs kind + Docker on your machine; scripts/kind.sh).
.PHONY: kind-up demo-traffic traces kind-down
kind-up:
	./scripts/kind.sh up
demo-traffic:
	./scripts/kind.sh traffic
traces:
	./scripts/kind.sh traces
kind-down:
	./scripts/kind.sh down
