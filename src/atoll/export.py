"""Export a run or any stage as a Hugging Face directory that `transformers` loads unchanged."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from atoll.data.tokenizer import EOS_TOKEN, load_tokenizer, save_hf_tokenizer
from atoll.errors import AtollError
from atoll.model import Transformer
from atoll.model.hf import arch_for, save_hf_model
from atoll.rundir.layout import (
    CHAT_TEMPLATE_FILE,
    LINEAGE_JSON,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    TOKENIZER_SIDE_FILES,
    read_model_json,
)
from atoll.rundir.lineage import classify_stage, lineage_chain
from atoll.rundir.load import load_stage_state, refuse_nonfinite, shared_site
from atoll.rundir.tokenizer import load_text_tokenizer
from atoll.train.checkpoint import list_checkpoints, load_model_weights

log = logging.getLogger(__name__)

EXPORT_LINEAGE_JSON = "atoll_lineage.json"
"""Written beside an exported stage: the chain of stages it came from."""


def export_run(run_dir: Path, out_dir: Path, *, arch: str = "auto", step: int | None = None) -> Path:
    """Write config.json, model.safetensors and the tokenizer files of a run's checkpoint to `out_dir`.

    Uses the latest complete checkpoint unless `step` names one. Single process, CPU. A
    multi-site run (RUN/sites/<site>/) exports its first site, whose weights every site shares
    after the final sync; a fine-tuned stage is merged (LoRA adapters folded into the weights,
    `merge_stage`). Raises AtollError for a directory that is not a run, a missing step or a
    corrupt checkpoint.
    """
    run_dir = shared_site(run_dir)
    if (run_dir / LINEAGE_JSON).is_file():
        if step is not None:
            raise AtollError(
                f"{run_dir} is a fine-tuned stage: it exports its final weights; "
                "leave out --step (it picks a pre-training checkpoint)"
            )
        return merge_stage(run_dir, out_dir, arch=arch)
    mcfg = read_model_json(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        raise AtollError(f"{run_dir} has no complete checkpoint: train it first (atoll train ...)")
    if step is None:
        ckpt = found[-1]
    else:
        matches = [c for c in found if c.step == step]
        if not matches:
            raise AtollError(
                f"{run_dir} has no checkpoint for step {step}: available steps are {[c.step for c in found]}"
            )
        ckpt = matches[0]
    tokenizer = run_dir / TOKENIZER_JSON
    if not tokenizer.is_file():
        raise AtollError(f"{run_dir} has no {TOKENIZER_JSON}: the run directory is incomplete")
    model = Transformer(mcfg)
    load_model_weights(ckpt.path, model)
    refuse_nonfinite(model.state_dict(), f"{run_dir} step {ckpt.step}")
    eos_id = load_tokenizer(tokenizer).token_to_id(EOS_TOKEN)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf_model(
        model.state_dict(),
        mcfg,
        out_dir,
        arch=arch_for(mcfg) if arch == "auto" else arch,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    save_hf_tokenizer(tokenizer, out_dir, model_max_length=mcfg.max_seq_len)
    log.info("exported step %d of %s to %s", ckpt.step, run_dir, out_dir)
    return out_dir


def merge_stage(path: Path, out_dir: Path, *, arch: str = "auto") -> Path:
    """Write `path`'s weights (a LoRA stage: merged into its parents') to `out_dir` as a Hugging
    Face directory: config.json, model.safetensors, tokenizer files, chat_template.jinja and
    atoll_lineage.json (the chain it came from). Single process, CPU. Raises AtollError."""
    stage = classify_stage(path)
    if out_dir.resolve() == stage.path.resolve():
        raise AtollError("the output directory is the stage itself: choose another directory")
    mcfg, state = load_stage_state(stage.path)
    tokenizer = load_text_tokenizer(stage.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf_model(
        state,
        mcfg,
        out_dir,
        arch=arch_for(mcfg) if arch == "auto" else arch,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    if (stage.path / TOKENIZER_CONFIG).is_file():  # a Hugging Face tokenizer: keep its files as they are
        for name in (TOKENIZER_JSON, *TOKENIZER_SIDE_FILES):
            if (stage.path / name).is_file() and (stage.path / name).resolve() != (out_dir / name).resolve():
                shutil.copyfile(stage.path / name, out_dir / name)
    else:
        save_hf_tokenizer(stage.path / TOKENIZER_JSON, out_dir, model_max_length=mcfg.max_seq_len)
    (out_dir / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")
    chain = json.dumps(lineage_chain(stage.path), indent=1, default=str)
    (out_dir / EXPORT_LINEAGE_JSON).write_text(chain + "\n", encoding="utf-8")
    log.info("merged %s (%s) into %s", stage.path, stage.kind, out_dir)
    return out_dir


def sample_with_transformers(hf_dir: Path, prompt: str, *, max_new_tokens: int, seed: int) -> str:
    """Load an exported directory with transformers itself and continue `prompt` (a check for users)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    torch.manual_seed(seed)
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=40,
            temperature=0.8,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0], skip_special_tokens=True)
