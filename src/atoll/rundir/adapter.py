"""LoRA adapters on disk: stored in PEFT's format under Hugging Face names, read back, merged.

atoll's module paths (``layers.N.attn.q_proj``) differ from Hugging Face's
(``model.layers.N.self_attn.q_proj``), so the adapter PEFT trains on an atoll model is renamed
when it is saved: ``RUN/adapter/`` holds ``adapter_config.json`` and
``adapter_model.safetensors`` exactly as ``PeftModel.from_pretrained`` expects them on top of
the parent exported as a Hugging Face model (`atoll merge PARENT DIR`).

Reading an adapter back and merging it (W += alpha / r * B @ A) needs only safetensors and
torch, so serving, evaluating and merging a stage never import PEFT. Wrapping a model with
adapters for training is fine-tuning's (`atoll.finetune.lora`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from atoll.errors import AtollError
from atoll.rundir.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# atoll module path inside a block -> Hugging Face's
_BLOCK_MODULES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
_HF_TO_ATOLL = {v: k for k, v in _BLOCK_MODULES.items()}
_ATOLL_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?layers\.(\d+)\.(attn\.\w+|mlp\.\w+)\.(lora_[AB])\.(?:default\.)?weight$"
)
_HF_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)\.(lora_[AB])\.weight$")


class LoraShape(Protocol):
    """What an adapter's config records: fine-tuning's `LoraSection` is one (structurally, so
    this module does not import fine-tuning's config)."""

    @property
    def rank(self) -> int: ...

    @property
    def alpha(self) -> float: ...

    @property
    def dropout(self) -> float: ...

    @property
    def target_modules(self) -> Sequence[str]: ...


def to_hf_adapter(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename adapter tensors of a PEFT-wrapped atoll model to PEFT's keys on a Hugging Face model.

    Accepts the keys of `named_parameters()` or of `get_peft_model_state_dict`; other tensors
    are ignored. Raises AtollError for a LoRA tensor on a module Hugging Face does not have.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _ATOLL_LORA_KEY.match(key)
        if m is None:
            if "lora_" in key:
                raise AtollError(f"adapter tensor {key} is on a module that has no Hugging Face counterpart")
            continue
        layer, module, part = m.groups()
        hf_key = f"base_model.model.model.layers.{layer}.{_BLOCK_MODULES[module]}.{part}.weight"
        out[hf_key] = tensor.detach().to("cpu").contiguous().clone()
    return out


def adapter_config(cfg: LoraShape, *, base_model: str) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for a causal LM (the fields every PEFT version reads)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, cfg: LoraShape, out_dir: Path, *, base_model: str) -> None:
    """Write the adapters of a PEFT-wrapped (possibly DDP-wrapped) atoll model to `out_dir`,
    replacing it atomically. Single process (the main rank). Raises AtollError without adapters."""
    inner = model.module if hasattr(model, "module") else model
    tensors = to_hf_adapter(dict(inner.named_parameters()))
    if not tensors:
        raise AtollError("the model has no LoRA adapters to save")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = adapter_config(cfg, base_model=base_model)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def load_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of a PEFT LoRA adapter directory. Raises AtollError."""
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise AtollError(
            f"{adapter_dir} is not a LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected): "
            "the stage wrote none yet; resume it"
        )
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise AtollError(f"{cfg_path} describes a {config.get('peft_type')} adapter; only LORA is supported")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise AtollError(f"{cfg_path} sets {key}, which atoll cannot merge")
    return config, load_file(str(weights))


def merge_adapter(
    state: dict[str, torch.Tensor], config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Add each adapter's scaled B @ A to its weight in an atoll state dict (in place; returned).

    Uses PEFT's scaling: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per-module
    overrides from rank_pattern / alpha_pattern. Computes in fp32 and casts back. Raises
    AtollError for an adapter that does not fit the base.
    """
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _HF_LORA_KEY.match(key)
        if m is None:
            raise AtollError(f"adapter tensor {key} is not a LoRA weight of a Llama/Qwen2 decoder layer")
        layer, module, part = m.groups()
        if module not in _HF_TO_ATOLL:
            raise AtollError(f"adapter tensor {key} targets {module}, which atoll's model does not have")
        pairs.setdefault((layer, module), {})[part] = tensor
    for (layer, module), ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise AtollError(f"adapter for layers.{layer}.{module} lacks {'lora_B' if 'lora_A' in ab else 'lora_A'}")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        name = module.split(".")[-1]
        rank = int(config.get("rank_pattern", {}).get(name, config["r"]))
        alpha = float(config.get("alpha_pattern", {}).get(name, config["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        key = f"layers.{layer}.{_HF_TO_ATOLL[module]}.weight"
        if key not in state:
            raise AtollError(f"adapter targets {key}, which the base model does not have")
        weight = state[key]
        if tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise AtollError(
                f"adapter for {key} has shape {tuple(b.shape[:1]) + tuple(a.shape[1:])}, "
                f"the weight {tuple(weight.shape)}: it belongs to another base"
            )
        state[key] = (weight.float() + scale * (b @ a)).to(weight.dtype)
    return state
