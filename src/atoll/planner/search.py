"""The cross-site search: which sites, what batch each, which sync strategy, H and codec.

For every subset of sites, every site runs the same batch (the global batch over the sites, as the
runtime's `train.global_batch` is per site), each site gets its fastest layout that fits, and
every sync option the loss-risk budget allows is scored. Sites of different speeds run different
numbers of inner steps per round (diloco, delayed: the round's sites x H steps split by speed, the
runtime's `split_steps`), so they reach each exchange together; the outer average weighs them by
tokens. Wall time per nominal step = the round's slowest site (its steps x step time) + the WAN
time compute waits for, over H; time to train = steps x that, stretched by the expected cost of
failures. The recommended plan is the safest option (smallest H, least lossy codec) whose time
is within `time_tolerance` of the fastest.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from atoll.config.topology import Topology
from atoll.errors import AtollError
from atoll.hardware import DeviceSpec, get_device, replace_fields
from atoll.planner.candidates import (
    Candidate,
    Objective,
    PlanRequest,
    PlanResult,
    RiskBudget,
    SitePlan,
    SyncChoice,
)
from atoll.planner.reasons import explain_choice
from atoll.planner.shape import ModelShape
from atoll.planner.sites import DeviceGroup, SiteEstimate, best_site_layout, min_devices_needed
from atoll.planner.wan import STRATEGIES, codec_bytes, exposed_per_round, link_from_mbps
from atoll.sync.codec_specs import CODEC_NAMES
from atoll.sync.link_model import WanLink, allgather_bytes, allgather_latency, allgather_seconds
from atoll.sync.pacing import split_steps

RISK_BUDGETS: dict[str, RiskBudget] = {
    # INTELLECT-1: H=100 with int8; OpenDiLoCo: fp16; Streaming DiLoCo: H=100, equal loss.
    "low": RiskBudget("low", 100, ("none", "fp16", "int8"), ("ddp", "diloco", "streaming"), 20),
    # DiLoCo: H=500 matches synchronous with 8 workers; Streaming DiLoCo: 4-bit outer gradients;
    # DiLoCoX: one-step-delayed outer updates with negligible loss change.
    "medium": RiskBudget("medium", 500, ("none", "fp16", "int8", "int4"), STRATEGIES, 10),
    # SparseLoCo (top-k 1-3% + error feedback), DiLoCoX (low-rank + quantization); DiLoCo's
    # ablation shows the loss gap growing with H past 500. bf16 is left out of every budget: it
    # sends fp16's bytes with less precision, so it could never be the safest of equals.
    "high": RiskBudget("high", 1000, ("none", "fp16", "int8", "int4", "topk", "lowrank"), STRATEGIES, 5),
}

INNER_STEP_CHOICES = (10, 20, 50, 100, 200, 250, 500, 1000)
FRAGMENT_CHOICES = (2, 4, 8)
HEAL_STATE_FACTOR = 5.0
"""A returning site pulls ~5x the model's fp32 bytes (weights, AdamW, backup, outer momentum)."""


# ---------------------------------------------------------------- inputs


def site_groups(topology: Topology) -> dict[str, tuple[DeviceGroup, ...]]:
    """Device groups per site (a lab's emulated slowdown slows its devices); raises `AtollError`
    when a site mixes collective backends."""
    out = {}
    for site in topology.sites:
        groups = tuple(DeviceGroup(_slowed(get_device(d.kind), d.slowdown), d.count, d.per_node) for d in site.devices)
        backends = sorted({g.device.backend for g in groups})
        if len(backends) > 1:
            raise AtollError(
                f"site {site.name} mixes devices of different collective backends ({', '.join(backends)}); "
                "they cannot share one process group: split it into one site per backend in the topology"
            )
        out[site.name] = groups
    return out


def _slowed(device: DeviceSpec, slowdown: float) -> DeviceSpec:
    """The device as the lab emulates it `slowdown` times slower (compute, then sleep): its
    arithmetic and memory rates divided by the factor (the same kind, so plan shares still name it)."""
    if slowdown == 1.0:
        return device
    return replace_fields(
        device, peak_tflops=device.peak_tflops / slowdown, memory_bw_tbs=device.memory_bw_tbs / slowdown
    )


def site_links(topology: Topology) -> dict[str, WanLink]:
    links = {}
    for site in topology.sites:
        spec = topology.link(site.name)
        if spec is None:
            continue
        links[site.name] = link_from_mbps(
            site.name, up_mbps=spec.uplink_mbps, down_mbps=spec.down_mbps, latency_ms=spec.latency_ms
        )
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


