# atoll: `make demo` and `make test` work on a fresh machine (root, no GPU, package registries only).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ATOLL := $(VENV)/bin/atoll
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-wan clean-runs help debian-deps

help:
	@echo "make demo   - install into .venv, train the demo model on two sites over a shaped WAN link, export it, sample it"
	@echo "make test   - install into .venv if needed, run the whole test suite"
	@echo "make bench  - throughput benchmark (bench/results/throughput.{json,md})"
	@echo "make bench-wan - multi-site strategies and codecs over a scaled-down WAN (bench/results/wan.*)"

# Debian tools the WAN lab needs (ip, tc); installed when missing and we are root. Without them
# (or without root) the lab falls back to emulating the links in the transport.
debian-deps:
	@if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; \
	  else echo "note: iproute2 missing and not root: the lab will emulate links in the transport"; fi; \
	fi

# torch first and pinned: pip then takes the CPU wheel instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml | debian-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(ATOLL) lab run --topology examples/topologies/lab-two-sites.yaml examples/configs/demo.yaml
	$(ATOLL) export runs/demo/sites/east runs/demo/hf --sample "ROMEO. "
	@echo "run directory: runs/demo (sites/*/checkpoints, tensorboard/, metrics.jsonl; hf/ = the exported model)"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/throughput.py

bench-wan: $(STAMP)
	$(PY) bench/wan.py

clean-runs:
	rm -rf runs
