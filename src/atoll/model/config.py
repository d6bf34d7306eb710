"""Shape of a Llama-family decoder, and named presets.

`ModelConfig` is pure data: it imports no torch, so the planner can reason about 70B shapes
(`num_params`) on a laptop. Real-model presets copy the published Hugging Face `config.json`
values; they are never instantiated in tests, only counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from atoll.errors import AtollError

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_dim",
    "max_seq_len",
)


@dataclass
class ModelConfig:
    """Hyperparameters of a Llama-family decoder (Llama 2/3, Qwen 1.5/2).

    Validated on construction: a bad value raises `AtollError` naming the field.
    """

    vocab_size: int
    """Number of token ids; the embedding and output head have this many rows."""
    dim: int
    """Width of the residual stream (HF `hidden_size`)."""
    num_layers: int
    """Number of decoder blocks."""
    num_heads: int
    """Query heads per attention layer; `dim` must be divisible by it."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention); must divide `num_heads`."""
    ffn_dim: int
    """Hidden width of the SwiGLU MLP (HF `intermediate_size`)."""
    max_seq_len: int = 2048
    """Longest sequence (prompt plus generated tokens) the model accepts."""
    rope_theta: float = 10000.0
    """Base of the rotary-embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's square root."""
    qkv_bias: bool = False
    """Whether the q/k/v projections carry a bias (Qwen does; the output projection never does)."""
    tie_embeddings: bool = False
    """Whether the output head reuses the token-embedding matrix."""

    def __post_init__(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise AtollError(f"model.{name} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads != 0:
            raise AtollError(
                f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads}); change one of them"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise AtollError(
                f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads "
                f"({self.num_kv_heads}); pick num_kv_heads among its divisors"
            )
        if self.head_dim % 2 != 0:
            # Rotary embeddings rotate pairs of channels.
            raise AtollError(
                f"model.dim / model.num_heads must be even for rotary embeddings, got "
                f"{self.head_dim}; change model.dim or model.num_heads"
            )
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise AtollError(f"model.{name} must be a positive number, got {value!r}")
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise AtollError(f"model.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.dim // self.num_heads

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Exact parameter count of `atoll.model.Transformer` with this config, by arithmetic.

        With `include_embeddings=False` the vocabulary matrices (token embedding and, when
        untied, the output head) are left out: what remains is the blocks and the final norm.
        A tied head is counted once.
        """
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        attn = self.dim * q_out + 2 * self.dim * kv_out + q_out * self.dim
        if self.qkv_bias:
            attn += q_out + 2 * kv_out
        mlp = 3 * self.dim * self.ffn_dim
        norms = 2 * self.dim
        total = self.num_layers * (attn + mlp + norms) + self.dim  # + final norm
        if include_embeddings:
            total += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return total

    @property
    def num_non_embedding_params(self) -> int:
        """`num_params(include_embeddings=False)`."""
        return self.num_params(include_embeddings=False)


PRESETS: dict[str, ModelConfig] = {
    # For tests: builds and runs in milliseconds on a CPU.
    "tiny": ModelConfig(
        vocab_size=512,
        dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=128,
        max_seq_len=128,
    ),
    # 5,245,184 parameters: trains on a laptop CPU in minutes.
    "demo": ModelConfig(
        vocab_size=8192,
        dim=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        ffn_dim=768,
        max_seq_len=256,
        tie_embeddings=True,
    ),
    # Real shapes, from the published Hugging Face config.json files.
    "llama2-7b": ModelConfig(
        vocab_size=32000,
        dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        ffn_dim=11008,
        max_seq_len=4096,
        rope_theta=10000.0,
        norm_eps=1e-5,
    ),
    "llama2-70b": ModelConfig(
        vocab_size=32000,
        dim=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        ffn_dim=28672,
        max_seq_len=4096,
        rope_theta=10000.0,
        norm_eps=1e-5,
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_dim=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        norm_eps=1e-5,
    ),
    # Llama 3.2 (tied embeddings). Its long-context rope scaling is not modelled: max_seq_len is
    # the 8,192 tokens the unscaled rotary frequencies were trained for. Sized for one GPU.
    "llama3.2-1b": ModelConfig(
        vocab_size=128256,
        dim=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        ffn_dim=8192,
        max_seq_len=8192,
        rope_theta=500000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    ),
    "llama3.2-3b": ModelConfig(
        vocab_size=128256,
        dim=3072,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        ffn_dim=8192,
        max_seq_len=8192,
        rope_theta=500000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    ),
    "llama3-70b": ModelConfig(
        vocab_size=128256,
        dim=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        ffn_dim=28672,
        max_seq_len=8192,
        rope_theta=500000.0,
        norm_eps=1e-5,
    ),
    # Qwen1.5-72B has no grouped-query attention (64 kv heads).
    "qwen1.5-72b": ModelConfig(
        vocab_size=152064,
        dim=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=64,
        ffn_dim=24576,
        max_seq_len=32768,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        qkv_bias=True,
    ),
    "qwen2-72b": ModelConfig(
        vocab_size=152064,
        dim=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        ffn_dim=29568,
        max_seq_len=32768,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        qkv_bias=True,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the preset `name` (callers may mutate it freely).

    Raises `AtollError` listing the known presets when `name` is not one of them.
    """
    try:
        preset = PRESETS[name]
    except KeyError:
        known = ", ".join(PRESETS)
        raise AtollError(f"unknown model preset {name!r}; choose one of: {known}") from None
    return dataclasses.replace(preset)
