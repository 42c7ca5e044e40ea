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

$(STAMP): pyproject.toml scripts/constraints.txt
	@command -v espeak-ng >/dev/null || (command -v apt-get >/dev/null && { apt-get update -qq >/dev/null 2>&1 || true; apt-get install -y -qq espeak-ng >/dev/null 2>&1 || sudo -n apt-get install -y -qq espeak-ng >/dev/null 2>&1 || true; }) || true
	@command -v espeak-ng >/dev/null || echo "note: espeak-ng is not installed (needed only for 'mmpretrain data spoken-digits'); install it with: apt-get install espeak-ng"
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c scripts/constraints.txt -e '.[test]'
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

BENCH_REF := .bench/ref
BENCH_WORK ?= /tmp/mmpretrain-bench
BENCH_NOTE ?=
BENCH_THREADS ?=
BENCH_OPTS = --work $(BENCH_WORK) $(if $(BENCH_THREADS),--threads $(BENCH_THREADS))

$(BENCH_REF)/.installed: | $(STAMP)
	$(PIP) install -q --target $(BENCH_REF) --no-deps webdataset==0.2.86 pandas python-dateutil six tzdata
	touch $@

bench-ref: install $(BENCH_REF)/.installed ## reference deps of open_clip_train (webdataset 0.2.86) in .bench/ref, not in .venv

bench: install bench-ref ## benchmarks vs open_clip_train (~65 min on 2 cores) -> benchmarks/RESULTS.md
	$(PY) scripts/bench_throughput.py $(BENCH_OPTS)
	$(PY) scripts/bench_overhead.py $(BENCH_OPTS)
	$(PY) scripts/bench_overhead.py --micro $(BENCH_OPTS)
	$(PY) scripts/bench_data.py $(BENCH_OPTS)
	$(PY) scripts/bench_time_to_accuracy.py $(BENCH_OPTS)
	$(PY) scripts/bench_attention_cpu.py
	$(PY) scripts/bench_scenes_tta.py $(BENCH_OPTS)
	$(PY) scripts/bench_resume.py
	$(PY) scripts/bench_store.py --work $(BENCH_WORK)
	$(PY) scripts/bench_report.py $(if $(BENCH_NOTE),--note "$(BENCH_NOTE)")

bench-gpu: install bench-ref ## GPU throughput vs open_clip_train (ViT-B/32 224 px bf16, MFU) -> benchmarks/RESULTS.md
	$(PY) scripts/bench_throughput.py --device cuda $(BENCH_OPTS)
	$(PY) scripts/bench_report.py $(if $(BENCH_NOTE),--note "$(BENCH_NOTE)")

gpu-check: ## on a CUDA machine: every GPU path for 50 steps (bf16+clip, DDP, compile, siglip, tiled, grad cache, image_decode=gpu) + ViT-B-32 samples/s, memory, MFU
	$(if $(wildcard $(PY)),$(PY),python3) scripts/gpu_check.py

bench-scale: install ## tiled vs plain InfoNCE memory (4k..65k batch), the speed options' throughput, validation memory at N=50k (~40 min)
	OMP_NUM_THREADS=2 $(PY) scripts/bench_loss_memory.py
	OMP_NUM_THREADS=2 $(PY) scripts/bench_speed_options.py
	OMP_NUM_THREADS=2 $(PY) scripts/bench_val_memory.py

bench-recipes: install ## patch dropout's step time and memory, distillation on the scenes (~40 min on 2 busy cores)
	$(PY) scripts/bench_patch_dropout.py
	$(PY) scripts/bench_distill_scenes.py

lint: install ## ruff
	$(VENV)/bin/ruff check mmpretrain tests scripts
	$(VENV)/bin/ruff format --check mmpretrain tests scripts

format: install ## ruff format
	$(VENV)/bin/ruff format mmpretrain tests scripts

clean: ## remove runs and caches (keeps .venv)
	rm -rf runs outputs multirun .pytest_cache

.PHONY: help install demo test test-slow bench bench-ref bench-gpu bench-scale bench-recipes gpu-check lint format clean
