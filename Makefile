# jobmesh: `make run` starts the whole mesh on this machine; `make test` runs every test tier.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SITE = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PROTOS := $(shell find protos -name '*.proto')
DEPS := build/proto-deps

.PHONY: all venv tools k8s-observability proto client-stubs client-wheel openapi sandbox-tools lint typecheck test test-unit test-integration test-e2e test-browser run clean \
	bench envoy-config console node chromium

all: proto

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt Makefile | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	@# Put the repo (libs/, services/), the client package (clients/python: its `jobmesh` package takes in
	@# gen/jobmesh's internal stubs) and generated code on the venv's path, and add the CLI (devtools/cli.py: the
	@# dev verbs token, run, ...; every other verb goes to the client package's CLI).
	printf '%s\n%s\n%s\n' "$(CURDIR)" "$(CURDIR)/clients/python" "$(CURDIR)/gen" > "$(SITE)/jobmesh-dev.pth"
	printf '#!/usr/bin/env bash\nexec "%s/python" -m devtools.cli "$$@"\n' "$(CURDIR)/$(BIN)" > $(BIN)/jobmesh
	chmod +x $(BIN)/jobmesh
	touch $@

venv: $(VENV)/.installed

# Manifest checkers for the tests (requirements-tools.txt); promtool and amtool come from Debian (.ci/run).
$(VENV)/.tools: requirements-tools.txt | $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-tools.txt
	touch $@

tools: $(VENV)/.tools

# Google's annotation protos come from the installed googleapis-common-protos, not from this repo.
$(DEPS)/.copied: $(VENV)/.installed
	mkdir -p $(DEPS)/google/api $(DEPS)/google/rpc
	cp $(SITE)/google/api/{annotations,http,httpbody}.proto $(DEPS)/google/api/
	cp $(SITE)/google/rpc/{status,error_details}.proto $(DEPS)/google/rpc/
	touch $@

gen/.stamp: $(PROTOS) $(DEPS)/.copied
	rm -rf gen && mkdir -p gen build
	$(BIN)/python -m grpc_tools.protoc -Iprotos -I$(DEPS) -I$(SITE)/grpc_tools/_proto \
	  --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	find gen -type d -exec touch {}/__init__.py \;
	$(BIN)/python -m grpc_tools.protoc -Iprotos -I$(DEPS) -I$(SITE)/grpc_tools/_proto \
	  --include_imports --include_source_info --descriptor_set_out=build/jobmesh.pb \
	  $(PROTOS) $(DEPS)/google/rpc/error_details.proto
	touch $@

# The client package's stubs (with typed .pyi) are checked in, so that `pip install ./clients/python` needs
# nothing else; they are written again when a public proto changes (tests check they match).
CLIENT_STUBS := clients/python/jobmesh/gateway/v1/gateway_pb2.py
$(CLIENT_STUBS): $(PROTOS) $(DEPS)/.copied
	$(BIN)/python -m libs.codegen >/dev/null

client-stubs: venv $(DEPS)/.copied
	$(BIN)/python -m libs.codegen

# The client package's wheel (the e2e tests install it into a fresh venv too).
client-wheel: proto
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w build/dist clients/python

proto: venv gen/.stamp $(CLIENT_STUBS)

