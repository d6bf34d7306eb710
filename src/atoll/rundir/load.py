"""Weights, model and tokenizer of any stage, loaded in one process for using it.

`load_stage_state` gives any stage's weights as a plain atoll state dict: a Hugging Face
directory's converted, a pre-training or full fine-tuning run's from a DCP checkpoint, a LoRA
stage's as its parent's weights (recursively) with its adapter merged in, so nothing but the
adapter is stored per LoRA stage. `load_stage` adds the tokenizer, for generation, serving and
evaluation. Training loads its starting weights through `load_stage_state` as well.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from atoll.errors import AtollError
from atoll.model import ModelConfig, Transformer, load_hf_model
from atoll.report.metrics import read_metrics
from atoll.rundir.adapter import load_adapter, merge_adapter
from atoll.rundir.layout import ADAPTER_DIR, FINAL_DIGEST_KEY, LINEAGE_JSON, MODEL_JSON, SITES_DIR, site_dirs
from atoll.rundir.lineage import check_parent, checkpoint_at, classify_stage, model_config_of, parent_of
from atoll.rundir.tokenizer import TextTokenizer, load_text_tokenizer
from atoll.train.checkpoint import load_model_weights

log = logging.getLogger(__name__)


def shared_site(run_dir: Path) -> Path:
    """`run_dir` itself, or for a multi-site pre-training run (RUN/sites/NAME/) its first site by
    name: after the final sync every site holds the same weights, so any of them is the run's
    model. Raises AtollError when the sites' final θ digests say otherwise (`check_site_digests`)."""
    if (run_dir / MODEL_JSON).is_file() or (run_dir / LINEAGE_JSON).is_file() or not (run_dir / SITES_DIR).is_dir():
        return run_dir
    sites = site_dirs(run_dir)
    if not sites:
        return run_dir
    check_site_digests(run_dir)
    log.info("%s is a multi-site run: using site %s (every site holds the same weights)", run_dir, sites[0].name)
    return sites[0]


def check_site_digests(run_dir: Path, *, require_all: bool = True) -> str:
    """The θ digest (hex) every site of the multi-site run `run_dir` ended with.

    Reads the last `theta_digest` of each `sites/NAME/metrics.jsonl`. Raises `AtollError` naming
    the sites when the sites differ (do not export: the run did not end with one model) or, with
    `require_all`, when a site has none (it did not finish).
    """
    dirs = site_dirs(run_dir)
    if not dirs:
        raise AtollError(f"{run_dir} has no sites/ directory: not a multi-site run")
    finals: dict[str, str | None] = {}
    for d in dirs:
        values = [r[FINAL_DIGEST_KEY] for r in read_metrics(d) if FINAL_DIGEST_KEY in r]
        finals[d.name] = values[-1] if values else None
    missing = sorted(s for s, v in finals.items() if v is None)
    if not require_all:
        finals = {s: v for s, v in finals.items() if v is not None}
        if not finals:
            return ""
    elif missing:
        raise AtollError(
            f"site(s) {', '.join(missing)} of {run_dir} recorded no final θ digest: the run did not finish "
            "there; resume it (atoll train ... --resume) before exporting"
        )
    distinct = sorted(set(finals.values()), key=str)
    if len(distinct) > 1:
        groups = "; ".join(f"{v[:12]}…: {', '.join(sorted(s for s in finals if finals[s] == v))}" for v in distinct)  # type: ignore[index]
        raise AtollError(f"the sites of {run_dir} ended with different parameters ({groups}); do not export this run")
    return str(distinct[0])


def refuse_nonfinite(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise AtollError when any weight in `state` is NaN or infinite: a diverged model is never
    exported, served or built on."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items() if t.is_floating_point()}
    bad = {name: n for name, n in bad.items() if n}
    if bad:
        first = next(iter(bad))
        raise AtollError(
            f"{source} holds non-finite weights ({sum(bad.values()):,} values in {len(bad)} tensors, e.g. {first}): "
            "the run diverged; export an earlier checkpoint (--step) or retrain with a lower train.lr"
        )


def load_stage_state(path: Path, *, step: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A stage's weights as a plain atoll state dict on the CPU. Single process.

    `step` picks a checkpoint of a pre-training or full fine-tuning run (default: the latest).
    Raises AtollError for an unreadable stage, a missing checkpoint, or a changed parent.
    """
    stage = classify_stage(shared_site(path))
    if stage.kind == "hf":
        return load_hf_model(stage.path)
    mcfg = model_config_of(stage)
    if stage.kind == "lora":
        if step is not None:
            raise AtollError(
                f"{stage.path} is a LoRA stage: it keeps the adapter of its last checkpoint only; drop the step"
            )
        parent = parent_of(stage)
        assert parent is not None  # a LoRA stage always records one; parent_of raises when it is gone
        recorded = check_parent(stage, parent)
        _, state = load_stage_state(parent.path, step=recorded.get("step"))
        config, tensors = load_adapter(stage.path / ADAPTER_DIR)
        return mcfg, merge_adapter(state, config, tensors)
    ckpt = checkpoint_at(stage.path, step)
    with torch.device("meta"):
        model = Transformer(mcfg)
    model.to_empty(device="cpu")
    with warnings.catch_warnings():  # DCP says it loads in a single process: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_model_weights(ckpt.path, model)
    state = model.state_dict()
    refuse_nonfinite(state, f"{stage.path} step {ckpt.step}")
    return mcfg, state


def load_stage_model(path: Path, *, device: torch.device | str = "cpu", step: int | None = None) -> Transformer:
    """A stage as an eval-mode `Transformer` on `device`, ready for generation or evaluation."""
    mcfg, state = load_stage_state(path, step=step)
    with torch.device("meta"):
        model = Transformer(mcfg)
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()


def load_stage(path: Path, *, device: torch.device | str = "cpu") -> tuple[Transformer, TextTokenizer]:
    """A stage's latest model (eval mode, on `device`) and its tokenizer. Single process.

    Raises AtollError for anything `load_stage_model` or `load_text_tokenizer` refuses, and for a
    tokenizer with more tokens than the model has embeddings.
    """
    path = shared_site(path)
    tokenizer = load_text_tokenizer(path)
    model = load_stage_model(path, device=device)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise AtollError(
            f"the tokenizer in {path} has {tokenizer.vocab_size} tokens, the model {model.cfg.vocab_size}: "
            "they do not belong together"
        )
    return model, tokenizer
