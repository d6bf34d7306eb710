"""What the cross-site search takes and gives: the request, the loss-risk budget, the sync
choices and the candidate plans with their predictions.

Plain frozen dataclasses, shared by the search (`planner.search`), the reasons it gives
(`planner.reasons`), the plan file (`planner.plan`) and the explanations and playback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from atoll.planner.hetero import Efficiency, SitePace, predict_efficiency
from atoll.planner.shape import ModelShape
from atoll.planner.sites import SearchSpace, SiteEstimate
from atoll.planner.step import ATOLL_RUNTIME, RuntimeProfile
from atoll.planner.wan import STRATEGIES, Strategy
from atoll.sync.codec_specs import CodecName
from atoll.sync.link_model import WanLink

Objective = Literal["time", "cost"]
RiskLevel = Literal["low", "medium", "high"]


@dataclass(frozen=True)
class RiskBudget:
    """What the literature shows to be safe for the loss (sources: docs/decisions.md)."""

    level: RiskLevel
    max_inner_steps: int
    codecs: tuple[CodecName, ...]
    strategies: tuple[Strategy, ...]
    min_rounds: int
    """At least this many outer rounds over the run (few rounds trail synchronous training)."""


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks the planner; `None` fields get documented defaults."""

    tokens: float
    global_batch: int | None = None
    """Sequences per (inner) step over all sites."""
    seq_len: int | None = None
    objective: Objective = "time"
    risk: RiskLevel = "medium"
    strategies: tuple[Strategy, ...] = STRATEGIES
    runtime: RuntimeProfile = ATOLL_RUNTIME
    space: SearchSpace = SearchSpace()
    recovery_s: float = 600.0
    """Seconds from a failure to the failed site computing again (restart, reload)."""
    checkpoint_interval_s: float = 3600.0
    time_tolerance: float = 0.03
    top: int = 5
    all_sites: bool = False
    """Only plans that use every site (otherwise the search may leave slow or costly sites out)."""


@dataclass(frozen=True)
class SyncChoice:
    strategy: Strategy
    inner_steps: int
    codec: CodecName
    fragments: int = 1
    overlap_steps: int = 0

    def describe(self) -> str:
        if self.strategy == "ddp":
            return "ddp (every step)"
        text = f"{self.strategy} H={self.inner_steps} {self.codec}"
        if self.strategy == "streaming":
            text += f" F={self.fragments} τ={self.overlap_steps}"
        return text


@dataclass(frozen=True)
class SitePlan:
    name: str
    estimate: SiteEstimate
    link: WanLink | None


@dataclass(frozen=True)
class Candidate:
    """One complete plan with its predictions."""

    sites: tuple[SitePlan, ...]
    sync: SyncChoice
    global_batch: int
    """Sequences per inner step over all sites: every site runs the same batch (`global_batch / sites`)."""
    seq_len: int
    steps: int
    """Nominal inner steps (`rounds x sync.inner_steps`): what `train.steps` is set to."""
    compute_step_s: float
    """Compute seconds of a round (its slowest site's H_i x step) over the nominal H."""
    sync_s: float
    """WAN seconds of one full exchange (0 for one site)."""
    sync_latency_s: float
    """The latency part of `sync_s`."""
    wan_bytes_per_sync: float
    """Bytes each site sends per sync (full model exchange; streaming: all fragments)."""
    exposed_per_step_s: float
    failure_overhead: float
    """Expected fraction of extra time lost to failures."""
    site_inner_steps: tuple[int, ...] = ()
    """Each site's inner steps per round, in `sites` order (default: `sync.inner_steps` each)."""
    unused_sites: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.site_inner_steps:
            h = 1 if self.sync.strategy == "ddp" else self.sync.inner_steps
            object.__setattr__(self, "site_inner_steps", (h,) * len(self.sites))
        assert len(self.site_inner_steps) == len(self.sites)

    def steps_per_nominal(self, index: int) -> float:
        """Inner steps site `index` runs per nominal step (its H over the plan's H)."""
        h = 1 if self.sync.strategy == "ddp" else self.sync.inner_steps
        return self.site_inner_steps[index] / h

    @property
    def wall_step_s(self) -> float:
        return self.compute_step_s + self.exposed_per_step_s

    @property
    def time_to_train_s(self) -> float:
        return self.steps * self.wall_step_s * (1.0 + self.failure_overhead)

    @property
    def days(self) -> float:
        return self.time_to_train_s / 86400.0

    @property
    def utilization(self) -> float:
        """Fraction of device-time spent computing (not waiting for the WAN or slower sites)."""
        busy = sum(
            sp.estimate.devices_total * sp.estimate.seconds * self.steps_per_nominal(i)
            for i, sp in enumerate(self.sites)
        )
        total = sum(sp.estimate.devices_total for sp in self.sites) * self.wall_step_s
        return busy / total

    @property
    def cost_usd(self) -> float:
        hours = self.time_to_train_s / 3600.0
        return hours * sum(g.device.usd_per_hour * g.count for sp in self.sites for g in sp.estimate.groups)

    def mfu_by_kind(self) -> dict[str, float]:
        """Model FLOPs utilization of each device kind over the wall-clock step."""
        flops: dict[str, float] = {}
        peak: dict[str, float] = {}
        for j, sp in enumerate(self.sites):
            est = sp.estimate
            flops_per_token = est.steps[0].model_flops / max(est.steps[0].tokens, 1)
            for i, g in enumerate(est.groups):
                kind = g.device.kind
                flops[kind] = flops.get(kind, 0.0) + flops_per_token * est.group_tokens(i) * self.steps_per_nominal(j)
                peak[kind] = peak.get(kind, 0.0) + g.count * g.device.peak_flops
        return {k: flops[k] / (self.wall_step_s * peak[k]) for k in flops}

    @property
    def efficiency(self) -> Efficiency:
        """The run's predicted throughput over its devices' solo throughputs: `predict_efficiency`
        of each site's H, step (its slowest device group's) and solo rate, and the exchange seconds
        per round that compute waits for. Solo, as HETHUB measures it, is each group of alike devices
        training alone: its replicas run whole micro-batches, with their own data-parallel traffic
        (none for a single replica)."""
        paces = []
        for sp, h in zip(self.sites, self.site_inner_steps, strict=True):
            est = sp.estimate
            solo = sum(
                replicas * micro * est.layout.micro_batch / (step.seconds - (step.dp_seconds if replicas == 1 else 0.0))
                for replicas, micro, step in zip(est.replicas, est.micro_batches, est.steps, strict=True)
            )
            paces.append(SitePace(sp.name, h, est.seconds, est.batch, solo))
        rounds = 1 if self.sync.strategy == "ddp" else self.sync.inner_steps
        return predict_efficiency(paces, exchange_seconds=self.exposed_per_step_s * rounds)

    def describe_sites(self) -> str:
        return "; ".join(f"{sp.name}: {sp.estimate.layout.describe()}" for sp in self.sites)


@dataclass(frozen=True)
class PlanResult:
    shape: ModelShape
    request: PlanRequest
    candidates: tuple[Candidate, ...]
    """Sorted by the objective; the first is the fastest (or cheapest)."""
    recommended: Candidate
    notes: tuple[str, ...] = ()
