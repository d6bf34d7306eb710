"""Cost formulas: pure arithmetic, the planner's and benchmarks' shared base.

FLOPs per token (PaLM appendix B; Megatron-LM's Eq. 3), collective volumes and times (ring
algorithms), the pipeline bubble. Each function is a closed form that a test checks against a
hand-worked number. Nothing here imports torch: `ModelConfig` is only a type annotation, and a
`ModelShape` works wherever a `ModelConfig` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from atoll.model.config import ModelConfig


class _Shape(Protocol):
    num_layers: int
    num_heads: int
    vocab_size: int
    dim: int

    @property
    def head_dim(self) -> int: ...

    @property
    def num_non_embedding_params(self) -> int: ...


def matmul_params(cfg: ModelConfig | _Shape) -> int:
    """Parameters that take part in a matrix multiply per token.

    The blocks plus the output head (a real vocab x dim matmul, tied or not); the input embedding
    is a lookup and costs no FLOPs. At small sizes the head is a large share of the work, which
    is why it is counted (PaLM's 6N leaves it out; see docs/decisions.md).
    """
    return cfg.num_non_embedding_params + cfg.vocab_size * cfg.dim


def training_flops_per_token(cfg: ModelConfig | _Shape, *, seq_len: int, recompute: bool = False) -> float:
    """Model FLOPs to train on one token: 6N + 12·L·H·Q·T (PaLM, appendix B).

    With full activation recomputation the forward runs twice: 8N + 16·L·H·Q·T. The attention term
    counts the full T x T score matrix, as PaLM does (causal masking is not subtracted).
    """
    n = matmul_params(cfg)
    attn = cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    if recompute:
        return 8.0 * n + 16.0 * attn
    return 6.0 * n + 12.0 * attn


def megatron_flops_per_iteration(*, batch: int, seq_len: int, layers: int, hidden: int, vocab: int) -> float:
    """FLOPs of one iteration with full recomputation, as Megatron-LM counts them (SC'21, Eq. 3).

    96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)). The paper's TFLOP/s per GPU are this divided by
    (iteration seconds x GPUs).
    """
    b, s, h, v = batch, seq_len, hidden, vocab
    return 96.0 * b * s * layers * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * layers * h))


# ---------------------------------------------------------------- collectives (ring algorithms)


def allreduce_bytes_per_rank(size_bytes: float, num_ranks: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of `size_bytes`: 2(n-1)/n · size."""
    if num_ranks <= 1:
        return 0.0
    return 2.0 * (num_ranks - 1) / num_ranks * size_bytes


def allgather_bytes_per_rank(size_bytes: float, num_ranks: int) -> float:
    """Bytes each rank sends in a ring all-gather (or reduce-scatter) of a `size_bytes` buffer: (n-1)/n · size."""
    if num_ranks <= 1:
        return 0.0
    return (num_ranks - 1) / num_ranks * size_bytes


def ring_allreduce_seconds(
    size_bytes: float, num_ranks: int, *, bus_bytes_per_s: float, latency_s: float = 0.0
) -> float:
    """Time of a ring all-reduce: 2(n-1)/n · size / bus bandwidth + 2(n-1) hops of latency.

    `bus_bytes_per_s` is the bandwidth of the slowest link of the ring, as nccl-tests' "busbw".
    """
    if num_ranks <= 1:
        return 0.0
    return allreduce_bytes_per_rank(size_bytes, num_ranks) / bus_bytes_per_s + 2 * (num_ranks - 1) * latency_s


def ring_allgather_seconds(
    size_bytes: float, num_ranks: int, *, bus_bytes_per_s: float, latency_s: float = 0.0
) -> float:
    """Time of a ring all-gather or reduce-scatter of a `size_bytes` (full) buffer."""
    if num_ranks <= 1:
        return 0.0
    return allgather_bytes_per_rank(size_bytes, num_ranks) / bus_bytes_per_s + (num_ranks - 1) * latency_s


# ---------------------------------------------------------------- pipeline


def bubble_fraction(*, stages: int, micro_batches: int, interleave: int = 1) -> float:
    """Idle fraction of the ideal pipeline time: (p-1)/m for 1F1B, (p-1)/(v·m) interleaved (Narayanan 2021)."""
    if stages < 1 or micro_batches < 1 or interleave < 1:
        raise ValueError("stages, micro_batches and interleave must be >= 1")
    return (stages - 1) / (interleave * micro_batches)
