"""Hugging Face adapter: config and weights to and from `LlamaForCausalLM` / `Qwen2ForCausalLM`.

Pure key renaming: atoll's rotary layout is HF's "rotate_half", so no q/k permutation is needed.
Both HF architectures can hold any atoll model: Qwen2 always has q/k/v biases (written as zeros
when `qkv_bias` is off) and Llama's `attention_bias` also adds an output-projection bias (written
as zeros). Reading back, such all-zero biases are dropped; nonzero ones atoll cannot represent
raise `AtollError`.

Does not import transformers: only `json`, `safetensors` and torch tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from atoll.errors import AtollError
from atoll.model.config import ModelConfig

SUPPORTED_ARCHS: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""HF `model_type` -> the `architectures` entry written to config.json."""

# atoll key inside a block -> HF key inside `model.layers.{i}.`
_LAYER_KEYS: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_QKV_BIAS = ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias")
_GLOBAL_KEYS: dict[str, str] = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def arch_for(cfg: ModelConfig) -> str:
    """Default HF architecture for `cfg`: "qwen2" when it has q/k/v bias, else "llama"."""
    return "qwen2" if cfg.qkv_bias else "llama"


def _check_arch(arch: str) -> None:
    if arch not in SUPPORTED_ARCHS:
        supported = ", ".join(SUPPORTED_ARCHS)
        raise AtollError(f"unsupported Hugging Face architecture {arch!r}; supported: {supported}")


