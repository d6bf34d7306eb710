"""The planner's view of a model: the shape that sets FLOPs, memory and bytes on the wire.

`ModelShape` covers both families the planner reasons about: Llama-style decoders (SwiGLU,
RMSNorm, rotary, grouped-query attention; what `atoll.model` trains) and GPT-style decoders
(GELU MLP of 4h, biases, LayerNorm, learned positions; Megatron-LM's validation models).
`resolve_model` turns a `--model` argument into a shape without importing torch unless the
argument names one of `atoll.model`'s presets.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from atoll.errors import AtollError

if TYPE_CHECKING:
    from atoll.model.config import ModelConfig


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a decoder-only transformer. Validated on construction (`AtollError`)."""

    name: str
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int = 4096
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """``swiglu``: gate, up and down matrices (Llama); ``gelu``: up and down (GPT)."""
    qkv_bias: bool = False
    linear_biases: bool = False
    """GPT-style biases on every linear layer and LayerNorm (adds ~13h parameters per layer)."""
    tie_embeddings: bool = False
    learned_positions: bool = False

    def __post_init__(self) -> None:
        for field in ("num_layers", "dim", "num_heads", "num_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise AtollError(f"model {self.name}: {field} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise AtollError(
                f"model {self.name}: dim ({self.dim}) must be divisible by num_heads ({self.num_heads}) "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (or value) projection."""
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.mlp == "swiglu" else 2

    def layer_params(self) -> int:
        """Parameters of one decoder block."""
        return _layer_params(self)

    def _count_layer_params(self) -> int:
        h = self.dim
        attn = 2 * h * h + 2 * h * self.kv_dim
        mlp = self.mlp_matrices * h * self.ffn_dim
        norms = 2 * h
        extra = 0
        if self.qkv_bias or self.linear_biases:
            extra += h + 2 * self.kv_dim
        if self.linear_biases:
            extra += h + (self.mlp_matrices - 1) * self.ffn_dim + h + 2 * h  # out, MLP, LayerNorm biases
        return attn + mlp + norms + extra

    def embedding_params(self) -> int:
        """Token embedding, output head (when untied) and learned positions."""
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        if self.learned_positions:
            emb += self.max_seq_len * self.dim
        return emb

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Total parameters (blocks, final norm and, optionally, embeddings)."""
        final_norm = self.dim * (2 if self.linear_biases else 1)
        total = self.num_layers * self.layer_params() + final_norm
        return total + (self.embedding_params() if include_embeddings else 0)

    @property
    def num_non_embedding_params(self) -> int:
        """`num_params(include_embeddings=False)` (the name `atoll.model.ModelConfig` uses)."""
        return self.num_params(include_embeddings=False)

    def matmul_params(self) -> int:
        """Parameters in a matmul per token: the blocks plus the output head (see cost.matmul_params)."""
        return self.num_params(include_embeddings=False) + self.vocab_size * self.dim

    def tensors(self) -> list[tuple[tuple[int, ...], int]]:
        """(shape, count) of every parameter tensor, as `atoll.model` lays them out (weights are
        (out, in)): what a WAN codec encodes one at a time. Their elements sum to `num_params()`."""
        h, kv, f, layers = self.dim, self.kv_dim, self.ffn_dim, self.num_layers
        out: list[tuple[tuple[int, ...], int]] = [
            ((h, h), 2 * layers),  # query and output projections
            ((kv, h), 2 * layers),  # key and value projections
            ((f, h), (self.mlp_matrices - 1) * layers),  # gate and up (SwiGLU), up (GELU)
            ((h, f), layers),  # down
            ((self.vocab_size, h), 1 if self.tie_embeddings else 2),  # embedding and output head
            ((h,), 2 * layers + 1),  # the two norms of each block and the final one
        ]
        if self.learned_positions:
            out.append(((self.max_seq_len, h), 1))
        if self.qkv_bias or self.linear_biases:
            out += [((h,), layers), ((kv,), 2 * layers)]
        if self.linear_biases:
            # output and down-projection biases, up-projection biases, the norms' biases (2 per block, final)
            out += [((h,), 2 * layers), ((f,), (self.mlp_matrices - 1) * layers), ((h,), 2 * layers + 1)]
        return out


@functools.lru_cache(maxsize=256)
def _layer_params(shape: ModelShape) -> int:
    return shape._count_layer_params()


def shape_from_config(cfg: ModelConfig, *, name: str) -> ModelShape:
    """The shape of an `atoll.model.ModelConfig` (duck-typed: no torch import needed here)."""
    return ModelShape(
        name=name,
        num_layers=cfg.num_layers,
        dim=cfg.dim,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        ffn_dim=cfg.ffn_dim,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
        mlp="swiglu",
        qkv_bias=cfg.qkv_bias,
        tie_embeddings=cfg.tie_embeddings,
    )


def gpt_shape(name: str, *, layers: int, dim: int, heads: int, vocab: int = 51200, seq_len: int = 2048) -> ModelShape:
    """A GPT-3-style model as Megatron-LM builds it (GELU MLP of 4h, biases, tied embeddings)."""
    return ModelShape(
        name=name,
        num_layers=layers,
        dim=dim,
        num_heads=heads,
        num_kv_heads=heads,
        ffn_dim=4 * dim,
        vocab_size=vocab,
        max_seq_len=seq_len,
        mlp="gelu",
        linear_biases=True,
        tie_embeddings=True,
        learned_positions=True,
    )


# Shapes the planner knows beyond atoll.model's presets (it only counts them, never builds them).
PLANNER_PRESETS: dict[str, ModelShape] = {
    # DiLoCoX trained a "modified Qwen1.5-107B" whose exact shape is not published; this is
    # Qwen1.5-72B deepened from 80 to 120 layers, which has 107.1e9 parameters.
    "qwen1.5-107b": ModelShape(
        name="qwen1.5-107b",
        num_layers=120,
        dim=8192,
        num_heads=64,
        num_kv_heads=64,
        ffn_dim=24576,
        vocab_size=152064,
        max_seq_len=32768,
        qkv_bias=True,
    ),
    # A 10B Llama-3-shaped model (llama3-8b deepened to 42 layers: 10.2e9), INTELLECT-1's size.
    "llama3-10b": ModelShape(
        name="llama3-10b",
        num_layers=42,
        dim=4096,
        num_heads=32,
        num_kv_heads=8,
        ffn_dim=14336,
        vocab_size=128256,
        max_seq_len=8192,
    ),
    **{
        s.name: s
        for s in (
            gpt_shape("gpt-1.7b", layers=24, dim=2304, heads=24),
            gpt_shape("gpt-3.6b", layers=30, dim=3072, heads=32),
            gpt_shape("gpt-7.5b", layers=36, dim=4096, heads=32),
            gpt_shape("gpt-18b", layers=40, dim=6144, heads=48),
            gpt_shape("gpt-39b", layers=48, dim=8192, heads=64),
            gpt_shape("gpt-76b", layers=60, dim=10240, heads=80),
            gpt_shape("gpt-145b", layers=80, dim=12288, heads=96),
            gpt_shape("gpt-310b", layers=96, dim=16384, heads=128),
            gpt_shape("gpt-530b", layers=105, dim=20480, heads=128),
            gpt_shape("gpt-1t", layers=128, dim=25600, heads=160),
        )
    },
}


def resolve_model(spec: str) -> ModelShape:
    """Turn ``--model`` into a shape: a planner preset, an `atoll.model` preset, or a YAML file.

    The file holds ModelConfig fields (``dim: 4096, num_layers: 32, ...``), or a run config whose
    ``model:`` section names a preset plus overrides. Raises `AtollError` naming the choices.
    """
    if spec in PLANNER_PRESETS:
        return PLANNER_PRESETS[spec]
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return _shape_from_file(path)
    from atoll.model.config import PRESETS, get_preset  # imports torch via atoll.model's package

    if spec in PRESETS:
        return shape_from_config(get_preset(spec), name=spec)
    known = sorted({*PLANNER_PRESETS, *PRESETS})
    raise AtollError(f"unknown model {spec!r}: give a preset ({', '.join(known)}) or a model YAML file")


def _shape_from_file(path: Path) -> ModelShape:
    from atoll.config.load import read_yaml

    data: dict[str, Any] = read_yaml(path)
    section = data.get("model", data) if isinstance(data.get("model"), dict) else data
    section = dict(section)
    preset = section.pop("preset", None)
    section.pop("init_from", None)
    for ignored in ("rope_theta", "norm_eps"):  # numerics, not shape
        section.pop(ignored, None)
    name = section.pop("name", None) or path.stem
    if preset is not None:
        base = resolve_model(str(preset))
        overrides = {k: v for k, v in section.items() if v is not None}
        try:
            return dataclasses.replace(base, name=str(name), **overrides)
        except TypeError as exc:
            raise AtollError(f"model file {path}: {exc}") from None
    try:
        return ModelShape(name=str(name), **section)
    except TypeError as exc:
        raise AtollError(
            f"model file {path}: {exc} (fields: dim, num_layers, num_heads, num_kv_heads, ffn_dim, vocab_size, ...)"
        ) from None
