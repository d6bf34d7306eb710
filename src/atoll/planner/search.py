"""The cross-site search: which sites, what batch each, which sync strategy, H and codec.

For every subset of sites, the global batch is split in proportion to each site's throughput
(so that sites finish an inner step together), each site gets its fastest layout that fits,
and every sync option the loss-risk budget allows is scored: wall time per step = the slowest
site's step + the WAN time compute waits for, amortized over H; time to train = steps x that,
stretched by the expected cost of failures. The recommended plan is the safest option (smallest
H, least lossy codec) whose time is within `time_tolerance` of the fastest.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

from atoll.config.topology import Topology
from atoll.errors import AtollError
from atoll.hardware import get_device
from atoll.planner.shape import ModelShape
from atoll.planner.sites import DeviceGroup, SearchSpace, SiteEstimate, best_site_layout, min_devices_needed
from atoll.planner.step import ATOLL_ENGINE, Engine
from atoll.planner.wan import (
    CODECS, STRATEGIES, Codec, SiteLink, Strategy, codec_bytes, exchange_latency, exchange_seconds, exposed_per_round,
    link_from_mbps, per_site_bytes,
)

Objective = Literal["time", "cost"]
RiskLevel = Literal["low", "medium", "high"]


@dataclass(frozen=True)
class RiskBudget:
    """What the literature shows to be safe for the loss (sources: docs/decisions.md)."""

    level: RiskLevel
    max_inner_steps: int
    codecs: tuple[Codec, ...]
    strategies: tuple[Strategy, ...]
    min_rounds: int
    """At least this many outer rounds over the run (few rounds trail synchronous training)."""


RISK_BUDGETS: dict[str, RiskBudget] = {
    # INTELLECT-1: H=100 with int8; OpenDiLoCo: fp16; Streaming DiLoCo: H=100, equal loss.
    "low": RiskBudget("low", 100, ("none", "fp16", "int8"), ("ddp", "diloco", "streaming"), 20),
    # DiLoCo: H=500 matches synchronous with 8 workers; Streaming DiLoCo: 4-bit outer gradients;
    # DiLoCoX: one-step-delayed outer updates with negligible loss change.
    "medium": RiskBudget("medium", 500, ("none", "fp16", "int8", "int4"), STRATEGIES, 10),
    # SparseLoCo (top-k 1-3% + error feedback), DiLoCoX (low-rank + quantization); DiLoCo's
    # ablation shows the loss gap growing with H past 500.
    "high": RiskBudget("high", 1000, CODECS, STRATEGIES, 5),
}

INNER_STEP_CHOICES = (10, 20, 50, 100, 200, 250, 500, 1000)
FRAGMENT_CHOICES = (2, 4, 8)
HEAL_STATE_FACTOR = 5.0
"""A returning site pulls ~5x the model's fp32 bytes (weights, AdamW, backup, outer momentum)."""


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
    engine: Engine = ATOLL_ENGINE
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
    codec: Codec
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
    link: SiteLink | None


@dataclass(frozen=True)
class Candidate:
    """One complete plan with its predictions."""

    sites: tuple[SitePlan, ...]
    sync: SyncChoice
    global_batch: int
    seq_len: int
    steps: int
    compute_step_s: float
    """The slowest site's inner step."""
    sync_s: float
    """WAN seconds of one full exchange (0 for one site)."""
    sync_latency_s: float
    """The latency part of `sync_s`."""
    wan_bytes_per_sync: float
    """Bytes each site sends per sync (full model exchange; streaming: all fragments)."""
    exposed_per_step_s: float
    failure_overhead: float
    """Expected fraction of extra time lost to failures."""
    unused_sites: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default=())

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
        busy = sum(sp.estimate.devices_total * sp.estimate.seconds for sp in self.sites)
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
        for sp in self.sites:
            est = sp.estimate
            flops_per_token = est.steps[0].model_flops / max(est.steps[0].tokens, 1)
            for i, g in enumerate(est.groups):
                kind = g.device.kind
                flops[kind] = flops.get(kind, 0.0) + flops_per_token * est.group_tokens(i)
                peak[kind] = peak.get(kind, 0.0) + g.count * g.device.peak_flops
        return {k: flops[k] / (self.wall_step_s * peak[k]) for k in flops}

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


