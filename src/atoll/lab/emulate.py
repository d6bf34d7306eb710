"""Link emulation in the transport, and scaling a WAN scenario down to the lab.

The transport calls `LinkEmulator.transmit` once per message it sends across sites. Two modes:

- netns lab (`shape_bandwidth=False`): the kernel's `tbf` shapes the bandwidth; this kernel has no
  `netem`, so the emulator adds only the latency;
- emulation, without root (`shape_bandwidth=True`): the emulator also paces the sender at the
  link's rate, so that messages take bytes·8/bandwidth + latency.

Pacing is a virtual clock per emulator (a token bucket with no burst): each message reserves the
interval [start, start + bytes·8/rate) after the previous reservation ends, under a lock, so a
sender never exceeds its rate across calls and threads. Only the sender's own emulator is
accounted: a receiver's downlink shared by several senders in other processes is not modelled
(the path rate min(uplink, peer downlink) is).

The scenario helpers follow shared/REFERENCES.md, "Scaling a scenario down to the lab":
R = (seconds to send the exchanged model once over the WAN) ÷ (seconds of compute per inner
step); the lab picks the bandwidth that gives a small model the same R.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atoll.errors import AtollError

if TYPE_CHECKING:
    from atoll.config.topology import LinkSpec

BITS_PER_MBIT = 1e6


class LinkEmulator:
    """One site's WAN link as the transport sees it: rates in Mbit/s, one-way latency in ms.

    Thread-safe. `transmit` blocks the calling thread; `delay_seconds` is pure arithmetic.
    `clock` and `sleep` are injectable so tests can run on a fake clock.
    """

    def __init__(
        self,
        uplink_mbps: float,
        downlink_mbps: float | None = None,
        latency_ms: float = 0.0,
        *,
        shape_bandwidth: bool,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not uplink_mbps > 0:
            raise AtollError(f"uplink_mbps must be > 0 (got {uplink_mbps})")
        if downlink_mbps is not None and not downlink_mbps > 0:
            raise AtollError(f"downlink_mbps must be > 0 (got {downlink_mbps}); leave it out to use the uplink's")
        if latency_ms < 0:
            raise AtollError(f"latency_ms must be >= 0 (got {latency_ms})")
        self.uplink_mbps = float(uplink_mbps)
        self.downlink_mbps = float(downlink_mbps) if downlink_mbps is not None else self.uplink_mbps
        self.latency_ms = float(latency_ms)
        self.shape_bandwidth = shape_bandwidth
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_free = 0.0  # clock time at which the uplink has sent everything reserved so far
        self._bytes_sent = 0

    @classmethod
    def from_link(cls, link: LinkSpec, *, shape_bandwidth: bool) -> LinkEmulator:
        """The emulator for a topology link (`downlink_mbps` defaults to the uplink's)."""
        return cls(link.uplink_mbps, link.down_mbps, link.latency_ms, shape_bandwidth=shape_bandwidth)

    @property
    def mode(self) -> str:
        """"emulated" when this emulator paces bandwidth, "netns" when the kernel does."""
        return "emulated" if self.shape_bandwidth else "netns"

    @property
    def bytes_sent(self) -> int:
        """Total payload bytes passed to `transmit` so far."""
        return self._bytes_sent

    def path_mbps(self, peer: LinkEmulator | None = None) -> float:
        """Bandwidth towards `peer`: min(own uplink, peer's downlink); to the WAN core without a peer."""
        return self.uplink_mbps if peer is None else min(self.uplink_mbps, peer.downlink_mbps)

    def path_latency_seconds(self, peer: LinkEmulator | None = None) -> float:
        """One-way latency towards `peer`: own latency plus the peer's (both legs of the star)."""
        return (self.latency_ms + (peer.latency_ms if peer is not None else 0.0)) / 1e3

    def delay_seconds(self, num_bytes: int, peer: LinkEmulator | None = None) -> float:
        """Seconds for `num_bytes` to reach `peer` on an idle link: bytes·8/bandwidth + latency.

        Pure: the same figure in both modes (it is what the kernel plus the emulator add together).
        """
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return num_bytes * 8 / (self.path_mbps(peer) * BITS_PER_MBIT) + self.path_latency_seconds(peer)

    def transmit(self, num_bytes: int, peer: LinkEmulator | None = None) -> float:
        """Block until `num_bytes` sent now would have arrived at `peer`; return the seconds blocked.

        Called by the transport around each cross-site message (before handing it to the socket in
        netns mode, instead of the wire time in emulated mode). In emulated mode the message is
        queued behind earlier ones from any thread of this sender, so the rate is respected across
        calls; latency overlaps (the next message may start while this one is in flight). In netns
        mode only the latency is slept.
        """
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        latency = self.path_latency_seconds(peer)
        with self._lock:
            now = self._clock()
            self._bytes_sent += num_bytes
            if self.shape_bandwidth:
                start = max(now, self._next_free)
                self._next_free = start + num_bytes * 8 / (self.path_mbps(peer) * BITS_PER_MBIT)
                arrival = self._next_free + latency
            else:
                arrival = now + latency
        wait = arrival - now
        if wait > 0:
            self._sleep(wait)
        return max(wait, 0.0)


# ---------------------------------------------------------------- scaling a scenario


def step_seconds_from_compute(
    params: float, tokens_per_step: float, *, num_devices: int, device_flops: float, mfu: float
) -> float:
    """Seconds of compute per inner step, from 6·N·tokens FLOPs spread over the devices at `mfu`."""
    if not (params > 0 and tokens_per_step > 0 and num_devices > 0 and device_flops > 0 and 0 < mfu <= 1):
        raise AtollError("step_seconds_from_compute: params, tokens, devices and flops must be > 0, mfu in (0, 1]")
    return 6 * params * tokens_per_step / (num_devices * device_flops * mfu)


def scenario_ratio(params: float, bytes_per_param: float, link_mbps: float, step_seconds: float) -> float:
    """R = (seconds to send params·bytes_per_param once over `link_mbps`) ÷ `step_seconds`."""
    if not (params > 0 and bytes_per_param > 0 and link_mbps > 0 and step_seconds > 0):
        raise AtollError("scenario_ratio: params, bytes_per_param, link_mbps and step_seconds must all be > 0")
    return params * bytes_per_param * 8 / (link_mbps * BITS_PER_MBIT) / step_seconds


def bandwidth_for_ratio(model_bytes: float, step_seconds: float, ratio: float) -> float:
    """The link in Mbit/s on which sending `model_bytes` takes `ratio` inner steps of `step_seconds`."""
    if not (model_bytes > 0 and step_seconds > 0 and ratio > 0):
        raise AtollError("bandwidth_for_ratio: model_bytes, step_seconds and ratio must all be > 0")
    return model_bytes * 8 / (ratio * step_seconds) / BITS_PER_MBIT


@dataclass(frozen=True)
class Scenario:
    """A real-world cross-site training setup, reduced to what its ratio R depends on."""

    name: str
    params: float
    bytes_per_param: float
    link_mbps: float
    num_clusters: int
    devices_per_cluster: int
    device_flops: float
    mfu: float
    tokens_per_step: float  # per cluster per inner step
    source: str

    @property
    def model_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def send_seconds(self) -> float:
        """Seconds to send the exchanged model once over the link."""
        return self.model_bytes * 8 / (self.link_mbps * BITS_PER_MBIT)

    @property
    def step_seconds(self) -> float:
        """Seconds of compute per inner step of one cluster."""
        return step_seconds_from_compute(
            self.params, self.tokens_per_step, num_devices=self.devices_per_cluster, device_flops=self.device_flops, mfu=self.mfu
        )

    @property
    def ratio(self) -> float:
        return scenario_ratio(self.params, self.bytes_per_param, self.link_mbps, self.step_seconds)

    def lab_mbps(self, model_bytes: float, step_seconds: float) -> float:
        """The lab link that gives a model of `model_bytes` at `step_seconds` per step this R."""
        return bandwidth_for_ratio(model_bytes, step_seconds, self.ratio)

    def assumptions(self) -> str:
        """One line stating every figure R rests on (quote it wherever R is shown)."""
        return (
            f"{self.name}: {self.params:.3g} parameters exchanged at {self.bytes_per_param:g} bytes each "
            f"({self.model_bytes / 1e9:,.0f} GB) over {self.link_mbps:,.0f} Mbit/s = {self.send_seconds:,.0f} s; "
            f"{self.num_clusters} clusters x {self.devices_per_cluster} devices at {self.device_flops / 1e12:,.0f} TFLOP/s, "
            f"{self.mfu:.0%} MFU, {self.tokens_per_step:,.0f} tokens per cluster per inner step "
            f"(6·N·tokens FLOPs) = {self.step_seconds:,.1f} s per step; R = {self.ratio:,.1f} ({self.source})"
        )


_DILOCOX = "DiLoCoX-like, shared/REFERENCES.md 'Scaling a scenario down to the lab'"

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("diloco-107b-1gbps", 107e9, 2, 1000, 2, 80, 312e12, 0.40, 0.5e6, _DILOCOX + ", bf16 exchange"),
        Scenario("diloco-107b-1gbps-fp32", 107e9, 4, 1000, 2, 80, 312e12, 0.40, 0.5e6, _DILOCOX + ", fp32 exchange"),
    )
}
DEFAULT_SCENARIO = "diloco-107b-1gbps"


def get_scenario(name: str) -> Scenario:
    """The named scenario; raises AtollError listing the known names."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise AtollError(f"unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}") from None