# The job sandbox (docs/security.md) confines each worker slot's spawner with bubblewrap, as root; the spawner is
# compiled (a C compiler; without one the slower Python spawner runs). Installed here when missing and we are root on
# a Debian-like system; otherwise we say how, and workers refuse tenant jobs
# (unless their pool says sandbox = "none"). Its seccomp filter is built with libseccomp (Debian's libseccomp2,
# which apt itself depends on; installed here too if missing): the worker refuses tenant jobs without it as well.
sandbox-tools:
	@if ! command -v bwrap >/dev/null 2>&1 || ! command -v $(CC) >/dev/null 2>&1 || \
	    ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap, libseccomp and a C compiler (the spawner) for the job sandbox"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      bubblewrap libseccomp2 gcc libc6-dev >/dev/null) || echo "warning: could not install bubblewrap" >&2; \
	  else \
	    echo "warning: the job sandbox needs bubblewrap and root: run 'sudo apt-get install" \
	      "bubblewrap' (or your system's package) and start the mesh as root; until then workers refuse" \
	      "tenant jobs unless their pool says sandbox = \"none\" (docs/security.md)" >&2; \
	  fi; \
	fi
	@$(MAKE) --no-print-directory build/jobmesh-spawner

# The compiled per-slot spawner (services/worker/spawner.c; spawner.py runs it when built, its Python program
# otherwise). A warning, not a failure, without a C compiler.
SPAWNER_CFLAGS := -O2 -Wall -Wextra -Werror -D_GNU_SOURCE -fstack-protector-strong -D_FORTIFY_SOURCE=2 -fPIE
SPAWNER_LDFLAGS := -pie -Wl,-z,relro,-z,now
build/jobmesh-spawner: services/worker/spawner.c
	@if command -v $(CC) >/dev/null 2>&1; then \
	  mkdir -p build && $(CC) $(SPAWNER_CFLAGS) $(SPAWNER_LDFLAGS) -o $@.tmp $< && mv -f $@.tmp $@; \
	else \
	  echo "warning: no C compiler ($(CC)): workers run the spawner's Python program (slower job starts)" >&2; \
	fi

# The web console (console/): TypeScript built by Vite into console/dist, which the console service serves
# under /console/. Node.js and npm are the machine's, or Debian's when missing (installed as root).
CONSOLE_SRC := $(shell find console/src console/public -type f 2>/dev/null) console/index.html \
	console/vite.config.ts console/tsconfig.json console/package.json

node:
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null); \
	  else echo "Node.js and npm are needed to build the console (Debian: apt-get install nodejs npm)" >&2; exit 1; fi; }

console/node_modules/.package-lock.json: console/package-lock.json | node
	cd console && npm ci --no-audit --no-fund --loglevel=error

console/dist/index.html: console/node_modules/.package-lock.json $(CONSOLE_SRC)
	cd console && npm run --silent build

console: console/dist/index.html

# Debian's Chromium for the browser tests (tests/browser); Playwright drives it, it downloads no browser.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null); \
	  else echo "warning: chromium is missing; the browser tests will be skipped (apt-get install chromium)" >&2; fi; }

# `buf breaking` compares the protos with those of BREAKING_AGAINST (a git ref; main by default): its buf.yaml and
# protos/, with the same Google annotation protos beside them, since those are not committed.
BREAKING_AGAINST ?= main

lint: proto
	$(BIN)/buf lint
	rm -rf build/against && mkdir -p build/against/build
	git archive $(BREAKING_AGAINST) buf.yaml protos | tar -x -C build/against
	cp -r $(DEPS) build/against/build/
	$(BIN)/buf breaking --against build/against
	$(BIN)/ruff check libs services devtools tests bench clients/python
	$(BIN)/ruff format --check libs services devtools tests bench clients/python

typecheck: proto
	$(BIN)/mypy libs services devtools
	cd clients/python && ../../$(BIN)/mypy

test-unit: proto tools
	$(BIN)/python -m pytest tests/unit -q

test-integration: proto sandbox-tools
	$(BIN)/python -m pytest tests/integration -q

test-e2e: proto
	$(BIN)/python -m pytest tests/e2e -q

test-browser: proto console chromium
	$(BIN)/python -m pytest tests/browser -q

test: lint typecheck tools sandbox-tools console chromium client-wheel
	$(BIN)/python -m pytest tests -q --durations=30

# The OpenAPI document of the REST API (docs/openapi.yaml), from the protos' HTTP bindings; tests check it matches.
openapi: proto
	$(BIN)/python -m libs.openapi

run: proto sandbox-tools console
	$(BIN)/jobmesh run

# The observability component's PrometheusRules and dashboard ConfigMaps, from observability/ (a test checks them).
k8s-observability: venv
	$(BIN)/python -m libs.k8s_observability

envoy-config: proto
	$(BIN)/python -c 'from libs.envoy_config import render_dev_defaults as r; print(r(), end="")' > envoy/envoy.json

bench: proto
	$(BIN)/python bench/submit_latency.py

clean:
	rm -rf .jobmesh build gen console/dist