# ---------------------------------------------------------------- inputs


def site_groups(topology: Topology) -> dict[str, tuple[DeviceGroup, ...]]:
    """Device groups per site; raises `AtollError` when a site mixes collective backends."""
    out = {}
    for site in topology.sites:
        groups = tuple(DeviceGroup(get_device(d.kind), d.count, d.per_node) for d in site.devices)
        backends = sorted({g.device.backend for g in groups})
        if len(backends) > 1:
            raise AtollError(
                f"site {site.name} mixes devices of different collective backends ({', '.join(backends)}); "
                "they cannot share one process group: split it into one site per backend in the topology"
            )
        out[site.name] = groups
    return out


def site_links(topology: Topology) -> dict[str, SiteLink]:
    links = {}
    for site in topology.sites:
        spec = topology.link(site.name)
        if spec is None:
            continue
        links[site.name] = link_from_mbps(site.name, up_mbps=spec.uplink_mbps, down_mbps=spec.down_mbps,
                                          latency_ms=spec.latency_ms)
    return links


def default_seq_len(shape: ModelShape) -> int:
    """min(the model's max_seq_len, 4096)."""
    return min(shape.max_seq_len, 4096)


def default_global_batch(shape: ModelShape, seq_len: int) -> int:
    """Sequences per step from the model size, after GPT-3's batch sizes (0.5M tokens at 125M
    parameters to 3.2M at 175B): 16K tokens below 10M parameters (the lab), 0.5M below 1B,
    1M below 10B, 2M below 100B, 4M above."""
    n = shape.num_params()
    tokens = 16_384 if n < 1e7 else 2**19 if n < 1e9 else 2**20 if n < 1e10 else 2**21 if n < 1e11 else 2**22
    return max(1, round(tokens / seq_len))


# ---------------------------------------------------------------- search


def _site_throughputs(shape: ModelShape, groups: dict[str, tuple[DeviceGroup, ...]], names: list[str], *,
                      batch: int, seq_len: int, req: PlanRequest,
                      weights: dict[str, float]) -> tuple[dict[str, SiteEstimate], list[str]]:
    """Split `batch` across `names` in proportion to `weights` (throughputs) and find each site's
    layout; one refinement pass when the sites' step times still differ by more than 5%."""
    w = dict(weights)
    chosen: dict[str, SiteEstimate] = {}
    problems: list[str] = []
    for attempt in range(2):
        split = _apportion_positive(batch, [w[n] for n in names])
        chosen, problems = {}, []
        for n, b in zip(names, split):
            found = best_site_layout(shape, groups[n], batch=b, seq_len=seq_len, space=req.space, engine=req.engine)
            if not found:
                problems.append(n)
                continue
            chosen[n] = found[0]
        if problems or len(names) == 1:
            return chosen, problems
        times = [chosen[n].seconds for n in names]
        if max(times) <= 1.05 * min(times):
            break
        w = {n: chosen[n].batch / chosen[n].seconds for n in names}
    return chosen, problems


def _apportion_positive(total: int, weights: list[float]) -> list[int]:
    from atoll.planner.sites import _apportion

    parts = _apportion(total, weights)
    # Every site gets at least one sequence (else it would not be in the subset).
    for i, p in enumerate(parts):
        if p == 0:
            j = max(range(len(parts)), key=lambda k: parts[k])
            parts[j] -= 1
            parts[i] = 1
    return parts


def _sync_options(num_sites: int, budget: RiskBudget, req: PlanRequest, *, steps: int, num_layers: int) -> list[SyncChoice]:
    if num_sites == 1:
        return [SyncChoice("ddp", 1, "fp16")]
    out = []
    for strategy in req.strategies:
        if strategy not in budget.strategies:
            continue
        if strategy == "ddp":
            out.append(SyncChoice("ddp", 1, "fp16"))
            continue
        for h in INNER_STEP_CHOICES:
            if h > budget.max_inner_steps or steps / h < budget.min_rounds:
                continue
            for codec in budget.codecs:
                if strategy == "streaming":
                    for f in FRAGMENT_CHOICES:
                        if f <= num_layers and h % f == 0:
                            out.append(SyncChoice(strategy, h, codec, fragments=f, overlap_steps=1))
                else:
                    out.append(SyncChoice(strategy, h, codec))
    return out


