"""A Llama-family decoder (Llama 2/3, Qwen 1.5/2) in plain torch.

The model file imports only torch; parallelism is applied from outside. Shapes in comments use
B batch, T new tokens, S tokens attended to, H query heads, K kv heads, D head dim.

Parameter names (the keys of `Transformer.state_dict()`):

    embed.weight                        (vocab_size, dim)   token embedding
    layers.{i}.attn_norm.weight         (dim,)              RMSNorm before attention
    layers.{i}.attn.q_proj.weight       (H*D, dim)          (+ .bias when qkv_bias)
    layers.{i}.attn.k_proj.weight       (K*D, dim)          (+ .bias when qkv_bias)
    layers.{i}.attn.v_proj.weight       (K*D, dim)          (+ .bias when qkv_bias)
    layers.{i}.attn.o_proj.weight       (dim, H*D)
    layers.{i}.mlp_norm.weight          (dim,)              RMSNorm before the MLP
    layers.{i}.mlp.gate_proj.weight     (ffn_dim, dim)
    layers.{i}.mlp.up_proj.weight       (ffn_dim, dim)
    layers.{i}.mlp.down_proj.weight     (dim, ffn_dim)
    norm.weight                         (dim,)              final RMSNorm
    lm_head.weight                      (vocab_size, dim)   absent when tie_embeddings

With `tie_embeddings` there is no `lm_head` module: the logits use `embed.weight` directly, so
the state dict holds the shared matrix exactly once.

A pipeline stage is a `Transformer` that holds only some of these: `Transformer(cfg, layers=[2, 3],
embed=False, head=True)` holds `layers.2.*`, `layers.3.*`, `norm.weight` and `lm_head.weight`
under the very names the full model gives them, so optimizer state, checkpoints and exports need
no renaming across layouts. Its forward takes token ids when it holds the embedding, else hidden
states (B, T, dim), and returns logits when it holds the head, else hidden states.

Numerics follow Hugging Face's `LlamaForCausalLM`: RMSNorm in fp32 cast back to the input dtype,
rotary embeddings in the "rotate_half" (non-interleaved) layout so HF q/k weights load without
permutation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from atoll.errors import AtollError
from atoll.model.config import ModelConfig


class KVCache:
    """Per-layer key/value buffers for incremental decoding, plus how many positions are filled.

    Create one per sequence batch (`Transformer.new_cache()` or directly), pass it to every
    `Transformer.forward` call of that generation; each call appends its tokens. Buffers are
    allocated lazily on first use with the keys' batch size, dtype and device. Not thread-safe.
    """

    def __init__(self, *, num_layers: int, max_seq_len: int) -> None:
        self.num_layers = num_layers
        self.max_seq_len = max_seq_len
        self.length = 0
        """Positions already written; the next token gets position `length`."""
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `keys`/`values` (B, K, T, D) at positions [length, length+T) of `layer`.

        Returns all keys and values of that layer so far, (B, K, length+T, D). Does not advance
        `length`: the model does that once after the last layer.
        """
        batch, num_kv_heads, num_new, head_dim = keys.shape
        end = self.length + num_new
        if end > self.max_seq_len:
            raise AtollError(
                f"KV cache is full: {end} positions needed, max_seq_len is {self.max_seq_len}; "
                "start a new cache or raise model.max_seq_len"
            )
        cached_k = self._keys[layer]
        if cached_k is None:
            shape = (batch, num_kv_heads, self.max_seq_len, head_dim)
            cached_k = keys.new_zeros(shape)
            self._keys[layer] = cached_k
            self._values[layer] = values.new_zeros(shape)
        elif cached_k.shape[0] != batch:
            raise AtollError(
                f"KV cache was filled with batch size {cached_k.shape[0]}, got {batch}; use one cache per batch"
            )
        cached_v = self._values[layer]
        assert cached_v is not None
        cached_k[:, :, self.length : end] = keys
        cached_v[:, :, self.length : end] = values
        return cached_k[:, :, :end], cached_v[:, :, :end]

    def reset(self) -> None:
        """Forget all positions; buffers are kept and overwritten."""
        self.length = 0


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back to the input dtype (as HF does)."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(positions: torch.Tensor, *, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (T, D) in fp32, for the given integer positions (T,).

    Recomputed per forward rather than cached as buffers: it is tiny next to the matmuls, and it
    survives meta-device initialization and `.to(bfloat16)` without losing precision.
    """
    channel = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float)
    inv_freq = 1.0 / (theta ** (channel / head_dim))  # (D/2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, D): the "rotate_half" layout
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, heads, T, D) by the angles whose cos/sin are (T, D); in fp32, cast back."""
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        q_out = cfg.num_heads * cfg.head_dim
        kv_out = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, q_out, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, kv_out, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        *,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        batch, num_new, _ = x.shape
        # Head counts come from the tensors (-1), so tensor parallelism can shard heads.
        q = self.q_proj(x).view(batch, num_new, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(batch, num_new, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(batch, num_new, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)  # (B, K, S, D), S = start + T

        mask: torch.Tensor | None = None
        if start == 0:
            is_causal = num_new > 1
        else:
            # SDPA's is_causal aligns the mask top-left, which is wrong when earlier positions
            # come from the cache; new token i may see every key up to position start + i.
            is_causal = False
            if num_new > 1:
                key_pos = torch.arange(start + num_new, device=x.device)
                query_pos = torch.arange(start, start + num_new, device=x.device)
                mask = key_pos[None, :] <= query_pos[:, None]  # (T, S)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
        )  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_new, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        *,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos=cos, sin=sin, cache=cache, layer=layer)
        return x + self.mlp(self.mlp_norm(x))


