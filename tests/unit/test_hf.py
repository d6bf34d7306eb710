"""Tests for atoll.model.hf: logits agree with transformers' Llama/Qwen2 in both directions."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from atoll.errors import AtollError
from atoll.model import (
    ModelConfig,
    Transformer,
    arch_for,
    from_hf_state_dict,
    get_preset,
    hf_config,
    load_hf_model,
    model_config_from_hf,
    save_hf_model,
    to_hf_state_dict,
)

TOLERANCE = 1e-4

CASES = {
    # name: (config overrides, HF architecture)
    "llama-gqa-untied": ({}, "llama"),
    "llama-mha-tied": ({"num_kv_heads": 4, "tie_embeddings": True}, "llama"),
    "llama-attention-bias": ({"qkv_bias": True}, "llama"),
    "qwen2-gqa-untied": ({"qkv_bias": True, "rope_theta": 1e6, "norm_eps": 1e-6}, "qwen2"),
    "qwen2-tied": ({"qkv_bias": True, "tie_embeddings": True}, "qwen2"),
    "qwen2-no-bias": ({}, "qwen2"),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # Tiny matmuls are far slower with intra-op threads on a busy 2-core machine (spin-waits).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(**overrides: object) -> ModelConfig:
    return dataclasses.replace(get_preset("tiny"), max_seq_len=64, **overrides)


def random_atoll_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                # Away from 1 and 0, so a dropped norm or bias makes the comparison fail.
                param.add_(torch.randn_like(param) * 0.5)
            else:
                # Larger than init, so attention is far from uniform and rotary errors show.
                param.normal_(std=0.2)
    return model.eval()


def load_hf(directory: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def random_tokens(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_atoll_to_transformers_logits_match(case: str, tmp_path: Path) -> None:
    overrides, arch = CASES[case]
    cfg = tiny(**overrides)
    model = random_atoll_model(cfg)
    save_hf_model(model.state_dict(), cfg, tmp_path, arch=arch, bos_token_id=1, eos_token_id=2)

    hf_model = load_hf(tmp_path)
    expected_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert type(hf_model).__name__ == expected_class
    tokens = random_tokens(cfg)
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(tokens).logits
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert (ours - theirs).abs().max().item() <= TOLERANCE

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in saved) == (not cfg.tie_embeddings)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


@pytest.mark.parametrize(("arch", "tie"), [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)])
def test_transformers_to_atoll_logits_match(arch: str, tie: bool, tmp_path: Path) -> None:
    config_cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    hf_cfg = config_cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        hf_cfg, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.5)
    hf_model.save_pretrained(tmp_path)

    cfg, state_dict = load_hf_model(tmp_path)
    assert cfg.rope_theta == 50000.0 and cfg.num_kv_heads == 2 and cfg.tie_embeddings == tie
    assert cfg.qkv_bias == (arch == "qwen2")
    model = Transformer(cfg)
    model.load_state_dict(state_dict)
    model.eval()
    tokens = random_tokens(cfg)
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(tokens).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_state_dict_round_trip_is_exact() -> None:
    for overrides in ({}, {"qkv_bias": True, "tie_embeddings": True}):
        cfg = tiny(**overrides)
        sd = random_atoll_model(cfg).state_dict()
        for arch in ("llama", "qwen2"):
            back = from_hf_state_dict(to_hf_state_dict(sd, cfg, arch=arch), cfg)
            assert back.keys() == sd.keys()
            assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_from_hf_ignores_inv_freq_and_tolerates_missing_tied_head() -> None:
    cfg = tiny(tie_embeddings=True)
    hf_sd = to_hf_state_dict(Transformer(cfg).state_dict(), cfg)
    assert "lm_head.weight" not in hf_sd
    hf_sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    hf_sd["model.rotary_emb.inv_freq"] = torch.ones(8)
    hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    assert "embed.weight" in from_hf_state_dict(hf_sd, cfg)


def test_from_hf_rejects_mismatches() -> None:
    cfg = tiny()
    hf_sd = to_hf_state_dict(Transformer(cfg).state_dict(), cfg)
    with pytest.raises(AtollError, match="missing"):
        from_hf_state_dict({k: v for k, v in hf_sd.items() if k != "lm_head.weight"}, cfg)
    with pytest.raises(AtollError, match="does not know"):
        from_hf_state_dict(hf_sd | {"model.layers.0.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(AtollError, match="nonzero"):
        from_hf_state_dict(hf_sd | {"model.layers.0.self_attn.o_proj.bias": torch.ones(64)}, cfg)
    with pytest.raises(AtollError, match="shape"):
        from_hf_state_dict(hf_sd, dataclasses.replace(cfg, ffn_dim=64))


def test_hf_config_round_trip_and_arch_choice() -> None:
    for name in ("tiny", "demo", "llama3-70b", "qwen2-72b", "qwen1.5-72b"):
        cfg = get_preset(name)
        config = hf_config(cfg, bos_token_id=1, eos_token_id=2)
        assert config["model_type"] == arch_for(cfg)
        assert model_config_from_hf(config) == cfg
    llama_bias = hf_config(tiny(qkv_bias=True), arch="llama")
    assert llama_bias["attention_bias"] is True
    assert model_config_from_hf(llama_bias).qkv_bias
    assert hf_config(get_preset("qwen2-72b"))["architectures"] == ["Qwen2ForCausalLM"]


def test_model_config_from_hf_errors() -> None:
    base = hf_config(tiny())
    with pytest.raises(AtollError, match="'mistral'.*llama, qwen2"):
        model_config_from_hf(base | {"model_type": "mistral"})
    with pytest.raises(AtollError, match="rope scaling"):
        model_config_from_hf(base | {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(AtollError, match="hidden_size"):
        model_config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(AtollError, match="mlp_bias"):
        model_config_from_hf(base | {"mlp_bias": True})


def test_load_hf_model_missing_files(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match="does not exist"):
        load_hf_model(tmp_path / "nope")
    with pytest.raises(AtollError, match="config.json"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny())))
    with pytest.raises(AtollError, match="no weights"):
        load_hf_model(tmp_path)


def test_load_sharded_and_bin(tmp_path: Path) -> None:
    cfg = tiny()
    sd = random_atoll_model(cfg).state_dict()
    save_hf_model(sd, cfg, tmp_path / "single")
    hf_sd = load_file(str(tmp_path / "single" / "model.safetensors"))
    config_text = (tmp_path / "single" / "config.json").read_text()

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(config_text)
    keys = sorted(hf_sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[:10],
        "model-00002-of-00002.safetensors": keys[10:],
    }
    weight_map: dict[str, str] = {}
    for file, names in shards.items():
        save_file({k: hf_sd[k] for k in names}, str(sharded / file))
        weight_map.update(dict.fromkeys(names, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text(config_text)
    torch.save(hf_sd, binary / "pytorch_model.bin")

    for directory in (sharded, binary):
        loaded_cfg, loaded = load_hf_model(directory)
        assert loaded_cfg == cfg
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)
