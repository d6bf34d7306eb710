"""Scaling a real WAN deployment down to the lab.

The scenario helpers follow shared/REFERENCES.md, "Scaling a scenario down to the lab":
R = (seconds to send the exchanged model once over the WAN) ÷ (seconds of compute per inner
step); the lab picks the bandwidth that gives a small model the same R. What an exchange costs
on a topology's links is modelled in one place, `atoll.sync.link_model`, which the planner and
the transport's `WanModel` both use (bandwidth and latency when emulated, latency only in the
netns lab where tbf shapes the rate).
"""

from __future__ import annotations

from dataclasses import dataclass

from atoll.errors import AtollError

BITS_PER_MBIT = 1e6


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
            self.params,
            self.tokens_per_step,
            num_devices=self.devices_per_cluster,
            device_flops=self.device_flops,
            mfu=self.mfu,
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
            f"{self.num_clusters} clusters x {self.devices_per_cluster} devices at "
            f"{self.device_flops / 1e12:,.0f} TFLOP/s, "
            f"{self.mfu:.0%} MFU, {self.tokens_per_step:,.0f} tokens per cluster per inner step "
            f"(6·N·tokens FLOPs) = {self.step_seconds:,.1f} s per step; R = {self.ratio:,.1f} ({self.source})"
        )


_DILOCOX = "DiLoCoX-like, shared/REFERENCES.md 'Scaling a scenario down to the lab'"
# INTELLECT-1 (Jaghouar et al. 2024, arXiv:2412.01152): a 10B model, DiLoCo with an int8
# all-reduce of the pseudo-gradients (1 byte per parameter), nodes of 8 H100s (989 TFLOP/s bf16
# dense), 36.2-41.4% MFU (0.38 here). The report gives neither the per-node link nor the tokens
# per node per inner step: 1 Gbit/s and 0.5M tokens are assumptions, stated in the source line.
_INTELLECT1 = (
    "INTELLECT-1, arXiv:2412.01152: 10B, int8 all-reduce, 8 x H100 nodes, 36.2-41.4% MFU; "
    "assumed: 1 Gbit/s per node, 0.5M tokens per node per inner step"
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("diloco-107b-1gbps", 107e9, 2, 1000, 2, 80, 312e12, 0.40, 0.5e6, _DILOCOX + ", bf16 exchange"),
        Scenario("diloco-107b-1gbps-fp32", 107e9, 4, 1000, 2, 80, 312e12, 0.40, 0.5e6, _DILOCOX + ", fp32 exchange"),
        Scenario("intellect-1", 10e9, 1, 1000, 14, 8, 989e12, 0.38, 0.5e6, _INTELLECT1),
    )
}
DEFAULT_SCENARIO = "diloco-107b-1gbps"


def get_scenario(name: str) -> Scenario:
    """The named scenario; raises AtollError listing the known names."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise AtollError(f"unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}") from None
