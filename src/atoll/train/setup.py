"""Everything a run needs before its first step, checked once, with clear errors.

`prepare_run` is called by the CLI before any rank starts (so a user's mistake is one line and
exit code 2, not a failure inside N processes), and again by the main rank of a run started by
torchrun directly. It is idempotent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from atoll.config import RunConfig, dump_config
from atoll.data import Manifest, prepare_demo_data
from atoll.errors import AtollError
from atoll.model import ModelConfig, get_preset
from atoll.model.hf import load_hf_model, model_config_from_hf
from atoll.parallel.layout import pipeline_micro_batches, resolve_layout
from atoll.rundir.layout import (
    CONFIG_YAML,
    HF_CONFIG_JSON,
    MODEL_JSON,
    TOKENIZER_JSON,
    read_model_json,
    site_run_name,
    write_model_json,
)
from atoll.train.checkpoint import latest_checkpoint, verify_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitSource:
    """Where starting weights come from: a Hugging Face directory or an atoll run."""

    kind: str  # "hf" or "run"
    path: Path


def classify_init(path: Path) -> InitSource:
    """Where `model.init_from` points. Raises AtollError when it is neither kind of directory."""
    if (path / HF_CONFIG_JSON).is_file():
        return InitSource("hf", path)
    if (path / MODEL_JSON).is_file():
        return InitSource("run", path)
    raise AtollError(
        f"model.init_from {path} is neither a Hugging Face directory ({HF_CONFIG_JSON}) "
        f"nor an atoll run directory ({MODEL_JSON}): check the path"
    )


def data_tokenizer_path(cfg: RunConfig) -> Path:
    """The tokenizer a run uses: the configured one, the init model's, or the data's own."""
    if cfg.data.tokenizer is not None:
        return cfg.data.tokenizer
    if cfg.model.init_from is not None:
        src = classify_init(cfg.model.init_from)
        candidate = src.path / TOKENIZER_JSON
        if candidate.is_file():
            return candidate
    return cfg.data.dir / TOKENIZER_JSON


def resolve_model_config(cfg: RunConfig, manifest: Manifest) -> ModelConfig:
    """The model shape: from init_from when given, else the preset with overrides and the data's vocab."""
    overrides = cfg.model.overrides()  # none when init_from is set (ModelSection checks)
    if cfg.model.init_from is not None:
        src = classify_init(cfg.model.init_from)
        if src.kind == "hf":
            config_path = src.path / HF_CONFIG_JSON
            try:
                hf_cfg = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise AtollError(f"{config_path} is not valid JSON ({exc}): re-export the model") from None
            mcfg = model_config_from_hf(hf_cfg)
        else:
            mcfg = read_model_json(src.path)
        if mcfg.vocab_size < manifest.vocab_size:
            raise AtollError(
                f"the model from {src.path} has {mcfg.vocab_size} token embeddings but the data's tokenizer has "
                f"{manifest.vocab_size}: prepare the data with the model's tokenizer"
            )
        if cfg.data.seq_len > mcfg.max_seq_len:
            raise AtollError(
                f"data.seq_len {cfg.data.seq_len} exceeds the model's context {mcfg.max_seq_len}: lower data.seq_len"
            )
        return mcfg
    assert cfg.model.preset is not None, "ModelSection requires a preset or init_from"
    base = get_preset(cfg.model.preset)
    fields = dict(overrides)
    fields["vocab_size"] = manifest.vocab_size
    fields["max_seq_len"] = max(base.max_seq_len, cfg.data.seq_len)
    try:
        return dataclasses.replace(base, **fields)
    except AtollError as exc:
        raise AtollError(f"model: {exc}") from None


def load_data_manifest(cfg: RunConfig, *, prepare: bool) -> Manifest:
    """The verified manifest of the training data; builds the demo corpus first when asked to."""
    if prepare and cfg.data.prepare == "demo" and not (cfg.data.dir / "manifest.json").is_file():
        log.info("preparing the demo corpus in %s (once; later runs reuse it)", cfg.data.dir)
        prepare_demo_data(cfg.data.dir, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len, seed=cfg.run.seed)
    manifest = Manifest.load(cfg.data.dir)
    manifest.verify(cfg.data.dir, tokenizer_path=data_tokenizer_path(cfg))
    return manifest


def prepare_run(cfg: RunConfig, *, resume: bool, world_size: int | None = None) -> ModelConfig:
    """Check data, model, checkpoints; write the run directory's config, model.json and tokenizer.

    `world_size`: the site's rank count when known; the layout (`parallel.tp`, ...) is then checked
    against it, the model and (pipeline stages) the batch. Raises AtollError for every user mistake. Never deletes or
    overwrites a checkpoint.
    """
    manifest = load_data_manifest(cfg, prepare=True)
    mcfg = resolve_model_config(cfg, manifest)
    if world_size is not None:
        layout = resolve_layout(cfg.parallel, world_size=world_size, model=mcfg, seq_len=cfg.data.seq_len)
        pipeline_micro_batches(layout, global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch)
    if cfg.model.init_from is not None and classify_init(cfg.model.init_from).kind == "hf":
        load_hf_model(cfg.model.init_from)  # fail now on unreadable weights, not inside the ranks
    if cfg.model.init_from is not None and classify_init(cfg.model.init_from).kind == "run":
        ckpt = latest_checkpoint(cfg.model.init_from)
        if ckpt is None:
            raise AtollError(f"model.init_from {cfg.model.init_from} has no complete checkpoint: train it first")
        verify_checkpoint(ckpt.path)
    run_dir = cfg.run.path
    ckpt = latest_checkpoint(run_dir)
    if resume:
        if ckpt is None:
            raise AtollError(f"--resume: {run_dir} has no complete checkpoint: start without --resume")
        previous = read_model_json(run_dir)
        if previous != mcfg:
            raise AtollError(
                f"--resume: the model in {run_dir} differs from this config's model: "
                f"resume with the config the run was started with ({run_dir}/{CONFIG_YAML})"
            )
        verify_checkpoint(ckpt.path)
    elif ckpt is not None:
        raise AtollError(
            f"{run_dir} already holds checkpoints: add --resume to continue it, or choose another --run.name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_YAML).write_text(dump_config(cfg), encoding="utf-8")
    write_model_json(run_dir, mcfg)
    tok = data_tokenizer_path(cfg)
    if tok.resolve() != (run_dir / TOKENIZER_JSON).resolve():
        shutil.copyfile(tok, run_dir / TOKENIZER_JSON)
    return mcfg


def site_config(cfg: RunConfig, site: str) -> RunConfig:
    """The config of one site of a multi-site run: its own run directory, RUN/sites/SITE."""
    run = cfg.run.model_copy(update={"name": site_run_name(cfg.run.name, site)})
    return cfg.model_copy(update={"run": run})
