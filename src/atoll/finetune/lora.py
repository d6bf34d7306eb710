"""LoRA for training: PEFT adapters wrapped around an atoll model's linear layers.

Storing the trained adapter in PEFT's format, reading it back and merging it into the weights
is a run directory's business (`atoll.rundir.adapter`), so using a stage never imports PEFT.
"""

from __future__ import annotations

from torch import nn

from atoll.finetune.config import LoraSection


def apply_lora(model: nn.Module, cfg: LoraSection) -> nn.Module:
    """Wrap `model` with PEFT LoRA adapters on `cfg.target_modules`; only adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), bias="none"
    )
    return get_peft_model(model, config)
