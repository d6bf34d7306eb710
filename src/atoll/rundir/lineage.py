"""Stages of a chain: what a directory holds, where it came from, and the record of it.

A stage is one of
- ``hf``: a Hugging Face directory (config.json + weights), a root;
- ``pretrain``: an `atoll train` run (model.json, checkpoints), a root unless it was
  initialized from another model (`model.init_from`);
- ``full`` / ``lora``: an `atoll finetune` run, whose ``lineage.json`` names its parent, the
  parent's fingerprint at the time, the data (with hashes), the method and the steps.

A child records its parent's fingerprint; a parent that changed after a child was trained is
refused (`check_parent`), not silently used. `atoll.rundir.load` gives a stage's weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atoll.data.manifest import MANIFEST_FILE
from atoll.errors import AtollError
from atoll.model import ModelConfig, model_config_from_hf
from atoll.rundir.layout import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    HF_CONFIG_JSON,
    LINEAGE_JSON,
    MODEL_JSON,
    read_model_json,
    read_run_config,
)
from atoll.train.checkpoint import META, CheckpointInfo, list_checkpoints, read_meta

LINEAGE_FORMAT = "atoll-lineage"
LINEAGE_VERSION = 1


@dataclass(frozen=True)
class Stage:
    """A directory and what it holds."""

    path: Path
    kind: str  # "hf", "pretrain", "full" or "lora"

    @property
    def name(self) -> str:
        return self.path.resolve().name


def classify_stage(path: Path) -> Stage:
    """What `path` holds. Raises AtollError when it is none of the stage kinds."""
    path = Path(path)
    if (path / LINEAGE_JSON).is_file():
        return Stage(path, str(read_lineage(path)["method"]))
    if (path / MODEL_JSON).is_file():
        return Stage(path, "pretrain")
    if (path / HF_CONFIG_JSON).is_file():
        return Stage(path, "hf")
    if not path.exists():
        raise AtollError(f"{path} does not exist: give an atoll run directory or a Hugging Face directory")
    raise AtollError(f"{path} is neither an atoll run ({MODEL_JSON}) nor a Hugging Face directory ({HF_CONFIG_JSON})")


def read_lineage(run_dir: Path) -> dict[str, Any]:
    """lineage.json of a fine-tuning stage. Raises AtollError when it is damaged or of another version."""
    path = run_dir / LINEAGE_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AtollError(f"{path} is unreadable ({exc}): the stage's record is damaged") from None
    if not isinstance(data, dict) or data.get("format") != LINEAGE_FORMAT:
        raise AtollError(f"{path} is not an atoll lineage record")
    if data.get("version") != LINEAGE_VERSION:
        raise AtollError(
            f"{path} has lineage version {data.get('version')}; this atoll reads version {LINEAGE_VERSION}"
        )
    return data


def write_lineage(run_dir: Path, record: dict[str, Any]) -> None:
    """Write lineage.json atomically (a reader never sees half a record)."""
    path = run_dir / LINEAGE_JSON
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_config_of(stage: Stage) -> ModelConfig:
    """The model shape of any stage: config.json of a Hugging Face directory, else model.json."""
    if stage.kind == "hf":
        try:
            return model_config_from_hf(json.loads((stage.path / HF_CONFIG_JSON).read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise AtollError(f"{stage.path}/{HF_CONFIG_JSON} is not valid JSON ({exc})") from None
    return read_model_json(stage.path)


def checkpoint_at(run_dir: Path, step: int | None) -> CheckpointInfo:
    """The complete checkpoint of `step` in `run_dir` (None: the latest). Raises AtollError."""
    found = list_checkpoints(run_dir)
    if not found:
        raise AtollError(f"{run_dir} has no complete checkpoint: train it first")
    if step is None:
        return found[-1]
    for ckpt in found:
        if ckpt.step == step:
            return ckpt
    raise AtollError(
        f"{run_dir} has no checkpoint of step {step} any more (it has {[c.step for c in found]}; "
        "train.keep_checkpoints removes old ones): its children were trained on that step"
    )


# ---------------------------------------------------------------- fingerprints


def _hf_weight_files(path: Path) -> list[Path]:
    files = sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and not p.name.startswith("adapter_")
    )
    if not files:
        raise AtollError(f"{path} has no weight files (*.safetensors or *.bin)")
    return files


def fingerprint(stage: Stage) -> dict[str, Any]:
    """What a child records about its parent, to refuse a parent that changed since."""
    if stage.kind == "hf":
        h = hashlib.sha256((stage.path / HF_CONFIG_JSON).read_bytes())
        for f in _hf_weight_files(stage.path):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        return {"config_and_sizes_sha256": h.hexdigest()}
    if stage.kind == "lora":
        return {"adapter_sha256": sha256_file(stage.path / ADAPTER_DIR / ADAPTER_WEIGHTS)}
    return _run_fingerprint_at(stage, None)


def _run_fingerprint_at(stage: Stage, step: int | None) -> dict[str, Any]:
    ckpt = checkpoint_at(stage.path, step)
    return {"step": ckpt.step, "meta_sha256": sha256_file(ckpt.path / META)}


def parent_of(stage: Stage) -> Stage | None:
    """The stage `stage` was trained from, if atoll knows it. Raises AtollError when a
    fine-tuning stage's parent is gone."""
    if stage.kind in ("lora", "full"):
        parent = read_lineage(stage.path)["parent"]
        candidates = [Path(os.path.normpath(stage.path / parent["relpath"])), Path(parent["path"])]
        for candidate in candidates:
            if candidate.exists():
                return classify_stage(candidate)
        raise AtollError(
            f"the parent of {stage.path} ({parent['path']}) is gone: restore it, or merge the stage while it exists"
        )
    if stage.kind == "pretrain":
        init = read_run_config(stage.path).get("model", {}).get("init_from")
        if init and Path(init).exists():
            return classify_stage(Path(init))
    return None


