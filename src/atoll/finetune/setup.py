"""Everything a fine-tuning stage needs before its first step, checked once, with clear errors.

`prepare_finetune` runs in the CLI before any rank starts (and on the main rank of a stage that
torchrun started directly). It writes the run directory: config.yaml, model.json, the parent's
tokenizer files and chat template, the tokenized data and lineage.json. Idempotent on resume;
never overwrites a checkpoint. `prepare_site_stage` is what each site of a multi-site stage runs
on its own machine (`atoll site --finetune`): the same preparation, or the one already there.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atoll import __version__
from atoll.config import dump_config
from atoll.errors import AtollError
from atoll.finetune.config import FinetuneConfig, LoraSection
from atoll.finetune.data import DATA_JSON, prepare_data, read_data_summary
from atoll.model import ModelConfig
from atoll.rundir.layout import (
    CHAT_TEMPLATE_FILE,
    CONFIG_YAML,
    DATA_DIR,
    TOKENIZER_JSON,
    TOKENIZER_SIDE_FILES,
    write_model_json,
)
from atoll.rundir.lineage import (
    LINEAGE_FORMAT,
    LINEAGE_JSON,
    LINEAGE_VERSION,
    Stage,
    check_parent,
    classify_stage,
    fingerprint,
    model_config_of,
    parent_of,
    read_lineage,
    write_lineage,
)
from atoll.rundir.tokenizer import DEFAULT_CHAT_TEMPLATE, check_template, load_text_tokenizer, read_chat_template
from atoll.train.checkpoint import latest_checkpoint, verify_checkpoint

log = logging.getLogger(__name__)


def lora_param_count(mcfg: ModelConfig, lora: LoraSection) -> int:
    """Parameters of the adapters: r * (in + out) per targeted linear layer."""
    q_out, kv_out = mcfg.num_heads * mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
    shapes = {
        "q_proj": (mcfg.dim, q_out),
        "k_proj": (mcfg.dim, kv_out),
        "v_proj": (mcfg.dim, kv_out),
        "o_proj": (q_out, mcfg.dim),
        "gate_proj": (mcfg.dim, mcfg.ffn_dim),
        "up_proj": (mcfg.dim, mcfg.ffn_dim),
        "down_proj": (mcfg.ffn_dim, mcfg.dim),
    }
    per_layer = sum(lora.rank * (shapes[m][0] + shapes[m][1]) for m in set(lora.target_modules))
    return mcfg.num_layers * per_layer


def _check_parent_usable(parent: Stage) -> None:
    if parent.kind == "lora":
        grand = parent_of(parent)
        assert grand is not None
        check_parent(parent, grand)
    if parent.kind in ("pretrain", "full"):
        ckpt = latest_checkpoint(parent.path)
        if ckpt is None:
            raise AtollError(f"finetune.parent {parent.path} has no complete checkpoint: train it first")
        verify_checkpoint(ckpt.path)
        if parent.kind == "full" and read_lineage(parent.path)["status"] != "finished":
            log.warning(
                "finetune.parent %s has not finished its steps; starting from its step %d", parent.path, ckpt.step
            )
    if parent.kind == "lora" and read_lineage(parent.path)["status"] != "finished":
        log.warning("finetune.parent %s has not finished its steps; starting from its latest adapter", parent.path)
    fingerprint(parent)  # raises when weights or adapter are missing


def _chat_template(cfg: FinetuneConfig, parent: Stage) -> str:
    if cfg.finetune.chat_template is not None:
        path = cfg.finetune.chat_template
        if not path.is_file():
            raise AtollError(f"finetune.chat_template {path} does not exist")
        template = path.read_text(encoding="utf-8")
        check_template(template, where=str(path))
        return template
    return read_chat_template(parent.path) or DEFAULT_CHAT_TEMPLATE


def _write_text_files(cfg: FinetuneConfig, parent: Stage, run_dir: Path) -> None:
    tokenizer = parent.path / TOKENIZER_JSON
    if not tokenizer.is_file():
        raise AtollError(
            f"finetune.parent {parent.path} has no {TOKENIZER_JSON}: "
            "atoll needs a fast (tokenizers) tokenizer beside the weights"
        )
    shutil.copyfile(tokenizer, run_dir / TOKENIZER_JSON)
    for name in TOKENIZER_SIDE_FILES:
        if (parent.path / name).is_file():
            config = json.loads((parent.path / name).read_text(encoding="utf-8"))
            config.pop("chat_template", None)  # the stage's own template is chat_template.jinja
            (run_dir / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (run_dir / CHAT_TEMPLATE_FILE).write_text(_chat_template(cfg, parent), encoding="utf-8")


def _sources_digest(sources: list[dict[str, str]]) -> str:
    h = hashlib.sha256()
    for s in sorted(sources, key=lambda s: s["path"]):
        h.update(f"{s['path']}\0{s['sha256']}\n".encode())
    return h.hexdigest()


def prepare_finetune(cfg: FinetuneConfig, *, resume: bool) -> ModelConfig:
    """Check the parent, the data and the run directory; write what the ranks read. Raises AtollError."""
    parent = classify_stage(cfg.finetune.parent)
    mcfg = model_config_of(parent)
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise AtollError(
            f"data.seq_len {cfg.data.seq_len} exceeds the parent's context of {mcfg.max_seq_len} tokens: "
            "lower data.seq_len"
        )
    run_dir = cfg.run.path
    ckpt = latest_checkpoint(run_dir)
    if resume:
        if ckpt is None:
            raise AtollError(f"--resume: {run_dir} has no complete checkpoint: start without --resume")
        lineage = read_lineage(run_dir)
        started_from = Path(lineage["parent"]["path"])
        if started_from.resolve() != parent.path.resolve() or lineage["method"] != cfg.finetune.method:
            raise AtollError(
                f"--resume: {run_dir} was started from {lineage['parent']['path']} with method {lineage['method']}: "
                f"resume with the config it was started with ({run_dir}/{CONFIG_YAML})"
            )
        check_parent(Stage(run_dir, lineage["method"]), parent)
        read_data_summary(run_dir / DATA_DIR, verify=True)
        verify_checkpoint(ckpt.path)
        return mcfg
    if ckpt is not None:
        raise AtollError(
            f"{run_dir} already holds checkpoints: add --resume to continue it, or choose another --run.name"
        )
    if run_dir.resolve() == parent.path.resolve():
        raise AtollError("run directory and finetune.parent are the same directory: choose another --run.name")
    _check_parent_usable(parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_YAML).write_text(dump_config(cfg), encoding="utf-8")
    write_model_json(run_dir, mcfg)
    _write_text_files(cfg, parent, run_dir)
    tokenizer = load_text_tokenizer(run_dir)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise AtollError(
            f"the tokenizer of {parent.path} has {tokenizer.vocab_size} tokens but the model only "
            f"{mcfg.vocab_size} embeddings: the parent is inconsistent"
        )
    summary = prepare_data(cfg.data, tokenizer, run_dir / DATA_DIR, parent=parent.path, seed=cfg.run.seed)
    method = cfg.finetune.method
    trainable = lora_param_count(mcfg, cfg.finetune.lora) if method == "lora" else mcfg.num_params()
    record: dict[str, Any] = {
        "format": LINEAGE_FORMAT,
        "version": LINEAGE_VERSION,
        "stage": cfg.run.name,
        "method": method,
        "parent": {
            "path": str(parent.path),
            "relpath": os.path.relpath(parent.path.resolve(), run_dir.resolve()),
            "kind": parent.kind,
            "fingerprint": fingerprint(parent),
        },
        "data": {
            "format": cfg.data.format,
            "paths": [str(p) for p in cfg.data.paths],
            "validation_paths": [str(p) for p in cfg.data.validation_paths],
            "sources": len(summary["sources"]),
            "sources_sha256": _sources_digest(summary["sources"]),
            "data_json_sha256": hashlib.sha256((run_dir / DATA_DIR / DATA_JSON).read_bytes()).hexdigest(),
            "documents": {k: v["documents"] for k, v in summary["splits"].items()},
            "tokens": {k: v["tokens"] for k, v in summary["splits"].items()},
            "replay": summary.get("replay"),
        },
        "lora": cfg.finetune.lora.model_dump(mode="json") if method == "lora" else None,
        "trainable_params": trainable,
        "total_params": mcfg.num_params() + (trainable if method == "lora" else 0),
        "steps": 0,
        "planned_steps": cfg.train.steps,
        "tokens": 0,
        "val_loss": None,
        "status": "prepared",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "atoll_version": __version__,
    }
    write_lineage(run_dir, record)
    log.info(
        "stage %s: %s from %s (%s), %s trainable parameters",
        cfg.run.name,
        method,
        parent.path,
        parent.kind,
        f"{trainable:,}",
    )
    return mcfg


@contextmanager
def _preparing(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `run_dir` while a site prepares it: sites that share a
    filesystem (one machine, or a shared mount) then prepare it once, one after the other."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f".{run_dir.name}.prepare.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_site_stage(cfg: FinetuneConfig, *, resume: bool, first_site: bool, own_dir: Path) -> ModelConfig:
    """Make the stage's directory ready on this site's machine; the main rank of every site calls it.

    Each data center prepares what its ranks read (config.yaml, model.json, tokenizer, the
    tokenized data, lineage.json) from the same config, parent and data files, so the prepared
    rows are the same everywhere (the preparation is deterministic). A directory another site
    already prepared with this very config (a shared filesystem) is verified and used as it is,
    never rewritten under that site's ranks. `own_dir` is where this site keeps its checkpoints
    (the stage's directory for the first site, RUN/sites/NAME for the others). Raises AtollError.
    """
    run_dir = cfg.run.path
    with _preparing(run_dir):
        if resume and first_site:
            return prepare_finetune(cfg, resume=True)  # verifies, writes nothing
        config = run_dir / CONFIG_YAML
        ready = (run_dir / LINEAGE_JSON).is_file() and config.is_file()  # lineage.json is written last
        if not ready or config.read_text(encoding="utf-8") != dump_config(cfg):
            return prepare_finetune(cfg, resume=False)
        if not resume and latest_checkpoint(own_dir) is not None:
            raise AtollError(
                f"{own_dir} already holds checkpoints: add --resume to continue it, or choose another --run.name"
            )
        read_data_summary(run_dir / DATA_DIR, verify=True)
        log.info("stage %s: already prepared with this config; using it", run_dir)
        return model_config_of(Stage(run_dir, cfg.finetune.method))
