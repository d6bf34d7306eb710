import pytest

from atoll.model import get_preset
from atoll.planner.cost import matmul_params, training_flops_per_token


def test_flops_formula_by_hand() -> None:
    cfg = get_preset("tiny")
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.dim
    assert matmul_params(cfg) == n
    t = 128
    attn = cfg.num_layers * cfg.num_heads * cfg.head_dim * t
    assert training_flops_per_token(cfg, seq_len=t) == 6 * n + 12 * attn
    assert training_flops_per_token(cfg, seq_len=t, recompute=True) == 8 * n + 16 * attn


def test_llama2_7b_flops_match_the_6n_rule() -> None:
    cfg = get_preset("llama2-7b")
    # 6.74e9 parameters, of which the input embedding (32000 x 4096 = 0.13e9) does no matmul.
    f = training_flops_per_token(cfg, seq_len=4096)
    assert f == pytest.approx(6 * (6.74e9 - 0.131e9) + 12 * 32 * 4096 * 4096, rel=0.005)
