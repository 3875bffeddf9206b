# minibert_lab: `make lab` runs the main job, `make test` runs every test. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
NBDEV_WORKERS ?= 2
export PYTHONHASHSEED := 0

.PHONY: lab test test-slow test-cuda docs export check-sync bench browser install help

help:
	@echo "make lab | test | test-slow | docs | export | bench [BENCH=attention] [BENCH_OUT=runs/bench]"

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch: the local CPU wheel where pip finds one (find-links), else the CPU index on machines without a
# GPU (never CUDA wheels on a CPU machine), else the default index.
$(VENV)/.torch: | $(PY)
	@if $(PIP) install -q --dry-run --no-index --no-deps torch==$(TORCH_VERSION) >/dev/null 2>&1; then \
	  echo "torch $(TORCH_VERSION): local wheel"; $(PIP) install -q torch==$(TORCH_VERSION); \
	elif ! command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "torch $(TORCH_VERSION): CPU index"; \
	  $(PIP) install -q torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple; \
	else $(PIP) install -q torch==$(TORCH_VERSION); fi
	@touch $@

$(STAMP): pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[dev]"
	@touch $@

install: $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/minibert-lab lab   # a fresh runs/lab/YYYYmmdd-HHMMSS folder each time: earlier runs are kept

test: $(STAMP)
	$(VENV)/bin/nbdev-test --n-workers $(NBDEV_WORKERS) --timing
	$(PY) -m pytest tests -q -n $(NBDEV_WORKERS) -m "not slow and not cuda"

test-slow: $(STAMP) browser
	$(VENV)/bin/nbdev-test --n-workers $(NBDEV_WORKERS) --flags slow --timing
	$(PY) -m pytest tests -q -m "slow and not cuda"

test-cuda: $(STAMP)
	$(VENV)/bin/nbdev-test --n-workers 1 --flags "cuda slow"
	$(PY) -m pytest tests -q -m cuda

export: $(STAMP)
	$(VENV)/bin/nbdev-export
	$(VENV)/bin/nbdev-clean

# CI gate: the package and README come from the notebooks, and notebooks are clean.
check-sync: $(STAMP)
	$(VENV)/bin/nbdev-export
	$(PY) tools/build_docs.py readme >/dev/null
	$(VENV)/bin/nbdev-clean
	@git diff --exit-code --stat -- minibert_lab README.md nbs || { echo "generated files or notebooks out of sync: run 'make export' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- minibert_lab nbs README.md)" || { git status --porcelain -- minibert_lab nbs README.md; echo "untracked generated files: run 'make export' and commit"; exit 1; }

# KaTeX: fetched once from the npm registry into ~/.cache/minibert_lab/docs (sha512 pinned in tools/build_docs.py)
# and copied into _docs/site_libs; every page loads only local assets.
docs: $(STAMP)
	$(PY) tools/build_docs.py readme
	$(PY) tools/build_docs.py site

# headless Chromium for the slow site test (Debian package `chromium`)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the site test will be skipped (apt-get install chromium)"

# `make bench [BENCH=attention]` writes to runs/bench/ (git-ignored); `make bench BENCH_OUT=nbs/bench_results`
# replaces the committed result that the docs render (NAME-DEVICE.json for timed tables).
BENCH ?= attention
BENCH_OUT ?= runs/bench
bench: $(STAMP)
	$(VENV)/bin/minibert-lab bench $(BENCH) --out $(BENCH_OUT)
