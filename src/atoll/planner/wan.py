"""The cross-site exchange: bytes per sync for each codec, seconds on the WAN, exposed seconds.

Sites form a star through the WAN: site A reaches site B through A's uplink and B's downlink.
Every exchange is an all-gather, as atoll's transport does it: each site sends its payload to
and receives one from each of the S-1 others, whatever the codec (and cross-site ddp's
gradients too). A ring all-reduce would move 2(S-1)/S payloads instead of S-1 (the same at two
sites, 1.5x less at three), but it sums the payloads on the way, and atoll checks each site's
update before applying it (a malformed or non-finite update is rejected, not averaged in);
docs/decisions.md.
Each local rank exchanges only its own fragment with its peers in the other sites (sharded
outer exchange), so the bytes per site are the same as one full exchange and all of them cross
the site's one uplink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from atoll.errors import AtollError
from atoll.planner.shape import ModelShape

Strategy = Literal["ddp", "diloco", "streaming", "delayed"]
Codec = Literal["none", "fp16", "int8", "int4", "topk", "lowrank"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "diloco", "streaming", "delayed")
CODECS: tuple[Codec, ...] = ("none", "fp16", "int8", "int4", "topk", "lowrank")

QUANT_BLOCK = 256
"""Elements per absmax scale (one fp32 scale per block) for int8/int4."""
TOPK_FRACTION = 0.01
"""Fraction of entries top-k keeps (SparseLoCo keeps 1-3%)."""
LOWRANK_RANK = 64
"""Rank of the low-rank factors (per weight matrix; 1-D tensors go as fp16)."""
WAN_GOODPUT = 0.93
"""Fraction of a link's nominal rate that a collective moves as payload (TCP/IP framing, the
transport's own messages): a gloo all-reduce of 20 MB across two network namespaces took
1.77-1.81 s against 1.67 s of wire time at the shaped rate (shared/REFERENCES.md)."""




@dataclass(frozen=True)
class SiteLink:
    """One site's WAN access: its uplink and downlink (bytes/s) and one-way latency (s)."""

    name: str
    up_bytes_per_s: float
    down_bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.up_bytes_per_s > 0 and self.down_bytes_per_s > 0):
            raise AtollError(
                f"site {self.name}: WAN bandwidth must be positive (got up {self.up_bytes_per_s}, down "
                f"{self.down_bytes_per_s} bytes/s); set links[].uplink_mbps in the topology"
            )


def codec_bytes(codec: Codec, shape: ModelShape, *, num_params: float | None = None,
                topk_fraction: float = TOPK_FRACTION, lowrank_rank: int = LOWRANK_RANK, block_size: int = QUANT_BLOCK) -> float:
    """Bytes of one site's payload for an exchange of `num_params` (default: the whole model).

    none: fp32 (4 B/param); fp16: 2; int8: 1 + 4/block; int4: 0.5 + 4/block (blockwise absmax
    scales, one fp32 per `block_size` elements); topk: fraction x (2-byte value + 4-byte index);
    lowrank: fp16 factors r(m+n) per matrix.
    """
    total = float(shape.num_params())
    n = total if num_params is None else float(num_params)
    if codec == "none":
        return 4.0 * n
    if codec == "fp16":
        return 2.0 * n
    if codec == "int8":
        return n * (1.0 + 4.0 / block_size)
    if codec == "int4":
        return n * (0.5 + 4.0 / block_size)
    if codec == "topk":
        return n * topk_fraction * 6.0
    if codec == "lowrank":
        matrix_params = sum(r * c * k for r, c, k in shape.matrices())
        factor_params = sum(min(lowrank_rank, r, c) * (r + c) * k for r, c, k in shape.matrices())
        ratio = (factor_params + (total - matrix_params)) / total
        return 2.0 * n * ratio
    raise AtollError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def per_site_bytes(payload: float, num_sites: int) -> float:
    """Bytes each site sends (and receives) for one all-gather among `num_sites` sites, whatever the codec."""
    if num_sites <= 1:
        return 0.0
    return (num_sites - 1) * payload


def exchange_seconds(payload: float, links: list[SiteLink]) -> float:
    """Wall time of one exchange: the slowest site's transfer plus the gather's latency steps."""
    s = len(links)
    if s <= 1:
        return 0.0
    volume = per_site_bytes(payload, s)
    transfer = max(max(volume / link.up_bytes_per_s, volume / link.down_bytes_per_s) for link in links)
    return transfer + exchange_latency(links)


def exchange_latency(links: list[SiteLink]) -> float:
    """Latency part of one exchange: S-1 gather steps, each between the two farthest sites
    (one-way latency of both access links)."""
    s = len(links)
    if s <= 1:
        return 0.0
    lats = sorted(link.latency_s for link in links)
    return (s - 1) * (lats[-1] + lats[-2])


def exposed_per_round(strategy: Strategy, *, inner_steps: int, step_s: float, sync_s: float,
                      fragments: int = 1, overlap_steps: int = 1, latency_s: float = 0.0) -> float:
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


def link_from_mbps(name: str, *, up_mbps: float, down_mbps: float, latency_ms: float = 0.0) -> SiteLink:
    """A site's link from topology units (Mbit/s, ms), at `WAN_GOODPUT` of the nominal rate."""
    return SiteLink(name, up_mbps * 1e6 / 8 * WAN_GOODPUT, down_mbps * 1e6 / 8 * WAN_GOODPUT, latency_ms / 1e3)
