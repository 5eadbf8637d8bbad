# agent-fleet — the commands of the README.
#   make demo   a whole fleet on this machine: emulated AWS, fake Semaphore, real supervisors
#   make test   everything CI runs
#   make bench  the benchmarks (release build), printed as `BENCH <name> <value> <unit>`

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: all venv build build-release demo test lint unit e2e bench clean

all: build

$(VENV_STAMP): tests/bed/requirements.txt
	@echo "==> creating the test bed's Python venv ($(VENV)) with moto"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/bed/requirements.txt
	touch $@

venv: $(VENV_STAMP)

build:
	$(CARGO) build --workspace --bins

build-release:
	$(CARGO) build --release --workspace --bins

demo: venv build
	$(TARGET_DIR)/debug/fleet-demo

lint: venv
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/cfn-lint cfn/agent-fleet.yaml

unit:
	$(CARGO) test --workspace --lib --bins

# End-to-end tests start moto, fake IMDS/hub/agent and real supervisors on 127.0.0.1.
e2e: venv build
	$(CARGO) test -p agent-fleet-tests --tests

test: lint venv build
	$(CARGO) test --workspace

bench: venv build-release
	$(TARGET_DIR)/release/fleet-bench

clean:
	$(CARGO) clean
	rm -rf $(VENV)