def _site_estimates(
    shape: ModelShape,
    groups: dict[str, tuple[DeviceGroup, ...]],
    names: Sequence[str],
    *,
    batch: int,
    seq_len: int,
    req: PlanRequest,
) -> tuple[dict[str, SiteEstimate], list[str]]:
    """Each site's fastest layout for the same per-site `batch` (what the runtime runs: one
    `train.global_batch` everywhere); the sites that cannot run it."""
    chosen: dict[str, SiteEstimate] = {}
    problems: list[str] = []
    for n in names:
        found = best_site_layout(shape, groups[n], batch=batch, seq_len=seq_len, space=req.space, runtime=req.runtime)
        if found:
            chosen[n] = found[0]
        else:
            problems.append(n)
    return chosen, problems


def site_round_steps(sync: SyncChoice, step_seconds: Sequence[float]) -> tuple[int, ...]:
    """Each site's inner steps per round. diloco and delayed: the round's work (sites x H steps)
    split by `atoll.sync.pacing.split_steps`, the runtime's balanced split, so sites of different
    speeds reach each exchange together; ddp and streaming: every site H (ddp 1), since their
    exchanges follow step counts."""
    if sync.strategy in ("diloco", "delayed") and len(step_seconds) > 1:
        return tuple(split_steps(sync.inner_steps * len(step_seconds), step_seconds))
    return (1 if sync.strategy == "ddp" else sync.inner_steps,) * len(step_seconds)


def _sync_options(
    num_sites: int, budget: RiskBudget, req: PlanRequest, *, steps: int, num_layers: int
) -> list[SyncChoice]:
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
    return (CODEC_NAMES.index(c.sync.codec), c.sync.inner_steps, strategy_rank, c.sync.fragments)


