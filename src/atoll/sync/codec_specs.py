"""What each WAN codec is called, which options it takes, and how many bytes it sends. No torch.

The one table both tiers read. `atoll.sync.codecs` implements the encodings with torch and takes
its names, defaults and size rules from here; the config schema takes the names and defaults;
the planner asks `payload_bytes` what one exchange of a model weighs. Torch-free, so the planner
and the config import it without torch or a process group.

Sizes are exact, to the byte, for what `atoll.sync.codecs` puts on the wire for one tensor of
n elements (b the block size, s the bytes of a scale, v of a value, i of an index, r the rank):

    none      as is, in the tensor's own dtype             n · itemsize
    fp16/bf16 16-bit floats                                2n
    int8      blockwise absmax codes                       n + s · ceil(n / b)
    int4      two codes per byte                           ceil(n / 2) + s · ceil(n / b)
    topk      the k = round(fraction · n) largest          k · (v + i), i the narrowest index that fits n
    lowrank   P (m×r) and Q (c×r) of an m×c view           v · r · (m + c); as is where that would not save
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

from atoll.errors import AtollError

CodecName = Literal["none", "fp16", "bf16", "int8", "int4", "topk", "lowrank"]
CODEC_NAMES: tuple[CodecName, ...] = get_args(CodecName)
"""Every codec, in order of increasing loss (the planner prefers the earlier of two equally fast)."""

DEFAULT_BLOCK_SIZE = 128
"""int8/int4: elements per absmax scale."""
DEFAULT_TOPK_FRACTION = 0.01
"""topk: fraction of the entries sent (SparseLoCo keeps 1-3%)."""
DEFAULT_LOWRANK_RANK = 4
"""lowrank: rank of the factors (PowerSGD's range; 1-D tensors go as they are)."""

FLOAT_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
"""Bytes per element of the float dtypes a codec option may name (`scale_dtype`, `value_dtype`)."""

CODEC_SYNC_KEYS: dict[CodecName, tuple[str, ...]] = {
    "none": (),
    "fp16": (),
    "bf16": (),
    "int8": ("block_size",),
    "int4": ("block_size",),
    "topk": ("topk_fraction", "value_dtype"),
    "lowrank": ("rank", "value_dtype"),
}
"""The `sync` config keys that apply to each codec; every other codec ignores them."""

SYNC_KEY_OPTIONS: dict[str, str] = {
    "block_size": "block_size",
    "topk_fraction": "fraction",
    "rank": "rank",
    "value_dtype": "value_dtype",
}
"""`sync` config key -> the codec option it sets (`atoll.sync.codecs.get_codec`)."""


def blockquant_bytes(numel: int, *, bits: int, block_size: int = DEFAULT_BLOCK_SIZE, scale_bytes: int = 4) -> int:
    """int8 (`bits` 8) or int4 (`bits` 4): the codes plus one scale per block of `block_size`."""
    codes = numel if bits == 8 else -(-numel // 2)
    return codes + scale_bytes * -(-numel // block_size)


def topk_kept(numel: int, fraction: float = DEFAULT_TOPK_FRACTION) -> int:
    """How many of `numel` entries topk sends: round(fraction · n), at least 1, at most n (0 for 0)."""
    return 0 if numel == 0 else min(numel, max(1, int(fraction * numel + 0.5)))


def index_bytes(numel: int, *, compact: bool = True) -> int:
    """Bytes of one topk index into `numel` entries: 1 or 2 when `compact` and they fit, else 4 (8 past 2^31)."""
    if compact and numel <= 2**8:
        return 1
    if compact and numel <= 2**15:
        return 2
    return 4 if numel <= 2**31 else 8


def topk_bytes(
    numel: int, *, fraction: float = DEFAULT_TOPK_FRACTION, value_bytes: int = 4, compact_indices: bool = True
) -> int:
    """topk: the kept values plus their indices."""
    return topk_kept(numel, fraction) * (value_bytes + index_bytes(numel, compact=compact_indices))


def lowrank_factored(shape: Sequence[int], rank: int = DEFAULT_LOWRANK_RANK) -> tuple[int, int] | None:
    """(m, c) of the matrix lowrank factors a tensor of `shape` as, or None when it sends the tensor
    as is: 1-D tensors, and tensors where r · (m + c) ≥ m · c would not save a byte."""
    if len(shape) < 2:
        return None
    rows = shape[0]
    cols = math.prod(shape) // rows if rows else 0
    if rank * (rows + cols) >= rows * cols:
        return None
    return rows, cols


def lowrank_bytes(
    shape: Sequence[int], *, rank: int = DEFAULT_LOWRANK_RANK, value_bytes: int = 4, itemsize: int = 4
) -> int:
    """lowrank: both factors, or the tensor as is (`itemsize` bytes per element) when not factored."""
    factored = lowrank_factored(shape, rank)
    if factored is None:
        return math.prod(shape) * itemsize
    rows, cols = factored
    return value_bytes * rank * (rows + cols)


def payload_bytes(
    codec: str,
    shape: Sequence[int],
    *,
    itemsize: int = 4,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale_bytes: int = 4,
    fraction: float = DEFAULT_TOPK_FRACTION,
    value_bytes: int = 4,
    compact_indices: bool = True,
    rank: int = DEFAULT_LOWRANK_RANK,
) -> int:
    """Bytes `codec` sends for one tensor of `shape` (`itemsize` bytes per element: 4 for the
    fp32 pseudo-gradients atoll exchanges). Options a codec does not take are ignored.

    Raises `AtollError` for an unknown codec name.
    """
    numel = math.prod(shape)
    if codec == "none":
        return numel * itemsize
    if codec in ("fp16", "bf16"):
        return 2 * numel
    if codec in ("int8", "int4"):
        bits = 8 if codec == "int8" else 4
        return blockquant_bytes(numel, bits=bits, block_size=block_size, scale_bytes=scale_bytes)
    if codec == "topk":
        return topk_bytes(numel, fraction=fraction, value_bytes=value_bytes, compact_indices=compact_indices)
    if codec == "lowrank":
        return lowrank_bytes(shape, rank=rank, value_bytes=value_bytes, itemsize=itemsize)
    raise AtollError(f"unknown codec {codec!r}; valid codecs: {', '.join(CODEC_NAMES)}")
