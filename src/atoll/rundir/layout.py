"""The layout of a run directory: every name in it, spelled once, and its small files.

A run directory (``runs/NAME``), as `atoll train` and `atoll finetune` write it::

    config.yaml              the validated config the run was started with   CONFIG_YAML
    model.json               the model's shape (a ModelConfig)               MODEL_JSON
    tokenizer.json           the tokenizer (a `tokenizers` file)             TOKENIZER_JSON
    tokenizer_config.json    a Hugging Face parent's special-token names     TOKENIZER_CONFIG
    special_tokens_map.json  (both copied by fine-tuning when present)       SPECIAL_TOKENS_MAP
    chat_template.jinja      a fine-tuning stage's chat template             CHAT_TEMPLATE_FILE
    lineage.json             a fine-tuning stage's record (parent, data...)  LINEAGE_JSON
    adapter/                 a LoRA stage's adapter, in PEFT's format        ADAPTER_DIR
    data/                    a fine-tuning stage's tokenized data            DATA_DIR
    checkpoints/step_N/      complete-or-absent DCP checkpoints              CHECKPOINTS_DIR
    sites/NAME/              a multi-site run: one run directory per site    SITES_DIR

A multi-site pre-training run keeps every site in ``sites/NAME``; a multi-site fine-tuning stage
keeps its first site in the run directory itself (so it loads like a single-site stage) and the
others in ``sites/NAME``. A Hugging Face directory holds ``config.json`` (HF_CONFIG_JSON), maybe
``generation_config.json``, the weights and the same tokenizer files.

What is inside ``data/`` is `atoll.finetune.data`'s format; what is inside a checkpoint is
`atoll.train.checkpoint`'s. Nothing here imports torch beyond the model's config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from atoll.errors import AtollError
from atoll.model.config import ModelConfig

CONFIG_YAML = "config.yaml"
MODEL_JSON = "model.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LINEAGE_JSON = "lineage.json"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DATA_DIR = "data"
CHECKPOINTS_DIR = "checkpoints"
SITES_DIR = "sites"
FINAL_DIGEST_KEY = "theta_digest"  # a site's last metrics record: SHA-256 (hex) of the θ it ended with

HF_CONFIG_JSON = "config.json"
GENERATION_CONFIG_JSON = "generation_config.json"

TOKENIZER_SIDE_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
"""Files a Hugging Face tokenizer keeps beside tokenizer.json; copied with it when present."""


def site_run_name(run_name: str, site: str) -> str:
    """The `run.name` of one site of a multi-site run: NAME/sites/SITE."""
    return f"{run_name}/{SITES_DIR}/{site}"


def site_dir(run_dir: Path, site: str) -> Path:
    """The run directory of `site` inside the multi-site run `run_dir`."""
    return run_dir / SITES_DIR / site


def site_dirs(run_dir: Path) -> list[Path]:
    """The site directories of a multi-site run that hold a model, sorted by name ([] if none)."""
    root = run_dir / SITES_DIR
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if (d / MODEL_JSON).is_file())


def read_model_json(run_dir: Path) -> ModelConfig:
    """The model shape of an atoll run. Raises AtollError when `run_dir` has no model.json."""
    path = run_dir / MODEL_JSON
    if not path.is_file():
        raise AtollError(
            f"{run_dir} is not an atoll run directory (no {MODEL_JSON}): give the directory `atoll train` wrote"
        )
    return ModelConfig(**json.loads(path.read_text(encoding="utf-8")))


def write_model_json(run_dir: Path, mcfg: ModelConfig) -> None:
    """Write model.json (the shape every rank and every later reader builds the model from)."""
    (run_dir / MODEL_JSON).write_text(json.dumps(dataclasses.asdict(mcfg), indent=1), encoding="utf-8")


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml of a run as a plain dict ({} when absent or not a mapping); not validated,
    since a parent may have been written by another atoll version."""
    path = run_dir / CONFIG_YAML
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
