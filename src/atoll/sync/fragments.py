"""Which part of the model each exchange carries: rank shards and streaming fragments.

Two independent splits, both pure functions of names and sizes, identical on every site:

- **Shards** (sharded outer exchange): the parameters of a site, in a fixed order, are viewed
  as one logical flat vector cut into `num_shards` contiguous pieces of equal size (±1
  element); local rank r exchanges only piece r with rank r of the other sites. A piece may
  span parameter boundaries. `gather_shard` copies a piece out into one flat tensor,
  `scatter_shard` writes one back.
- **Fragments** (Streaming DiLoCo): the parameter names of atoll's `Transformer` are split into
  F fragments of whole decoder layers; fragment f syncs after the steps t with
  (t − offset_f) mod H = 0, offsets spread evenly over H (`StreamingSchedule`).

Who calls: the cross-site strategies, once at setup (layouts) and at every sync (gather,
scatter, `due`). No `torch.distributed`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from atoll.errors import AtollError

__all__ = [
    "ShardLayout",
    "ShardPiece",
    "StreamingSchedule",
    "gather_shard",
    "scatter_shard",
    "shard_layout",
    "split_fragments",
]


@dataclass(frozen=True)
class ShardPiece:
    """Elements [start, stop) of parameter `param` (flattened) belong to the shard, at
    [offset, offset + stop − start) of the shard's flat tensor."""

    param: int
    start: int
    stop: int
    offset: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardLayout:
    """How `numels` (the parameters' sizes, in order) are cut into `num_shards` pieces.

    `bounds[s]:bounds[s + 1]` is shard s's range of the logical flat vector; shard sizes
    differ by at most one element (the first `total % num_shards` shards get the extra one).
    """

    numels: tuple[int, ...]
    num_shards: int
    bounds: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.bounds[-1]

    def shard_numel(self, shard: int) -> int:
        return self.bounds[shard + 1] - self.bounds[shard]

    def pieces(self, shard: int) -> list[ShardPiece]:
        """The parameter ranges that make up `shard`, in order; empty pieces are left out."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} of {self.num_shards}")
        lo, hi = self.bounds[shard], self.bounds[shard + 1]
        out: list[ShardPiece] = []
        param_start = 0
        for index, numel in enumerate(self.numels):
            param_stop = param_start + numel
            start, stop = max(lo, param_start), min(hi, param_stop)
            if start < stop:
                out.append(ShardPiece(index, start - param_start, stop - param_start, start - lo))
            param_start = param_stop
        return out


def shard_layout(params: Sequence[Tensor] | Sequence[int], *, num_shards: int) -> ShardLayout:
    """Cut the parameters (tensors, or their element counts, in the same order on every site
    and rank) into `num_shards` balanced contiguous shards.

    Raises `AtollError` if `num_shards` < 1. A shard may be empty when there are fewer
    elements than shards.
    """
    if not isinstance(num_shards, int) or num_shards < 1:
        raise AtollError(f"num_shards={num_shards!r} must be a positive integer (the local ranks per site)")
    numels = tuple(p if isinstance(p, int) else p.numel() for p in params)
    total = sum(numels)
    base, extra = divmod(total, num_shards)
    bounds = tuple(s * base + min(s, extra) for s in range(num_shards + 1))
    return ShardLayout(numels, num_shards, bounds)


def _check_tensors(layout: ShardLayout, tensors: Sequence[Tensor]) -> None:
    numels = tuple(t.numel() for t in tensors)
    if numels != layout.numels:
        raise AtollError(
            f"{len(tensors)} tensors with {sum(numels)} elements do not match the shard layout "
            f"({len(layout.numels)} tensors, {layout.total} elements); pass the same parameters "
            "in the same order as when the layout was made"
        )


def gather_shard(
    tensors: Sequence[Tensor], layout: ShardLayout, shard: int, *, dtype: torch.dtype | None = None
) -> Tensor:
    """Shard `shard` of `tensors` as one new flat tensor (in `dtype`, default the first
    tensor's), on the first tensor's device. Raises `AtollError` if `tensors` does not match
    `layout`."""
    _check_tensors(layout, tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = dtype or (tensors[0].dtype if tensors else torch.float32)
    out = torch.empty(layout.shard_numel(shard), dtype=dtype, device=device)
    with torch.no_grad():
        for piece in layout.pieces(shard):
            flat = tensors[piece.param].detach().reshape(-1)
            out[piece.offset : piece.offset + piece.numel].copy_(flat[piece.start : piece.stop])
    return out


def scatter_shard(flat: Tensor, tensors: Sequence[Tensor], layout: ShardLayout, shard: int) -> None:
    """Write the flat shard `flat` back into `tensors` in place (cast to each tensor's dtype);
    elements outside the shard are untouched. `tensors` must be contiguous (parameters are).

    Raises `AtollError` if `tensors` or `flat` do not match `layout`.
    """
    _check_tensors(layout, tensors)
    if flat.numel() != layout.shard_numel(shard):
        raise AtollError(f"shard {shard} has {layout.shard_numel(shard)} elements, got {flat.numel()}")
    flat = flat.reshape(-1)
    with torch.no_grad():
        for piece in layout.pieces(shard):
            target = tensors[piece.param].detach()
            assert target.is_contiguous(), "scatter_shard writes through a flat view"
            target.view(-1)[piece.start : piece.stop].copy_(flat[piece.offset : piece.offset + piece.numel])


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FIRST = re.compile(r"(?:^|\.)embed\.[^.]+$")
_LAST = re.compile(r"(?:^|\.)(?:norm|lm_head)\.[^.]+$")


def split_fragments(
    names: Sequence[str],
    *,
    num_fragments: int,
    pattern: Literal["sequential", "strided"] = "sequential",
) -> list[list[str]]:
    """Partition the parameter names of atoll's `Transformer` into `num_fragments` fragments.

    Decoder layers go whole to one fragment: `sequential` gives each fragment a contiguous
    run of layers (run lengths differ by at most one, longer runs first), `strided` gives layer
    i to fragment i mod F. `embed.*` joins the first fragment, `norm.*` and `lm_head.*` the
    last. Names may carry a wrapper prefix (`module.`, `_orig_mod.`). Each fragment keeps the
    order of `names`. Raises `AtollError` for a name of another model, for F < 1 or F greater
    than the number of layers.
    """
    layer_of: list[int | None] = []
    for name in names:
        match = _LAYER.search(name)
        if match:
            layer_of.append(int(match.group(1)))
        elif _FIRST.search(name):
            layer_of.append(-1)
        elif _LAST.search(name):
            layer_of.append(None)
        else:
            raise AtollError(
                f"parameter {name!r} is not one of atoll's Transformer (embed.*, layers.<i>.*, "
                "norm.*, lm_head.*); streaming fragments need that naming"
            )
    num_layers = 1 + max((i for i in layer_of if i is not None), default=-1)
    if not isinstance(num_fragments, int) or not 1 <= num_fragments <= max(num_layers, 1):
        raise AtollError(
            f"num_fragments={num_fragments!r} must be between 1 and the number of decoder layers "
            f"({num_layers})"
        )
    if pattern not in ("sequential", "strided"):
        raise AtollError(f"fragment pattern {pattern!r} is not valid; use sequential or strided")
    base, extra = divmod(num_layers, num_fragments)
    starts = [f * base + min(f, extra) for f in range(num_fragments + 1)]

    def fragment_of(layer: int | None) -> int:
        if layer is None:
            return num_fragments - 1
        if layer < 0:
            return 0
        if pattern == "strided":
            return layer % num_fragments
        return next(f for f in range(num_fragments) if layer < starts[f + 1])

    fragments: list[list[str]] = [[] for _ in range(num_fragments)]
    for name, layer in zip(names, layer_of, strict=True):
        fragments[fragment_of(layer)].append(name)
    return fragments


@dataclass(frozen=True)
class StreamingSchedule:
    """When each of `num_fragments` fragments syncs, with one sync per fragment every
    `sync_every` (H) inner steps.

    Steps count inner steps done, from 1. Fragment f's offset is floor(f · H / F), and it is
    due after step t > 0 when (t − offset_f) mod H = 0; so fragment 0 syncs at H, 2H, ... and
    the others in between, spread evenly (with F > H some fragments share a step). Raises
    `AtollError` for F < 1 or H < 1.
    """

    num_fragments: int
    sync_every: int

    def __post_init__(self) -> None:
        for key in ("num_fragments", "sync_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise AtollError(f"{key}={value!r} must be a positive integer")

    @property
    def offsets(self) -> tuple[int, ...]:
        """offset_f for each fragment, non-decreasing in [0, H)."""
        return tuple(f * self.sync_every // self.num_fragments for f in range(self.num_fragments))

    def due(self, step: int) -> list[int]:
        """The fragments that sync after inner step `step` (ascending; empty for step ≤ 0)."""
        if step <= 0:
            return []
        return [f for f, off in enumerate(self.offsets) if (step - off) % self.sync_every == 0]

    def next_sync(self, fragment: int, step: int) -> int:
        """The first step > `step` after which `fragment` syncs."""
        wait = (self.offsets[fragment] - step) % self.sync_every
        return step + (wait or self.sync_every)
