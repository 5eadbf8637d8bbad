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
# Tools built from crates.io that no package list has (cfn-guard). CI keeps them outside the
# clone so they are built once per machine.
TOOLS_DIR ?= .tools
CFN_GUARD_VERSION := 3.2.1
CFN_GUARD := $(TOOLS_DIR)/bin/cfn-guard
AGENT_FLEET := $(TARGET_DIR)/debug/agent-fleet
# The real Semaphore agent for the real-agent tier of the tests, built offline from
# ../shared/real-agent when that folder is beside the clone (tests/src/fleet.rs: real_agent).
REAL_AGENT_SRC := ../shared/real-agent
REAL_AGENT := $(TARGET_DIR)/semaphore-agent

.PHONY: all venv tools real-agent build build-release demo test lint unit e2e bench clean deploy diff destroy status token ami ami-test drills redteam

all: build

$(VENV_STAMP): tests/bed/requirements.txt
	@echo "==> creating the test bed's Python venv ($(VENV)) with moto"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/bed/requirements.txt
	touch $@

venv: $(VENV_STAMP)

$(CFN_GUARD):
	@echo "==> building cfn-guard $(CFN_GUARD_VERSION) into $(TOOLS_DIR) (once; about 9 minutes on 2 cores)"
	$(CARGO) install --quiet --locked --root $(TOOLS_DIR) cfn-guard --version $(CFN_GUARD_VERSION)

tools: $(CFN_GUARD)

# Idempotent (build.sh does nothing when the binary is built from the same inputs).
real-agent:
	@if [ -f $(REAL_AGENT_SRC)/build.sh ]; then \
	  bash $(REAL_AGENT_SRC)/build.sh $(REAL_AGENT); \
	else \
	  echo "==> no $(REAL_AGENT_SRC): the real-agent tests will skip (AGENT_FLEET_REAL_AGENT=PATH runs them with a built agent)"; \
	fi

build:
	$(CARGO) build --workspace --bins

build-release:
	$(CARGO) build --release --workspace --bins

# `make demo DEMO_ARGS='--agent real'` runs it with the real Semaphore agent.
demo: venv build
	$(TARGET_DIR)/debug/fleet-demo $(DEMO_ARGS)

lint: venv tools
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/cfn-lint cfn/agent-fleet.yaml
	$(CFN_GUARD) validate --rules cfn/rules/agent-fleet.guard --data cfn/agent-fleet.yaml
	$(CFN_GUARD) test --rules-file cfn/rules/agent-fleet.guard --test-data cfn/rules/agent-fleet.tests.yaml

unit:
	$(CARGO) test --workspace --lib --bins

# End-to-end tests start moto, fake IMDS/hub/agent and real supervisors on 127.0.0.1.
e2e: venv build real-agent
	$(CARGO) test -p agent-fleet-tests --tests

test: lint venv build real-agent ami-test
	$(CARGO) test --workspace

# The hostile-jobs suite (README, "Hostile jobs"): every attack of the table, at each level.
# `make test` runs all of it too.
redteam: venv tools build real-agent
	$(CARGO) test -p agent-fleet-tests --test redteam --test secrets --test job_credentials
	$(CARGO) test -p agent-fleet-tests --test agents -- a_job_that_kills_its_agent a_process_a_job_moves_out
	$(CARGO) test -p agent-fleet-tests --test stack -- jobs_get_a_job_role agents_lead_only_when_asked
	$(CARGO) test -p agent-supervisor --lib -- shutdown_hook:: firewall:: agent::containers:: agent::netns:: scaler::tests::the_cap lifecycle:: isolation:: jobcreds::
	$(CFN_GUARD) test --rules-file cfn/rules/agent-fleet.guard --test-data cfn/rules/agent-fleet.tests.yaml
	VENV=$(VENV) TOOLS_DIR=$(TOOLS_DIR) bootstrap/test.sh

# Failure drills with the Semaphore outage at 150 s (make test runs them at 20 s); prints DRILL figures.
drills: venv build
	DRILL_SEMAPHORE_OUTAGE_SECS=150 $(CARGO) test -p agent-fleet-tests --test drills --test secrets -- --nocapture

# The AMI side without AWS: template, scripts, unit, offline provisioning steps (bootstrap/README.md).
ami-test: venv build
	VENV=$(VENV) TOOLS_DIR=$(TOOLS_DIR) bootstrap/test.sh

bench: venv build-release real-agent
	$(TARGET_DIR)/release/fleet-bench

# The operator CLI, with the SEMAPHORE_* variables of your shell (see README, "Deploying").
deploy diff destroy status:
	$(CARGO) build --quiet -p agent-fleet
	$(AGENT_FLEET) $@

# Builds the AMI (Packer 1.10+, AWS credentials) and records it in SSM, e.g.
#   make ami AMI_ARGS='--var agent_sha256_x86_64=…'
ami:
	packer init packer/
	$(CARGO) build --quiet -p agent-fleet
	$(AGENT_FLEET) ami build $(AMI_ARGS)

# Stores or rotates the registration token, read from stdin.
token:
	$(CARGO) build --quiet -p agent-fleet
	$(AGENT_FLEET) token set

clean:
	$(CARGO) clean
	rm -rf $(VENV)