def _risk_key(c: Candidate) -> tuple[int, int, int, int]:
    """Smaller is safer: codec loss (none < fp16 < int8 < int4 < topk < lowrank), then H, then
    staleness (ddp < diloco < streaming < delayed), then fragments."""
    strategy_rank = {"ddp": 0, "diloco": 1, "streaming": 2, "delayed": 3}[c.sync.strategy]
    return (CODECS.index(c.sync.codec), c.sync.inner_steps, strategy_rank, c.sync.fragments)


def _failure_overhead(sync: SyncChoice, sites: tuple[SitePlan, ...], *, shape: ModelShape, round_s: float,
                      req: PlanRequest) -> float:
    rate = {sp.name: sum(g.count / (g.device.mtbf_hours * 3600.0) for g in sp.estimate.groups) for sp in sites}
    if sync.strategy == "ddp" or len(sites) == 1:
        # Synchronous: every failure stops everyone and rolls back half a checkpoint interval.
        return sum(rate.values()) * (req.recovery_s + req.checkpoint_interval_s / 2)
    total_tokens = sum(sp.estimate.tokens for sp in sites)
    lost = 0.0
    for sp in sites:
        heal = HEAL_STATE_FACTOR * 4.0 * shape.num_params() / sp.link.down_bytes_per_s if sp.link else 0.0
        lost += rate[sp.name] * (req.recovery_s + heal + round_s / 2) * sp.estimate.tokens / total_tokens
    lost = min(lost, 0.9)
    return lost / (1.0 - lost)


def plan(topology: Topology, shape: ModelShape, req: PlanRequest) -> PlanResult:
    """Search plans for training `shape` on `topology`; the contract of `atoll plan`.

    Pure and deterministic (a few seconds at most). Raises `AtollError` when the model fits on
    no site, the batch is too small for the sites, or the topology is unusable.
    """
    if req.tokens <= 0:
        raise AtollError(f"--tokens must be positive, got {req.tokens:g}")
    seq_len = req.seq_len or default_seq_len(shape)
    batch = req.global_batch or default_global_batch(shape, seq_len)
    budget = RISK_BUDGETS[req.risk]
    groups = site_groups(topology)
    links = site_links(topology)
    names = [s.name for s in topology.sites]
    steps = math.ceil(req.tokens / (batch * seq_len))

    fits_alone = {}
    for n in names:
        fits_alone[n] = bool(best_site_layout(shape, groups[n], batch=batch, seq_len=seq_len, space=req.space, engine=req.engine))
    if not any(fits_alone.values()):
        _raise_fits_nowhere(shape, groups, batch=batch, seq_len=seq_len, req=req)
    usable = [n for n in names if fits_alone[n]]
    notes = [f"site {n} cannot hold {shape.name} with any layout; it is left out" for n in names if not fits_alone[n]]

    subsets: list[tuple[str, ...]] = []
    if req.all_sites:
        if len(usable) < len(names):
            raise AtollError(f"--all-sites: {notes[0]}")
        subsets = [tuple(usable)]
    elif len(usable) <= 5:
        for k in range(len(usable), 0, -1):
            subsets += list(itertools.combinations(usable, k))
    else:
        subsets = [tuple(usable)] + [tuple(x for x in usable if x != n) for n in usable] + [(n,) for n in usable]

    # Throughput weights from all usable sites sharing the batch in proportion to sustained peak.
    peak = [sum(g.count * g.device.matmul_flops for g in groups[n]) for n in usable]
    weights = {}
    for n, b in zip(usable, _apportion_positive(batch, peak) if len(usable) <= batch else [1] * len(usable)):
        found = best_site_layout(shape, groups[n], batch=b, seq_len=seq_len, space=req.space, engine=req.engine)
        weights[n] = found[0].batch / found[0].seconds if found else peak[usable.index(n)] / 1e15

    candidates: list[Candidate] = []
    key = (lambda c: c.cost_usd) if req.objective == "cost" else (lambda c: c.time_to_train_s)
    for subset in subsets:
        if len(subset) > batch:
            continue
        if candidates and _cannot_win(subset, weights, groups, steps=steps, batch=batch, best=min(map(key, candidates)),
                                      objective=req.objective):
            continue
        chosen, problems = _site_throughputs(shape, groups, list(subset), batch=batch, seq_len=seq_len, req=req,
                                             weights=weights)
        if problems:
            continue
        site_plans = tuple(SitePlan(n, chosen[n], links.get(n)) for n in subset)
        compute = max(sp.estimate.seconds for sp in site_plans)
        sub_links = [links[n] for n in subset if n in links]
        for sync in _sync_options(len(subset), budget, req, steps=steps, num_layers=shape.num_layers):
            if len(subset) == 1:
                sync_s, wan_bytes, exposed, latency = 0.0, 0.0, 0.0, 0.0
            else:
                if sync.strategy == "ddp":
                    payload = shape.num_params() * req.engine.grad_bytes
                else:
                    payload = codec_bytes(sync.codec, shape)
                sync_s = exchange_seconds(payload, sub_links)
                wan_bytes = per_site_bytes(payload, len(subset))
                exposed = exposed_per_round(sync.strategy, inner_steps=sync.inner_steps, step_s=compute, sync_s=sync_s,
                                            fragments=sync.fragments, overlap_steps=sync.overlap_steps,
                                            latency_s=exchange_latency(sub_links)) / sync.inner_steps
                latency = exchange_latency(sub_links)
            overhead = _failure_overhead(sync, site_plans, shape=shape, round_s=sync.inner_steps * compute, req=req)
            candidates.append(Candidate(
                sites=site_plans, sync=sync, global_batch=batch, seq_len=seq_len, steps=steps, compute_step_s=compute,
                sync_s=sync_s, sync_latency_s=latency, wan_bytes_per_sync=wan_bytes, exposed_per_step_s=exposed, failure_overhead=overhead,
                unused_sites=tuple(n for n in names if n not in subset),
            ))
    if not candidates:
        raise AtollError(
            f"no plan: the global batch of {batch} sequences is too small to give every data-parallel replica "
            f"a sequence on the sites that can hold {shape.name}; raise --global-batch"
        )
    candidates.sort(key=key)
    best = key(candidates[0])
    near = [c for c in candidates if key(c) <= best * (1 + req.time_tolerance)]
    recommended = min(near, key=lambda c: (_risk_key(c), key(c)))
    from atoll.planner.reasons import explain_choice

    recommended = explain_choice(recommended, candidates, shape=shape, budget=budget, req=req, notes=notes)
    top = _distinct_top(candidates, recommended, req.top)
    return PlanResult(shape=shape, request=req, candidates=tuple(top), recommended=recommended, notes=tuple(notes))