def hf_config(
    cfg: ModelConfig,
    *,
    arch: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """The config.json content describing `cfg` as an HF `arch` model (default `arch_for(cfg)`).

    Writes the rope base both as `rope_theta` (transformers 4) and `rope_parameters` (5).
    """
    arch = arch or arch_for(cfg)
    _check_arch(arch)
    config: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    if arch == "llama":
        config.update(attention_bias=cfg.qkv_bias, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(
            use_sliding_window=False,
            sliding_window=cfg.max_seq_len,
            max_window_layers=cfg.num_layers,
        )
    return config


def model_config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` of an HF Llama or Qwen2 config.json (as a dict).

    Raises `AtollError` for another architecture, a missing key, or a feature atoll's model
    lacks (rope scaling, sliding window, MLP bias, a head_dim other than hidden/heads).
    """
    arch = config.get("model_type")
    if arch is None:
        by_class = {v: k for k, v in SUPPORTED_ARCHS.items()}
        archs = config.get("architectures") or []
        arch = next((by_class[a] for a in archs if a in by_class), None) or (archs or [None])[0]
    if arch not in SUPPORTED_ARCHS:
        raise AtollError(f"unsupported Hugging Face model_type {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")

    def need(key: str) -> Any:
        if key not in config:
            raise AtollError(f"Hugging Face config.json lacks {key!r}; it is required for {arch}")
        return config[key]

    dim = need("hidden_size")
    num_heads = need("num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * num_heads != dim:
        raise AtollError(
            f"head_dim {head_dim} x num_attention_heads {num_heads} != hidden_size {dim}; "
            "atoll requires head_dim == hidden_size / num_attention_heads"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise AtollError(f"hidden_act {config['hidden_act']!r} is not supported; atoll uses silu")

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise AtollError(f"rope scaling {rope_type!r} is not supported; atoll implements plain RoPE only")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))

    if arch == "llama":
        if config.get("mlp_bias", False):
            raise AtollError("mlp_bias=true is not supported; atoll's MLP has no biases")
        qkv_bias = bool(config.get("attention_bias", False))
    else:
        if config.get("use_sliding_window", False):
            raise AtollError("use_sliding_window=true is not supported; atoll uses full attention")
        qkv_bias = True

    return ModelConfig(
        vocab_size=need("vocab_size"),
        dim=dim,
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        ffn_dim=need("intermediate_size"),
        max_seq_len=config.get("max_position_embeddings", 2048 if arch == "llama" else 32768),
        rope_theta=float(rope_theta),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """atoll state-dict key -> shape, for a `Transformer(cfg)`."""
    q_out = cfg.num_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim
    block: dict[str, tuple[int, ...]] = {
        "attn_norm.weight": (cfg.dim,),
        "attn.q_proj.weight": (q_out, cfg.dim),
        "attn.k_proj.weight": (kv_out, cfg.dim),
        "attn.v_proj.weight": (kv_out, cfg.dim),
        "attn.o_proj.weight": (cfg.dim, q_out),
        "mlp_norm.weight": (cfg.dim,),
        "mlp.gate_proj.weight": (cfg.ffn_dim, cfg.dim),
        "mlp.up_proj.weight": (cfg.ffn_dim, cfg.dim),
        "mlp.down_proj.weight": (cfg.dim, cfg.ffn_dim),
    }
    if cfg.qkv_bias:
        block["attn.q_proj.bias"] = (q_out,)
        block["attn.k_proj.bias"] = (kv_out,)
        block["attn.v_proj.bias"] = (kv_out,)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.num_layers):
        shapes.update({f"layers.{i}.{key}": shape for key, shape in block.items()})
    shapes["norm.weight"] = (cfg.dim,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def _hf_key(key: str) -> str:
    if key in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[key]
    _, layer, rest = key.split(".", 2)  # "layers.{i}.{rest}"
    return f"model.layers.{layer}.{_LAYER_KEYS[rest]}"


def _check_keys(found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], *, what: str) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        raise AtollError(
            f"{what} does not match the model config: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}; check that config and weights belong together"
        )
    for key, shape in expected.items():
        if tuple(found[key].shape) != shape:
            raise AtollError(
                f"{what}: {key} has shape {tuple(found[key].shape)}, the config implies {shape}; "
                "check that config and weights belong together"
            )


def to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, *, arch: str | None = None
) -> dict[str, torch.Tensor]:
    """Rename an atoll `Transformer` state dict to HF keys for `arch` (default `arch_for(cfg)`).

    Tensors are shared, not copied. With tied embeddings `lm_head.weight` is left out, as HF
    saves it. Zero biases are added where the HF architecture has biases atoll's model lacks.
    Raises `AtollError` when keys or shapes do not match `cfg`.
    """
    arch = arch or arch_for(cfg)
    _check_arch(arch)
    expected = _expected_shapes(cfg)
    _check_keys(state_dict, expected, what="atoll state dict")
    out = {_hf_key(key): state_dict[key] for key in expected}
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}.self_attn."
        if arch == "qwen2" and not cfg.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = out[f"{prefix}{proj}.weight"]
                out[f"{prefix}{proj}.bias"] = weight.new_zeros(weight.shape[0])
        if arch == "llama" and cfg.qkv_bias:
            weight = out[f"{prefix}o_proj.weight"]
            out[f"{prefix}o_proj.bias"] = weight.new_zeros(weight.shape[0])
    return out


def from_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict`: HF keys to atoll keys, ready for `load_state_dict`.

    Ignores `rotary_emb.inv_freq` buffers and, with tied embeddings, `lm_head.weight`. Drops
    all-zero biases atoll's model lacks. Raises `AtollError` for missing, unexpected or
    misshapen tensors, or a nonzero bias atoll cannot represent.
    """
    from_hf = {_hf_key(key): key for key in _expected_shapes(cfg)}
    out: dict[str, torch.Tensor] = {}
    unexpected: dict[str, torch.Tensor] = {}
    for hf_key, tensor in hf_sd.items():
        if hf_key.endswith("rotary_emb.inv_freq"):
            continue
        if hf_key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        key = from_hf.get(hf_key)
        if key is not None:
            out[key] = tensor
            continue
        is_extra_bias = hf_key.endswith("self_attn.o_proj.bias") or (
            not cfg.qkv_bias and hf_key.endswith(tuple(_LAYER_KEYS[b] for b in _QKV_BIAS))
        )
        if is_extra_bias:
            if torch.count_nonzero(tensor) > 0:
                raise AtollError(
                    f"{hf_key} is nonzero but atoll's model has no such bias; this checkpoint cannot be loaded exactly"
                )
            continue
        unexpected[hf_key] = tensor
    if unexpected:
        raise AtollError(
            f"Hugging Face weights have tensors atoll does not know: {list(unexpected)[:4]}; "
            "check that the checkpoint is a Llama/Qwen2 causal LM matching its config.json"
        )
    _check_keys(out, _expected_shapes(cfg), what="Hugging Face weights")
    return out


def save_hf_model(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    arch: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> None:
    """Write an HF model directory: config.json, generation_config.json, model.safetensors.

    `state_dict` holds plain (not sharded) tensors, on any device; they are copied to contiguous
    CPU tensors in their own dtype, which config.json records. `arch` defaults to
    `arch_for(cfg)`. Creates `out_dir` if needed and overwrites those three files. Blocks on disk.
    """
    arch = arch or arch_for(cfg)
    tensors = {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in to_hf_state_dict(state_dict, cfg, arch=arch).items()
    }
    dtype = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg, arch=arch, bos_token_id=bos_token_id, eos_token_id=eos_token_id, torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation: dict[str, Any] = {"_from_model_config": True}
    if bos_token_id is not None:
        generation["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        generation["eos_token_id"] = eos_token_id
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _load_shards(directory: Path, index_name: str) -> dict[str, torch.Tensor]:
    index = json.loads((directory / index_name).read_text())
    shards = sorted(set(index["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(_load_weight_file(directory / shard))
    return tensors


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AtollError(f"weight file {path} is missing; the checkpoint is incomplete")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf_model(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF Llama/Qwen2 directory into a `ModelConfig` and an atoll state dict (CPU).

    Weights come from model.safetensors, a sharded model.safetensors.index.json, or
    pytorch_model.bin(.index.json), in the stored dtype. Raises `AtollError` when the directory,
    config.json or the weights are missing, or they do not fit atoll's model.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise AtollError(f"Hugging Face model directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise AtollError(f"{config_path} is missing; point at a Hugging Face model directory")
    cfg = model_config_from_hf(json.loads(config_path.read_text()))
    if (directory / "model.safetensors").is_file():
        hf_sd = _load_weight_file(directory / "model.safetensors")
    elif (directory / "model.safetensors.index.json").is_file():
        hf_sd = _load_shards(directory, "model.safetensors.index.json")
    elif (directory / "pytorch_model.bin").is_file():
        hf_sd = _load_weight_file(directory / "pytorch_model.bin")
    elif (directory / "pytorch_model.bin.index.json").is_file():
        hf_sd = _load_shards(directory, "pytorch_model.bin.index.json")
    else:
        raise AtollError(
            f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    return cfg, from_hf_state_dict(hf_sd, cfg)
