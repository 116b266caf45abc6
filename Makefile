# Every target sets up what it needs; on a fresh machine `make run` and `make test` are enough.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test test-all test-fast bench image image-test readme clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

## The whole job on the built-in tiny model and bundled data, on CPU (OUTPUT_DIR defaults to ./output).
run: $(VENV)/.installed
	$(VENV)/bin/job run

## What CI runs for every commit (~15 minutes on 2 cores): every tier but the nightly one (needs root for Slurm).
test: $(VENV)/.installed
	bash scripts/slurm-deps.sh
	$(PY) -m pytest -q -m "not nightly" $(PYTEST_ARGS)

## Every test, the nightly tier and the image build included (needs root; installs Slurm and buildah).
test-all: $(VENV)/.installed
	bash scripts/slurm-deps.sh
	bash image/deps.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

## The quick tier: no Slurm, no image build, no multi-minute training runs.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not slurm and not image" $(PYTEST_ARGS)

## Throughput benchmark on a GPU (see docs/performance.md).
bench: $(VENV)/.installed
	$(VENV)/bin/job bench

## The GPU image users pull (needs docker or buildah).
image:
	bash image/build-gpu.sh

## The CPU test image, built from the same Dockerfile, and the tiny job run inside it.
image-test: $(VENV)/.installed
	bash image/deps.sh
	$(PY) -m pytest -q -m image tests/image

## Regenerate the README's settings table from job/config.py.
readme: $(VENV)/.installed
	$(PY) scripts/update_readme.py

clean:
	rm -rf output .pytest_cache
