"""Cost formulas (pure arithmetic over a `ModelConfig`): the planner's and benchmarks' shared base."""

from __future__ import annotations

from atoll.model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matrix multiply per token.

    The blocks plus the output head (a real vocab x dim matmul, tied or not); the input embedding
    is a lookup and costs no FLOPs. At small sizes the head is a large share of the work, which
    is why it is counted (PaLM's 6N leaves it out; see docs/decisions.md).
    """
    return cfg.num_non_embedding_params + cfg.vocab_size * cfg.dim


def training_flops_per_token(cfg: ModelConfig, *, seq_len: int, recompute: bool = False) -> float:
    """Model FLOPs to train on one token: 6N + 12·L·H·Q·T (PaLM, appendix B).

    With full activation recomputation the forward runs twice: 8N + 16·L·H·Q·T. The attention term
    counts the full T x T score matrix, as PaLM does (causal masking is not subtracted).
    """
    n = matmul_params(cfg)
    attn = cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    if recompute:
        return 8.0 * n + 16.0 * attn
    return 6.0 * n + 12.0 * attn