def _failure_overhead(
    sync: SyncChoice,
    sites: tuple[SitePlan, ...],
    counts: Sequence[int],
    *,
    shape: ModelShape,
    round_s: float,
    req: PlanRequest,
) -> float:
    rate = {sp.name: sum(g.count / (g.device.mtbf_hours * 3600.0) for g in sp.estimate.groups) for sp in sites}
    if sync.strategy == "ddp" or len(sites) == 1:
        # Synchronous: every failure stops everyone and rolls back half a checkpoint interval.
        return sum(rate.values()) * (req.recovery_s + req.checkpoint_interval_s / 2)
    tokens = [sp.estimate.tokens * c for sp, c in zip(sites, counts)]  # a round's, per site
    lost = 0.0
    for sp, site_tokens in zip(sites, tokens):
        heal = HEAL_STATE_FACTOR * 4.0 * shape.num_params() / sp.link.down_bytes_per_s if sp.link else 0.0
        lost += rate[sp.name] * (req.recovery_s + heal + round_s / 2) * site_tokens / sum(tokens)
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

    fits_alone = {}
    for n in names:
        fits_alone[n] = bool(
            best_site_layout(shape, groups[n], batch=batch, seq_len=seq_len, space=req.space, runtime=req.runtime)
        )
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

    # Each usable site's throughput (sequences/s) when all of them share the batch: a bound that
    # skips subsets that could not win even over a free WAN.
    share = max(1, round(batch / len(usable)))
    weights = {}
    for n in usable:
        found = best_site_layout(shape, groups[n], batch=share, seq_len=seq_len, space=req.space, runtime=req.runtime)
        weights[n] = found[0].batch / found[0].seconds if found else 1e-15

    candidates: list[Candidate] = []
    key = (lambda c: c.cost_usd) if req.objective == "cost" else (lambda c: c.time_to_train_s)
    too_few_steps = 0  # a subset of sites had no sync option: the run is too short for its rounds
    for subset in subsets:
        if len(subset) > batch:
            continue
        # Every site runs the same batch (the runtime's `train.global_batch`); the global batch is
        # the sites' together, as near the requested one as whole sequences allow.
        site_batch = max(1, round(batch / len(subset)))
        sub_batch = site_batch * len(subset)
        sub_steps = math.ceil(req.tokens / (sub_batch * seq_len))
        if candidates and _cannot_win(
            subset,
            weights,
            groups,
            steps=sub_steps,
            batch=sub_batch,
            best=min(map(key, candidates)),
            objective=req.objective,
        ):
            continue
        chosen, problems = _site_estimates(shape, groups, subset, batch=site_batch, seq_len=seq_len, req=req)
        if problems:
            continue
        site_plans = tuple(SitePlan(n, chosen[n], links.get(n)) for n in subset)
        times = [sp.estimate.seconds for sp in site_plans]
        sub_links = [links[n] for n in subset if n in links]
        options = _sync_options(len(subset), budget, req, steps=sub_steps, num_layers=shape.num_layers)
        if not options:
            too_few_steps = sub_steps
        for sync in options:
            counts = site_round_steps(sync, times)
            h = 1 if sync.strategy == "ddp" else sync.inner_steps
            if sync.strategy != "ddp" and max(counts) > budget.max_inner_steps:
                continue  # the fastest site's H is what the loss-risk budget bounds
            compute = max(c * t for c, t in zip(counts, times)) / h  # a round's compute per nominal step
            steps = math.ceil(sub_steps / h) * h  # whole rounds: the runtime runs train.steps // H of them
            if len(subset) == 1:
                sync_s, wan_bytes, exposed, latency = 0.0, 0.0, 0.0, 0.0
            else:
                if sync.strategy == "ddp":
                    payload = shape.num_params() * req.runtime.grad_bytes
                else:
                    payload = codec_bytes(sync.codec, shape)
                sync_s = allgather_seconds(payload, sub_links)
                wan_bytes = allgather_bytes(payload, len(subset))
                latency = allgather_latency(sub_links)
                exposed = (
                    exposed_per_round(
                        sync.strategy,
                        inner_steps=sync.inner_steps,
                        step_s=compute,
                        sync_s=sync_s,
                        fragments=sync.fragments,
                        overlap_steps=sync.overlap_steps,
                        latency_s=latency,
                    )
                    / sync.inner_steps
                )
            overhead = _failure_overhead(
                sync, site_plans, counts, shape=shape, round_s=sync.inner_steps * compute, req=req
            )
            candidates.append(
                Candidate(
                    sites=site_plans,
                    sync=sync,
                    global_batch=sub_batch,
                    seq_len=seq_len,
                    steps=steps,
                    compute_step_s=compute,
                    sync_s=sync_s,
                    sync_latency_s=latency,
                    wan_bytes_per_sync=wan_bytes,
                    exposed_per_step_s=exposed,
                    failure_overhead=overhead,
                    site_inner_steps=counts,
                    unused_sites=tuple(n for n in names if n not in subset),
                )
            )
    if not candidates and too_few_steps:
        raise AtollError(
            f"no plan: {req.tokens:.3g} tokens are {too_few_steps} steps of {batch} x {seq_len} tokens, too few "
            f"for {budget.min_rounds} outer rounds of the smallest H ({min(INNER_STEP_CHOICES)}) that risk "
            f"{budget.level} allows across sites; raise --tokens or lower --global-batch"
        )
    if not candidates:
        raise AtollError(
            f"no plan: the global batch of {batch} sequences is too small to give every data-parallel replica "
            f"a sequence on the sites that can hold {shape.name}; raise --global-batch"
        )
    candidates.sort(key=key)
    best = key(candidates[0])
    near = [c for c in candidates if key(c) <= best * (1 + req.time_tolerance)]
    recommended = min(near, key=lambda c: (_risk_key(c), key(c)))
    recommended = explain_choice(recommended, candidates, shape=shape, budget=budget, req=req, notes=notes)
    top = _distinct_top(candidates, recommended, req.top)
    return PlanResult(shape=shape, request=req, candidates=tuple(top), recommended=recommended, notes=tuple(notes))


def _cannot_win(
    subset: tuple[str, ...],
    weights: dict[str, float],
    groups: dict[str, tuple[DeviceGroup, ...]],
    *,
    steps: int,
    batch: int,
    best: float,
    objective: Objective,
    margin: float = 1.1,
) -> bool:
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


def _raise_fits_nowhere(
    shape: ModelShape, groups: dict[str, tuple[DeviceGroup, ...]], *, batch: int, seq_len: int, req: PlanRequest
) -> None:
    parts = []
    for name, gs in groups.items():
        for g in gs:
            need = min_devices_needed(shape, g.device)
            parts.append(f"{need} x {g.device.memory_gb:g} GB {g.device.kind} (site {name} has {g.count})")
    raise AtollError(
        f"{shape.name} ({shape.num_params() / 1e9:.1f}B parameters) fits on no site: model states alone need at "
        f"least {'; or '.join(parts)}; add devices to a site, use a smaller model, or lower --seq-len"
    )
