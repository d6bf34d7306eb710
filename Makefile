# atoll: `make demo` and `make test` work on a fresh machine (root, no GPU, package registries only).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ATOLL := $(VENV)/bin/atoll
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench bench-gpu bench-wan bench-chaos bench-data bench-finetune finetune-demo peer-env clean-runs help debian-deps report-shot

help:
	@echo "make demo   - install into .venv, train the demo model on two sites over a shaped WAN link, export it, sample it"
	@echo "make test   - install into .venv if needed, lint (ruff), run the whole test suite"
	@echo "make format - format the tree and apply ruff's safe fixes"
	@echo "make bench  - throughput benchmark (bench/results/throughput.{json,md})"
	@echo "make finetune-demo - general -> networking (LoRA) -> netlink (LoRA), evaluation table, then serve"
	@echo "make bench-wan - multi-site strategies and codecs over a scaled-down WAN, 2 seeds, torchft peers (bench/results/wan.*)"
	@echo "make bench-gpu - one CUDA GPU: the training step's tokens/s and MFU, the planner's error (bench/results/gpu.*)"
	@echo "make bench-chaos - kill -9 sites, cut a link, a wrong-secret joiner, in the netns lab (bench/results/chaos.*)"
	@echo "make bench-data - data pipeline end to end, files to tokens, like for like with HF datatrove (bench/results/data.*)"
	@echo "make report-shot - the README's report screenshot (docs/report.png) from a real two-site run"

# Debian tools the WAN lab needs (ip, tc); installed when missing and we are root. Without them
# (or without root) the lab falls back to emulating the links in the transport.
# Debian's chromium: the run report's browser test (tests/e2e/test_report_browser.py) and
# `atoll report --screenshot` drive it headless over the DevTools pipe; without it they skip.
debian-deps:
	@if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; \
	  else echo "note: iproute2 missing and not root: the lab will emulate links in the transport"; fi; \
	fi
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "note: chromium could not be installed: the report's browser test will be skipped"; \
	  else echo "note: chromium missing and not root: the report's browser test will be skipped"; fi; \
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

test: lint
	$(PY) -m pytest -q

# ruff (pinned in the test extras, configured in pyproject.toml): lint and format check.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) bench/throughput.py

# About 90 minutes on 2 quiet cores (the calibration prints its prediction); --resume continues an
# interrupted grid; `$(PY) bench/wan.py --quick` is a few-minute smoke run written to /tmp.
bench-wan: $(STAMP)
	$(PY) bench/wan.py

# Needs a CUDA device (a few minutes per configuration, compilation included); `$(PY) bench/gpu.py
# --smoke` runs the same code on CPU with a tiny model, written to /tmp.
bench-gpu: $(STAMP)
	$(PY) bench/gpu.py

# About 15 minutes on 2 cores; --resume continues an interrupted grid. Needs root for the netns lab
# (else it emulates the links and cannot cut one).
bench-chaos: $(STAMP)
	$(PY) bench/chaos.py

# The data benchmark's peer, HF datatrove, in its own environment: it pins packages atoll does not
# use, and its Gopher filters need spaCy.
PEER_VENV := .venv-peer
$(PEER_VENV)/.installed:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q 'datatrove[processing,io]==0.10.1' spacy==3.8.18 orjson==3.13.0 tokenizers==0.23.3
	touch $@

peer-env: $(PEER_VENV)/.installed

bench-data: $(STAMP) peer-env
	@test -d /usr/share/doc/python3.11/html/_sources || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc >/dev/null; } || echo "note: python3.11-doc missing: the corpus is Shakespeare only"
	$(PY) bench/data.py --corpora 4x --workers 1 2 --peer datatrove

clean-runs:
	rm -rf runs

finetune-demo: $(STAMP)
	@test -d /usr/share/doc/linux-doc-6.1/Documentation/networking || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-doc-6.1 >/dev/null; } || { echo "finetune-demo needs Debian's linux-doc-6.1 (apt-get install -y linux-doc-6.1)"; exit 1; }
	rm -rf runs/chain
	$(ATOLL) train examples/finetune/general.yaml
	$(ATOLL) finetune examples/finetune/networking.yaml
	$(ATOLL) finetune examples/finetune/netlink.yaml
	$(ATOLL) lineage runs/chain/netlink
	$(ATOLL) eval runs/chain/general runs/chain/networking runs/chain/netlink --data general=runs/data/demo --data networking=runs/chain/networking --data netlink=runs/chain/netlink --max-tokens 30000 --json runs/chain/eval.json --plot runs/chain/eval.png
	$(ATOLL) serve runs/chain/netlink --port 8000

bench-finetune: $(STAMP)
	$(PY) bench/finetune.py

# The README's screenshot of a run report (docs/report.png): a real two-site run over the emulated
# WAN (delayed DiLoCo, int8), its report, and the top of the page taken by headless Chromium.
report-shot: $(STAMP)
	rm -rf runs/readme
	$(ATOLL) train examples/configs/tiny.yaml --topology examples/topologies/lab-two-sites.yaml --wan emulated \
	  --run.dir=runs/readme --run.name=delayed --sync.strategy=delayed --sync.inner_steps=10 --sync.codec=int8 \
	  --train.steps=80 --train.log_every=1 --train.eval_every=20 --train.checkpoint_every=40 --no-progress
	$(ATOLL) report runs/readme/delayed --topology examples/topologies/lab-two-sites.yaml \
	  --screenshot docs/report.png --screenshot-height 1460
