"""The cross-site exchange: bytes per sync for each codec, and the seconds compute waits for it.

Every exchange is an all-gather, as atoll's transport does it: each site sends its payload to
and receives one from each of the S-1 others, whatever the codec (and cross-site ddp's
gradients too). A ring all-reduce would move 2(S-1)/S payloads instead of S-1 (the same at two
sites, 1.5x less at three), but it sums the payloads on the way, and atoll checks each site's
update before applying it (a malformed or non-finite update is rejected, not averaged in);
docs/decisions.md. What an all-gather costs on the links is `atoll.sync.link_model`'s, the model
the transport's emulation uses; what a codec sends is `atoll.sync.codec_specs`'s, the table the
codecs themselves follow.
Each local rank exchanges only its own fragment with its peers in the other sites (sharded
outer exchange), so the bytes per site are the same as one full exchange and all of them cross
the site's one uplink.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

from atoll.errors import AtollError
from atoll.planner.shape import ModelShape
from atoll.sync.codec_specs import DEFAULT_BLOCK_SIZE, DEFAULT_LOWRANK_RANK, DEFAULT_TOPK_FRACTION, payload_bytes
from atoll.sync.link_model import WanLink

Strategy = Literal["ddp", "diloco", "streaming", "delayed"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "diloco", "streaming", "delayed")

WAN_GOODPUT = 0.93
"""Fraction of a link's nominal rate that a collective moves as payload (TCP/IP framing, the
transport's own messages): a gloo all-reduce of 20 MB across two network namespaces took
1.77-1.81 s against 1.67 s of wire time at the shaped rate (shared/REFERENCES.md)."""


@functools.lru_cache(maxsize=256)
def codec_bytes(
    codec: str,
    shape: ModelShape,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
    lowrank_rank: int = DEFAULT_LOWRANK_RANK,
) -> int:
    """Bytes of one site's payload for an exchange of the whole model with `codec`: exactly what
    atoll's codecs send, tensor by tensor, for fp32 pseudo-gradients with the runtime's codec
    options (fp32 scales, values and low-rank factors; the narrowest top-k index that fits).

    Raises `AtollError` for an unknown codec.
    """
    return sum(
        count * payload_bytes(codec, dims, block_size=block_size, fraction=topk_fraction, rank=lowrank_rank)
        for dims, count in shape.tensors()
    )


def exposed_per_round(
    strategy: Strategy,
    *,
    inner_steps: int,
    step_s: float,
    sync_s: float,
    fragments: int = 1,
    overlap_steps: int = 1,
    latency_s: float = 0.0,
) -> float:
    """Seconds per round (H inner steps) that compute waits for the WAN.

    ddp: the whole all-reduce, every step (H = 1). diloco: the whole exchange, every H steps.
    delayed: the exchange of round k runs during round k+1; compute waits only for what is left.
    streaming: F fragments, staggered every H/F steps, each overlapped with `overlap_steps`
    steps; when F fragment exchanges take longer than a round the link is the bottleneck.
    `sync_s` is the time of one full-model exchange, of which `latency_s` is latency: a
    fragment's exchange takes (sync_s - latency_s)/F + latency_s. Consecutive exchanges are
    assumed not to overlap; the event simulator, which shares links between overlapping
    exchanges, is within 1% of this for delayed rounds shorter than the exchange.
    """
    if strategy in ("ddp", "diloco"):
        return sync_s
    if strategy == "delayed":
        return max(0.0, sync_s - inner_steps * step_s)
    if strategy == "streaming":
        frag = (sync_s - latency_s) / fragments + latency_s
        per_fragment = max(0.0, frag - overlap_steps * step_s)
        return max(fragments * per_fragment, fragments * frag - inner_steps * step_s, 0.0)
    raise AtollError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def rate_r(*, model_bytes: float, link_bytes_per_s: float, step_s: float) -> float:
    """R = seconds to send the exchanged model once over the WAN / seconds of compute per step."""
    if step_s <= 0:
        return math.inf
    return model_bytes / link_bytes_per_s / step_s


def link_from_mbps(name: str, *, up_mbps: float, down_mbps: float, latency_ms: float = 0.0) -> WanLink:
    """A site's link from topology units (Mbit/s, ms), at `WAN_GOODPUT` of the nominal rate."""
    return WanLink.from_mbps(name, up_mbps=up_mbps, down_mbps=down_mbps, latency_ms=latency_ms, goodput=WAN_GOODPUT)
