# kubetune developer interface. Target names are a public contract (README, CI, docs): extend, don't rename.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup test unit lint cluster-up cluster-down demo bench gpu-check clean

## setup: install everything on a fresh machine (Debian packages, pinned Kubernetes binaries, .venv). Idempotent.
setup:
	@bash hack/setup.sh

## test: the whole suite: lint, unit, trainer and cluster tests against the real local control plane.
test: setup
	@bash hack/test.sh $(PYTEST_ARGS)

## unit: fast pure tests only (no cluster, no training runs).
unit: setup
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

## lint: ruff (lint + format check) and mypy.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## cluster-up: start etcd, kube-apiserver, controller-manager, scheduler and kwok nodes on 127.0.0.1.
cluster-up: setup
	@bash hack/cluster.sh up

## cluster-down: stop every process cluster-up started (by PID) and remove its data.
cluster-down:
	@bash hack/cluster.sh down

## demo: the product end to end (DEMO_ARGS=--keep leaves the cluster up, --verify compares weights).
demo: setup
	@bash hack/demo.sh $(DEMO_ARGS)

## bench: run the benchmarks; JSON lands in bench/results/, a table is printed.
bench: setup
	$(PY) -m bench $(BENCH)

## gpu-check: the one-call GPU check (throughput, checkpoint stall, bf16/fp16 resume, compile, NCCL); a tiny smoke on CPU.
# No `setup` prerequisite: a GPU box may be offline; it only needs $(VENV) (or VENV=... / PY=...).
gpu-check:
	$(PY) -m bench gpu_check

clean: cluster-down
	rm -rf .cluster runs wandb