def _cannot_win(subset: tuple[str, ...], weights: dict[str, float], groups: dict[str, tuple[DeviceGroup, ...]], *,
                steps: int, batch: int, best: float, objective: Objective, margin: float = 1.1) -> bool:
    """Whether even a free WAN could not bring `subset` within `margin` of the best plan so far.

    The bound uses each site's throughput (sequences/s) measured when all sites shared the batch."""
    seconds = steps * batch / sum(weights[n] for n in subset)
    if objective == "cost":
        price = sum(g.count * g.device.usd_per_hour for n in subset for g in groups[n])
        return seconds / 3600 * price > margin * best
    return seconds > margin * best


def _distinct_top(cands: list[Candidate], recommended: Candidate, n: int) -> list[Candidate]:
    """The recommended plan first, then the best of each (sites, strategy) family."""
    out = [recommended]
    seen = {(tuple(sp.name for sp in recommended.sites), recommended.sync.strategy)}
    for c in cands:
        k = (tuple(sp.name for sp in c.sites), c.sync.strategy)
        if k in seen:
            continue
        seen.add(k)
        out.append(c)
        if len(out) >= n:
            break
    return out


def _raise_fits_nowhere(shape: ModelShape, groups: dict[str, tuple[DeviceGroup, ...]], *, batch: int, seq_len: int,
                        req: PlanRequest) -> None:
    parts = []
    for name, gs in groups.items():
        for g in gs:
            need = min_devices_needed(shape, g.device)
            parts.append(f"{need} x {g.device.memory_gb:g} GB {g.device.kind} (site {name} has {g.count})")
    raise AtollError(
        f"{shape.name} ({shape.num_params() / 1e9:.1f}B parameters) fits on no site: model states alone need at "
        f"least {'; or '.join(parts)}; add devices to a site, use a smaller model, or lower --seq-len"
    )