class Layers(nn.Module):
    """The decoder blocks a model holds, each registered under its index in the full model.

    Behaves like the `nn.ModuleList` of a full model: iteration in order, `len`, and `layers[k]`
    / `layers[k] = wrapped` by position among the blocks held (so `for k, b in
    enumerate(layers): layers[k] = wrap(b)` works on any part). A pipeline stage's blocks keep
    their index in the full model as their name, so their parameters are `layers.{i}.*` whatever
    the layout; `block(i)` and `items()` go by that index.
    """

    def __init__(self, blocks: dict[int, nn.Module]) -> None:
        super().__init__()
        for index in sorted(blocks):
            self.add_module(str(index), blocks[index])

    def indices(self) -> list[int]:
        """Indices (in the full model) of the blocks held, ascending."""
        return [int(name) for name in self._modules]

    def items(self) -> list[tuple[int, nn.Module]]:
        """(index in the full model, block) pairs, ascending."""
        return [(int(name), block) for name, block in self._modules.items() if block is not None]

    def block(self, index: int) -> nn.Module:
        """The block of layer `index` of the full model; IndexError when this part does not hold it."""
        block = self._modules.get(str(index))
        if block is None:
            raise IndexError(f"layer {index} is not held here (layers {self.indices()})")
        return block

    def _name_at(self, position: int) -> str:
        names = list(self._modules)
        if not -len(names) <= position < len(names):
            raise IndexError(f"position {position} out of range: {len(names)} blocks held (layers {self.indices()})")
        return names[position]

    def __getitem__(self, position: int) -> nn.Module:
        block = self._modules[self._name_at(position)]
        assert block is not None
        return block

    def __setitem__(self, position: int, block: nn.Module) -> None:
        """Replace a held block (e.g. by a wrapped one) under the same name."""
        self._modules[self._name_at(position)] = block

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(block for block in self._modules.values() if block is not None)

    def __len__(self) -> int:
        return len(self._modules)


