"""Adapters in PEFT's format on Hugging Face names, and merging them without PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from atoll.errors import AtollError
from atoll.finetune.config import LoraSection
from atoll.finetune.setup import lora_param_count
from atoll.model import ModelConfig, Transformer
from atoll.rundir.adapter import adapter_config, load_adapter, merge_adapter, to_hf_adapter

CFG = ModelConfig(vocab_size=64, dim=16, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=24, max_seq_len=32)


def test_atoll_adapter_names_become_hugging_face_names() -> None:
    a, b = torch.ones(2, 16), torch.zeros(8, 2)
    state = {
        "base_model.model.layers.1.attn.k_proj.lora_A.default.weight": a,
        "base_model.model.layers.1.attn.k_proj.lora_B.default.weight": b,
        "base_model.model.layers.0.mlp.down_proj.lora_A.weight": a,
        "base_model.model.layers.0.attn.k_proj.base_layer.weight": torch.zeros(8, 16),  # not an adapter
        "base_model.model.embed.weight": torch.zeros(64, 16),
    }
    assert sorted(to_hf_adapter(state)) == [
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight",
    ]
    with pytest.raises(AtollError, match="no Hugging Face counterpart"):
        to_hf_adapter({"base_model.model.embed.lora_A.default.weight": a})


def test_merge_adds_scaled_b_times_a_to_the_right_weights() -> None:
    torch.manual_seed(0)
    state = Transformer(CFG).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    a, b = torch.randn(4, 16), torch.randn(8, 4)  # v_proj: out = kv heads * head dim = 8
    tensors = {
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": a,
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": b,
    }
    config = adapter_config(LoraSection(rank=4, alpha=8.0, target_modules=["v_proj"]), base_model="x")
    merged = merge_adapter(state, config, tensors)
    assert torch.allclose(merged["layers.1.attn.v_proj.weight"], before["layers.1.attn.v_proj.weight"] + 2.0 * b @ a)
    assert all(torch.equal(merged[k], before[k]) for k in before if k != "layers.1.attn.v_proj.weight")
    rs = merge_adapter({k: v.clone() for k, v in before.items()}, {**config, "use_rslora": True}, tensors)
    assert torch.allclose(rs["layers.1.attn.v_proj.weight"], before["layers.1.attn.v_proj.weight"] + 4.0 * b @ a)


def test_merge_refuses_adapters_of_another_base() -> None:
    state = Transformer(CFG).state_dict()
    config = adapter_config(LoraSection(rank=2), base_model="x")
    wrong = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 99),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(16, 2),
    }
    with pytest.raises(AtollError, match="another base"):
        merge_adapter(state, config, wrong)
    with pytest.raises(AtollError, match="lacks lora_B"):
        merge_adapter(
            state, config, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 16)}
        )
    with pytest.raises(AtollError, match="does not have"):
        merge_adapter(
            state,
            config,
            {
                "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.ones(2, 16),
                "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.ones(16, 2),
            },
        )


def test_load_adapter_checks_its_files(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match="not a LoRA adapter"):
        load_adapter(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AtollError, match="only LORA"):
        load_adapter(tmp_path)


def test_adapter_parameter_count_matches_the_formula() -> None:
    lora = LoraSection(rank=3, target_modules=["q_proj", "k_proj", "down_proj"])
    per_layer = 3 * (16 + 16) + 3 * (16 + 8) + 3 * (24 + 16)
    assert lora_param_count(CFG, lora) == 2 * per_layer
