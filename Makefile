# atoll: `make demo` and `make test` work on a fresh machine (root, no GPU, package registries only).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ATOLL := $(VENV)/bin/atoll
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean-runs help

help:
	@echo "make demo   - install into .venv, train the demo model, export it, sample it with transformers"
	@echo "make test   - install into .venv if needed, run the whole test suite"
	@echo "make bench  - throughput benchmark (bench/results/throughput.{json,md})"

# torch first and pinned: pip then takes the CPU wheel instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(ATOLL) train examples/configs/demo.yaml --nproc 2
	$(ATOLL) export runs/demo runs/demo/hf --sample "ROMEO. "
	@echo "run directory: runs/demo (checkpoints/, tensorboard/, metrics.jsonl, hf/)"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/throughput.py

clean-runs:
	rm -rf runs
