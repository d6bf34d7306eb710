"""Any stage as a plain Hugging Face model: adapters merged, tokenizer and chat template beside it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from atoll.data import save_hf_tokenizer
from atoll.errors import AtollError
from atoll.finetune.stage import classify_stage, lineage_chain, load_stage_state
from atoll.finetune.text import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG, TOKENIZER_JSON, load_text_codec
from atoll.model import arch_for, save_hf_model

log = logging.getLogger(__name__)

LINEAGE_FILE = "atoll_lineage.json"


def merge_stage(path: Path, out_dir: Path, *, arch: str = "auto") -> Path:
    """Write `path`'s weights (a LoRA stage: merged into its parents') to `out_dir` as a Hugging
    Face directory: config.json, model.safetensors, tokenizer files, chat_template.jinja and
    atoll_lineage.json (the chain it came from). Single process, CPU. Raises AtollError."""
    stage = classify_stage(path)
    if out_dir.resolve() == stage.path.resolve():
        raise AtollError("the output directory is the stage itself: choose another directory")
    mcfg, state = load_stage_state(stage.path)
    codec = load_text_codec(stage.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf_model(state, mcfg, out_dir, arch=arch_for(mcfg) if arch == "auto" else arch, bos_token_id=codec.bos_id, eos_token_id=codec.eos_id)
    if (stage.path / TOKENIZER_CONFIG).is_file():  # a Hugging Face tokenizer: keep its files as they are
        for name in (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json"):
            if (stage.path / name).is_file() and (stage.path / name).resolve() != (out_dir / name).resolve():
                shutil.copyfile(stage.path / name, out_dir / name)
    else:
        save_hf_tokenizer(stage.path / TOKENIZER_JSON, out_dir, model_max_length=mcfg.max_seq_len)
    (out_dir / CHAT_TEMPLATE_FILE).write_text(codec.chat_template, encoding="utf-8")
    (out_dir / LINEAGE_FILE).write_text(json.dumps(lineage_chain(stage.path), indent=1, default=str) + "\n", encoding="utf-8")
    log.info("merged %s (%s) into %s", stage.path, stage.kind, out_dir)
    return out_dir
