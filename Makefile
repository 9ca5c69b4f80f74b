# jobmesh: `make run` starts the whole mesh on this machine; `make test` runs every test tier.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SITE = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PROTOS := $(shell find protos -name '*.proto')
DEPS := build/proto-deps

.PHONY: all venv proto lint typecheck test test-unit test-integration test-e2e run clean bench envoy-config

all: proto

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	@# Put the repo (libs/, services/) and generated code on the venv's path, and add the CLI.
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$(SITE)/jobmesh-dev.pth"
	printf '#!/usr/bin/env bash\nexec "%s/python" -m libs.cli "$$@"\n' "$(CURDIR)/$(BIN)" > $(BIN)/jobmesh
	chmod +x $(BIN)/jobmesh
	touch $@

venv: $(VENV)/.installed

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

proto: venv gen/.stamp

lint: proto
	$(BIN)/buf lint
	$(BIN)/ruff check libs services tests bench
	$(BIN)/ruff format --check libs services tests bench

typecheck: proto
	$(BIN)/mypy libs services

test-unit: proto
	$(BIN)/python -m pytest tests/unit -q

test-integration: proto
	$(BIN)/python -m pytest tests/integration -q

test-e2e: proto
	$(BIN)/python -m pytest tests/e2e -q

test: lint typecheck
	$(BIN)/python -m pytest tests -q

run: proto
	$(BIN)/jobmesh run

envoy-config: proto
	$(BIN)/python -c 'from libs.envoy_config import render_dev_defaults as r; print(r(), end="")' > envoy/envoy.json

bench: proto
	$(BIN)/python bench/submit_latency.py

clean:
	rm -rf .jobmesh build gen