class Transformer(nn.Module):
    """Llama-family decoder-only language model; see the module docstring for parameter names.

    By default the whole model. A pipeline stage passes `layers` (indices into the full model),
    `embed` (holds the token embedding: the first stage) and `head` (holds the final norm and the
    output projection: the last stage). Raises `AtollError` for a layer index out of range, and
    for tied embeddings split between stages (the shared matrix would have to live twice).

    Weights are initialized by `init_weights()` at construction (a no-op on the meta device;
    call it again after `to_empty`).
    """

    def __init__(
        self, cfg: ModelConfig, *, layers: Sequence[int] | None = None, embed: bool = True, head: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg
        indices = list(range(cfg.num_layers)) if layers is None else sorted(set(layers))
        if any(not 0 <= i < cfg.num_layers for i in indices):
            raise AtollError(f"layers {indices} are not all in 0..{cfg.num_layers - 1} (model.num_layers)")
        if cfg.tie_embeddings and embed != head:
            raise AtollError(
                "tied embeddings cannot be split between pipeline stages (the first stage embeds, the last "
                "projects with the same matrix); set model.tie_embeddings: false to train with pp > 1"
            )
        # A part builds (and drops, one at a time) the modules it does not hold, so that the
        # constructors draw the random numbers the full model's do and `init_weights` starts from
        # the same generator state: under the same seed a stage's values are the full model's.
        # Free under a meta device, where a large model is built before `to_empty`.
        self.embed: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        if not embed:
            self.embed = None
        blocks: dict[int, nn.Module] = {}
        for i in range(cfg.num_layers):
            block = Block(cfg)
            if i in indices:
                blocks[i] = block
        self.layers = Layers(blocks)
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, eps=cfg.norm_eps) if head else None
        self.lm_head: nn.Linear | None = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if not head:
            self.lm_head = None
        self.init_weights()

    @property
    def is_whole(self) -> bool:
        """True when this module holds the whole model (not a pipeline stage's part)."""
        return self.embed is not None and self.norm is not None and len(self.layers) == self.cfg.num_layers

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reinitialize every parameter in place; deterministic under `torch.manual_seed`.

        Normal(0, 0.02) for embeddings and projections; the residual-branch outputs (attention
        `o_proj`, MLP `down_proj`) get std 0.02 / sqrt(2 * num_layers) so the residual stream's
        variance does not grow with depth. Norm weights are 1, biases 0.

        A pipeline stage draws, in the full model's order, the random numbers of the parts it
        does not hold too (and throws them away), so under the same seed every stage holds
        exactly the values the full model would.
        """
        cfg = self.cfg
        std = 0.02
        residual_std = std / math.sqrt(2 * cfg.num_layers)
        like = next(self.parameters(), None)
        if like is None or like.is_meta:
            return
        held = dict(self.layers.items())
        # Nothing after the last part held needs drawing: the random stream past it is not read.
        last_held = max(held, default=-1) if self.norm is None else cfg.num_layers

        def draw(param: torch.Tensor | None, shape: tuple[int, ...], std: float) -> None:
            if param is not None:
                nn.init.normal_(param, std=std)
            else:
                torch.empty(shape, dtype=like.dtype, device=like.device).normal_(std=std)

        draw(self.embed.weight if self.embed is not None else None, (cfg.vocab_size, cfg.dim), std)
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for i in range(min(cfg.num_layers, last_held + 1)):
            block = held.get(i)
            if block is None:
                for shape, sd in (
                    ((q_out, cfg.dim), std),
                    ((kv_out, cfg.dim), std),
                    ((kv_out, cfg.dim), std),
                    ((cfg.dim, q_out), residual_std),
                    ((cfg.ffn_dim, cfg.dim), std),
                    ((cfg.ffn_dim, cfg.dim), std),
                    ((cfg.dim, cfg.ffn_dim), residual_std),
                ):
                    draw(None, shape, sd)
                continue
            assert isinstance(block, Block)
            block.attn_norm.weight.fill_(1.0)
            block.mlp_norm.weight.fill_(1.0)
            attn = block.attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.normal_(proj.weight, std=std)
                if proj.bias is not None:
                    proj.bias.zero_()
            nn.init.normal_(attn.o_proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.gate_proj.weight, std=std)
            nn.init.normal_(block.mlp.up_proj.weight, std=std)
            nn.init.normal_(block.mlp.down_proj.weight, std=residual_std)
        if self.norm is not None:
            self.norm.weight.fill_(1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)

    def new_cache(self) -> KVCache:
        """An empty KV cache sized for this model's layers and `max_seq_len`."""
        return KVCache(num_layers=self.cfg.num_layers, max_seq_len=self.cfg.max_seq_len)

    def forward(
        self,
        inputs: torch.Tensor,
        *,
        cache: KVCache | None = None,
        layers: Sequence[int] | None = None,
        embed: bool | None = None,
        head: bool | None = None,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T), for the whole model.

        Without `cache`, positions are 0..T-1. With `cache`, the tokens continue the cached
        sequence at position `cache.length`, and the cache is extended by T: a prompt followed by
        one token at a time gives the same logits as one uncached forward over the whole sequence.
        Raises `AtollError` when the sequence would pass `max_seq_len`.

        A pipeline stage runs a part: `embed` (default: whether this module holds the embedding)
        takes token ids (B, T), else `inputs` are hidden states (B, T, dim); then the held blocks
        whose index is in `layers` (default: all held), in order; then, with `head` (default:
        whether this module holds the head), the final norm and logits, else the hidden states.
        `seq_len` is the length the rotary positions cover when the hidden states are a slice of
        the sequence (sequence parallelism hands a stage its rank's slice); default T.
        """
        embed = self.embed is not None if embed is None else embed
        head = self.norm is not None if head is None else head
        if embed and self.embed is None or head and self.norm is None:
            raise AtollError("this part of the model holds no embedding or no output head to run")
        if inputs.dim() != (2 if embed else 3):
            what = "tokens must have shape (batch, seq)" if embed else "hidden states must have shape (batch, seq, dim)"
            raise AtollError(f"{what}, got {tuple(inputs.shape)}")
        num_new = inputs.shape[1] if seq_len is None else seq_len
        start = cache.length if cache is not None else 0
        if start + num_new > self.cfg.max_seq_len:
            raise AtollError(
                f"sequence of {start + num_new} tokens exceeds model.max_seq_len "
                f"({self.cfg.max_seq_len}); shorten the input or raise max_seq_len"
            )
        positions = torch.arange(start, start + num_new, device=inputs.device)
        cos, sin = rotary_tables(positions, head_dim=self.cfg.head_dim, theta=self.cfg.rope_theta)

        blocks = self.layers.items() if layers is None else [(i, self.layers.block(i)) for i in layers]
        x = self.embed(inputs) if embed and self.embed is not None else inputs  # (B, T, dim)
        for i, block in blocks:
            x = block(x, cos=cos, sin=sin, cache=cache, layer=i)
        if cache is not None:
            cache.length = start + num_new
        if not head or self.norm is None:
            return x  # a pipeline stage before the last hands on hidden states
        x = self.norm(x)
        if self.lm_head is None:
            assert self.embed is not None  # tied embeddings are never split between stages
            return F.linear(x, self.embed.weight)
        return self.lm_head(x)
