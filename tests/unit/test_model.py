"""Tests for atoll.model: config arithmetic and presets, the Transformer, KV cache, sampling."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from atoll.errors import AtollError
from atoll.model import PRESETS, KVCache, ModelConfig, Transformer, generate, get_preset

# Published parameter counts (model cards / HF safetensors metadata).
PUBLISHED_PARAMS = {
    "llama2-7b": 6.74e9,
    "llama2-70b": 68.98e9,
    "llama3-8b": 8.03e9,
    "llama3.2-1b": 1.24e9,
    "llama3.2-3b": 3.21e9,
    "llama3-70b": 70.55e9,
    "qwen1.5-72b": 72.29e9,
    "qwen2-72b": 72.71e9,
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # Tiny matmuls are far slower with intra-op threads on a busy 2-core machine (spin-waits).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(**overrides: object) -> ModelConfig:
    return dataclasses.replace(get_preset("tiny"), **overrides)


def make_model(cfg: ModelConfig, *, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    # Away from init's 1s and 0s, so norms and biases actually matter in comparisons.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_real_preset_param_count_matches_published(name: str) -> None:
    count = get_preset(name).num_params()
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02


def test_all_presets_listed() -> None:
    assert {"tiny", "demo"} | PUBLISHED_PARAMS.keys() == PRESETS.keys()
    assert get_preset("qwen2-72b").qkv_bias and not get_preset("llama3-8b").qkv_bias
    assert get_preset("llama3-8b").rope_theta == 500000.0


def test_demo_preset_is_about_5m() -> None:
    cfg = get_preset("demo")
    assert cfg.tie_embeddings and cfg.vocab_size == 8192
    assert 4.5e6 < cfg.num_params() < 6e6


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"qkv_bias": True},
        {"tie_embeddings": True},
        {"num_kv_heads": 4, "qkv_bias": True, "tie_embeddings": True},
    ],
)
def test_num_params_matches_module(overrides: dict[str, object]) -> None:
    cfg = tiny(**overrides)
    model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    vocab = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    assert cfg.num_non_embedding_params == cfg.num_params() - vocab


def test_get_preset_returns_copy_and_unknown_name_lists_known() -> None:
    get_preset("tiny").dim = 1
    assert PRESETS["tiny"].dim == 64
    with pytest.raises(AtollError, match="tiny.*demo"):
        get_preset("gpt5")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dim": 0}, "dim"),
        ({"num_heads": 3}, "num_heads"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"ffn_dim": 1.5}, "ffn_dim"),
    ],
)
def test_config_validation_names_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(AtollError, match=field):
        tiny(**overrides)


# -- transformer ------------------------------------------------------------------------------


def test_forward_shape_and_parameter_names() -> None:
    cfg = tiny(qkv_bias=True)
    model = Transformer(cfg)
    logits = model(torch.randint(0, cfg.vocab_size, (2, 7)))
    assert logits.shape == (2, 7, cfg.vocab_size)
    names = set(model.state_dict())
    assert {"embed.weight", "norm.weight", "lm_head.weight", "layers.1.attn.q_proj.bias"} <= names
    assert {"layers.0.attn_norm.weight", "layers.0.mlp.down_proj.weight"} <= names
    tied = Transformer(tiny(tie_embeddings=True))
    assert "lm_head.weight" not in tied.state_dict()


def test_forward_is_causal() -> None:
    cfg = tiny()
    model = make_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 10))
    changed = tokens.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_init_weights_deterministic_and_scaled() -> None:
    cfg = tiny()
    torch.manual_seed(3)
    a = Transformer(cfg)
    torch.manual_seed(3)
    b = Transformer(cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    torch.manual_seed(4)
    a.init_weights()
    torch.manual_seed(4)
    b.init_weights()
    assert torch.equal(a.embed.weight, b.embed.weight)
    assert torch.all(a.norm.weight == 1)
    big = Transformer(dataclasses.replace(cfg, dim=256, num_heads=4, ffn_dim=1024))
    assert big.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_init_on_meta_then_materialize() -> None:
    cfg = tiny()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.zeros(1, 3, dtype=torch.long))).all()


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": True}])
def test_kv_cache_matches_full_forward(overrides: dict[str, object]) -> None:
    cfg = tiny(**overrides)
    model = make_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        pieces = [model(tokens[:, :5], cache=cache)]  # prompt
        pieces.append(model(tokens[:, 5:8], cache=cache))  # a chunk continuing the cache
        pieces += [model(tokens[:, t : t + 1], cache=cache) for t in range(8, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_too_long_sequence_raises() -> None:
    cfg = tiny(max_seq_len=8)
    model = Transformer(cfg)
    with pytest.raises(AtollError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = KVCache(num_layers=cfg.num_layers, max_seq_len=cfg.max_seq_len)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(AtollError, match="max_seq_len"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_bfloat16_forward_runs() -> None:
    cfg = tiny()
    model = make_model(cfg).to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        logits = model(tokens)
        ref = make_model(cfg)(tokens)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref).abs().max() < 0.1


# -- generate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen_model() -> Transformer:
    return make_model(tiny(max_seq_len=48), seed=1)


def test_greedy_with_and_without_cache_agree(gen_model: Transformer) -> None:
    prompt = [1, 2, 3, 4]
    cached = list(generate(gen_model, prompt, max_new_tokens=12, temperature=0))
    uncached = list(generate(gen_model, prompt, max_new_tokens=12, temperature=0, use_cache=False))
    assert len(cached) == 12
    assert cached == uncached
    assert cached == list(generate(gen_model, prompt, max_new_tokens=12, temperature=0))


def test_greedy_matches_manual_argmax(gen_model: Transformer) -> None:
    ids = [5, 6, 7]
    out = list(generate(gen_model, ids, max_new_tokens=4, temperature=0))
    for token in out:
        with torch.no_grad():
            expected = int(gen_model(torch.tensor([ids]))[0, -1].argmax())
        assert token == expected
        ids.append(token)


def test_top_k_one_equals_greedy(gen_model: Transformer) -> None:
    prompt = [9, 8, 7]
    greedy = list(generate(gen_model, prompt, max_new_tokens=8, temperature=0))
    top1 = list(generate(gen_model, prompt, max_new_tokens=8, temperature=1.5, top_k=1, seed=5))
    assert top1 == greedy


def test_seed_reproduces_sampling(gen_model: Transformer) -> None:
    def sample(seed: int, **kw: object) -> list[int]:
        return list(generate(gen_model, [1, 2], max_new_tokens=10, seed=seed, **kw))

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(3, top_p=0.9, top_k=50) == sample(3, top_p=0.9, top_k=50)
    assert sample(3, repetition_penalty=1.3) == sample(3, repetition_penalty=1.3)
    assert sample(4, use_cache=False) == sample(4)


def test_tiny_top_p_equals_greedy(gen_model: Transformer) -> None:
    greedy = list(generate(gen_model, [3, 3], max_new_tokens=6, temperature=0))
    assert list(generate(gen_model, [3, 3], max_new_tokens=6, top_p=1e-6, seed=0)) == greedy


def test_stop_tokens_and_max_seq_len(gen_model: Transformer) -> None:
    greedy = list(generate(gen_model, [1, 2], max_new_tokens=10, temperature=0))
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    stopped = list(generate(gen_model, [1, 2], max_new_tokens=10, temperature=0, stop_token_ids={stop_at}))
    assert stopped == greedy[: first + 1]
    # 48 - 44 = 4 positions left.
    assert len(list(generate(gen_model, [1] * 44, max_new_tokens=10, temperature=0))) == 4


def test_generate_leaves_mode_and_grad_untouched(gen_model: Transformer) -> None:
    gen_model.train()
    stream = generate(gen_model, [1, 2], max_new_tokens=3)
    next(stream)
    assert gen_model.training and torch.is_grad_enabled()
    gen_model.eval()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_ids": []}, "empty"),
        ({"prompt_ids": [600]}, "vocabulary"),
        ({"prompt_ids": [1] * 49}, "max_seq_len"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_generate_rejects_bad_arguments(gen_model: Transformer, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"prompt_ids": [1], "max_new_tokens": 2} | kwargs
    with pytest.raises(AtollError, match=match):
        generate(gen_model, **args)  # type: ignore[arg-type]
