"""The model: a Llama-family decoder in plain torch, its configs, sampling and HF conversion.

Nothing here imports `torch.distributed`; parallelism is applied from outside.
"""

from atoll.model.config import PRESETS, ModelConfig, get_preset
from atoll.model.generate import generate
from atoll.model.hf import (
    arch_for,
    from_hf_state_dict,
    hf_config,
    load_hf_model,
    model_config_from_hf,
    save_hf_model,
    to_hf_state_dict,
)
from atoll.model.llama import KVCache, Transformer

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "arch_for",
    "from_hf_state_dict",
    "generate",
    "get_preset",
    "hf_config",
    "load_hf_model",
    "model_config_from_hf",
    "save_hf_model",
    "to_hf_state_dict",
]
