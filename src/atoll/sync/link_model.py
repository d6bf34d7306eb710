"""The WAN link model: what one cross-site all-gather costs on the sites' access links. No torch.

One model for both tiers: the transport's emulation (`atoll.sync.transport.WanModel`) sleeps for
what it predicts, and the planner (`atoll.planner.wan`, the search and the simulator) schedules
with it.

Sites form a star through the WAN: site A reaches site B through A's uplink and B's downlink, and
a message between them takes both links' one-way latency. Every exchange is an all-gather (the
transport's, whatever the codec; docs/decisions.md says why not a ring all-reduce): each site
sends its payload to, and receives one from, each of the S-1 others, so S-1 payloads cross each
uplink and each downlink, and the slowest link sets the pace.

Latency counts S-1 times. gloo's all-gather is a ring of S-1 steps, each step a hop between ring
neighbours (the transport posts its chunks all at once, so only the last chunk's hops are not
hidden behind the transfer, and that chunk crosses all S-1 of them); each hop is charged at the
two farthest sites' latencies, an upper bound that is exact at two sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from atoll.errors import AtollError


@dataclass(frozen=True)
class WanLink:
    """One site's WAN access: uplink and downlink payload rates (bytes/s) and one-way latency (s).

    Raises `AtollError` on construction when a rate is not positive.
    """

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

    @classmethod
    def from_mbps(
        cls, name: str, *, up_mbps: float, down_mbps: float, latency_ms: float = 0.0, goodput: float = 1.0
    ) -> WanLink:
        """A link from topology units (Mbit/s, ms), carrying `goodput` of the nominal rate as payload."""
        return cls(name, up_mbps * 1e6 / 8 * goodput, down_mbps * 1e6 / 8 * goodput, latency_ms / 1e3)


def allgather_bytes(payload: float, num_sites: int) -> float:
    """Bytes each site sends (and receives) in one all-gather of `payload` bytes per site."""
    if num_sites <= 1:
        return 0.0
    return (num_sites - 1) * payload


def allgather_latency(links: Sequence[WanLink]) -> float:
    """The latency part of one all-gather: S-1 hops, each between the two farthest sites."""
    if len(links) <= 1:
        return 0.0
    lats = sorted(link.latency_s for link in links)
    return (len(links) - 1) * (lats[-1] + lats[-2])


def allgather_transfer_seconds(payload: float, links: Sequence[WanLink]) -> float:
    """The bandwidth part of one all-gather: the slowest link's S-1 payloads, up or down."""
    volume = allgather_bytes(payload, len(links))
    if volume == 0.0:
        return 0.0
    return max(max(volume / link.up_bytes_per_s, volume / link.down_bytes_per_s) for link in links)


def allgather_seconds(payload: float, links: Sequence[WanLink]) -> float:
    """Wall time of one all-gather of `payload` bytes per site among the sites of `links`."""
    return allgather_transfer_seconds(payload, links) + allgather_latency(links)