def check_parent(stage: Stage, parent: Stage) -> dict[str, Any]:
    """The parent's recorded fingerprint, after checking the parent still matches it."""
    recorded = read_lineage(stage.path)["parent"]["fingerprint"]
    if parent.kind in ("pretrain", "full"):  # the checkpoint the child started from, not the latest
        current = _run_fingerprint_at(parent, recorded.get("step"))
    else:
        current = fingerprint(parent)
    if current != recorded:
        raise AtollError(
            f"the parent {parent.path} changed after {stage.path} was trained from it "
            f"(fingerprint {current} != {recorded}): train the stage again, or point it at the parent it was made from"
        )
    return dict(recorded)


# ---------------------------------------------------------------- records for people


def stage_record(path: Path) -> dict[str, Any]:
    """One line of a lineage or a results table: stage, method, parent, steps, tokens, parameters, data."""
    stage = classify_stage(path)
    record: dict[str, Any] = {"stage": stage.name, "path": str(stage.path), "method": stage.kind}
    mcfg = model_config_of(stage)
    record["total_params"] = mcfg.num_params()
    if stage.kind in ("lora", "full"):
        lineage = read_lineage(stage.path)
        record.update(
            parent=lineage["parent"]["path"],
            steps=lineage["steps"],
            tokens=lineage["tokens"],
            trainable_params=lineage["trainable_params"],
            total_params=lineage["total_params"],
            status=lineage["status"],
            data=lineage["data"],
        )
        if lineage.get("lora"):
            record["lora"] = lineage["lora"]
        if lineage.get("val_loss") is not None:
            record["val_loss"] = lineage["val_loss"]
        return record
    if stage.kind == "hf":
        record.update(parent=None, steps=None, tokens=None, trainable_params=None, data=None)
        return record
    cfg = read_run_config(stage.path)
    found = list_checkpoints(stage.path)
    meta = read_meta(found[-1].path) if found else {}
    data_dir = Path(cfg.get("data", {}).get("dir", ""))
    manifest = data_dir / MANIFEST_FILE
    record.update(
        parent=cfg.get("model", {}).get("init_from"),
        steps=meta.get("step"),
        tokens=meta.get("tokens_seen"),
        trainable_params=mcfg.num_params(),
        data={"dir": str(data_dir), "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None},
    )
    return record


def lineage_chain(path: Path) -> list[dict[str, Any]]:
    """Records from the root to `path`. Raises AtollError for a broken chain (missing parent)."""
    chain = []
    stage: Stage | None = classify_stage(path)
    seen: set[Path] = set()
    while stage is not None:
        key = stage.path.resolve()
        if key in seen:
            raise AtollError(f"the lineage of {path} loops at {stage.path}")
        seen.add(key)
        chain.append(stage_record(stage.path))
        stage = parent_of(stage)
    return list(reversed(chain))
