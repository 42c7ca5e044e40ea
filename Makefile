# mmpretrain — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v espeak-ng >/dev/null || (command -v apt-get >/dev/null && { apt-get update -qq >/dev/null 2>&1 || true; apt-get install -y -qq espeak-ng >/dev/null 2>&1 || sudo -n apt-get install -y -qq espeak-ng >/dev/null 2>&1 || true; }) || true
	@command -v espeak-ng >/dev/null || echo "note: espeak-ng is not installed (needed only for 'mmpretrain data spoken-digits'); install it with: apt-get install espeak-ng"
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install mmpretrain (editable) with test extras

demo: install ## train the default experiment on the bundled digits, export, and re-evaluate the export
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/mmpretrain train hydra.run.dir=$(DEMO_DIR)
	$(VENV)/bin/mmpretrain eval ckpt=$(DEMO_DIR)/export hydra.run.dir=$(DEMO_DIR)/eval

test: install ## the default test suite (fast unit + integration tests)
	$(VENV)/bin/pytest -q tests

test-slow: install ## long end-to-end tests (marked slow)
	$(VENV)/bin/pytest -q -m slow tests

bench: install ## benchmarks: tiled vs plain InfoNCE memory, throughput of the speed options
	OMP_NUM_THREADS=2 $(PY) scripts/bench_loss_memory.py
	OMP_NUM_THREADS=2 $(PY) scripts/bench_speed_options.py

lint: install ## ruff
	$(VENV)/bin/ruff check mmpretrain tests scripts

format: install ## ruff format
	$(VENV)/bin/ruff format mmpretrain tests scripts

clean: ## remove runs and caches (keeps .venv)
	rm -rf runs outputs multirun .pytest_cache

.PHONY: help install demo test test-slow bench lint format clean
