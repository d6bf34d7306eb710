"""`plan.yaml`: what `atoll plan` writes and `atoll train --plan` reads.

    version: 1
    model: qwen1.5-107b
    tokens: 1.0e+11
    seq_len: 4096
    global_batch: 1024            # sequences per (inner) step, all sites together (each the same batch)
    sync: {strategy: delayed, inner_steps: 50, codec: int8, fragments: 1, overlap_steps: 0,
           outer_lr: 0.7, outer_momentum: 0.9}
    sites:
      - name: beijing
        devices: [{kind: a800, count: 80}]
        batch: 512                # sequences per inner step in this site
        inner_steps: 50           # this site's H (diloco, delayed: sites x H split by step speed)
        layout: {tp: 4, pp: 1, dp: 20, vp: 1, micro_batch: 1, zero: 3, recompute: none,
                 sequence_parallel: true}
        predicted: {step_s: 90.1, mfu: 0.64, memory_gb: 59.2, efficiency: 0.97}
    predicted: {..., efficiency: 0.97}  # the planner's numbers, for reports; the trainer ignores them
    reasons: [...]

A trainer reads the sections it implements and reports the rest with `unhonored`, instead of
silently dropping them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, model_validator

from atoll.config.load import read_yaml, validate
from atoll.config.schema import Section
from atoll.errors import AtollError
from atoll.sync.codec_specs import DEFAULT_BLOCK_SIZE, DEFAULT_LOWRANK_RANK, DEFAULT_TOPK_FRACTION, CodecName

if TYPE_CHECKING:
    from atoll.planner.candidates import Candidate

PLAN_VERSION = 1


class SyncSettings(Section):
    """The cross-site exchange."""

    strategy: Literal["ddp", "diloco", "streaming", "delayed"] = Field(
        description=(
            "ddp: all-reduce gradients every step; diloco: outer step every H; streaming: "
            "fragments on staggered schedules; delayed: outer update applied one round late."
        )
    )
    inner_steps: int = Field(1, ge=1, description="H: inner steps between outer syncs (1 for ddp).")
    codec: CodecName = Field("none", description="Compression of what crosses the WAN.")
    fragments: int = Field(1, ge=1, description="Streaming: model fragments synced on staggered schedules.")
    overlap_steps: int = Field(
        0, ge=0, description="Streaming: inner steps an exchange may overlap before compute waits (tau)."
    )
    outer_lr: float = Field(0.7, gt=0, description="Outer SGD learning rate (DiLoCo default).")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Outer Nesterov momentum (DiLoCo default).")
    quant_block: int = Field(DEFAULT_BLOCK_SIZE, gt=0, description="int8/int4: elements per absmax scale.")
    topk_fraction: float = Field(DEFAULT_TOPK_FRACTION, gt=0, le=1, description="topk: fraction of entries sent.")
    lowrank_rank: int = Field(DEFAULT_LOWRANK_RANK, gt=0, description="lowrank: rank of the factors.")

    @model_validator(mode="after")
    def _check(self) -> SyncSettings:
        if self.strategy == "ddp" and self.inner_steps != 1:
            raise ValueError("sync.inner_steps must be 1 with strategy ddp")
        if self.strategy != "streaming" and (self.fragments != 1 or self.overlap_steps != 0):
            raise ValueError("sync.fragments and sync.overlap_steps apply only to strategy streaming")
        return self


class LayoutSettings(Section):
    tp: int = Field(1, ge=1, description="Tensor-parallel degree.")
    pp: int = Field(1, ge=1, description="Pipeline stages.")
    dp: int = Field(1, ge=1, description="Data-parallel replicas in the site.")
    vp: int = Field(1, ge=1, description="Interleaved virtual stages per pipeline rank.")
    micro_batch: int = Field(1, ge=1, description="Sequences per forward/backward on one replica.")
    zero: int = Field(1, ge=0, le=3, description="0: DDP; 1, 2: ZeRO-1/2; 3: FSDP (full sharding).")
    recompute: Literal["none", "selective", "full"] = "none"
    sequence_parallel: bool = False


class DeviceCount(Section):
    kind: str
    count: int = Field(gt=0)
    sequences: int | None = Field(
        None, ge=0, description="Sequences per step on these devices (uneven split by speed)."
    )


class SitePredicted(Section):
    step_s: float
    mfu: float
    memory_gb: float
    efficiency: float | None = Field(
        None, description="The site's throughput in the run over its devices' solo throughput."
    )


class SiteSettings(Section):
    name: str
    devices: list[DeviceCount] = Field(min_length=1)
    batch: int = Field(ge=1, description="Sequences per inner step in this site.")
    inner_steps: int = Field(1, ge=1, description="This site's H.")
    layout: LayoutSettings = Field(default_factory=LayoutSettings)
    predicted: SitePredicted | None = None


class Predicted(Section):
    compute_step_s: float
    wall_step_s: float
    sync_s: float
    wan_bytes_per_sync: float
    utilization: float
    time_to_train_s: float
    days: float
    cost_usd: float
    mfu_by_kind: dict[str, float] = Field(default_factory=dict)
    efficiency: float | None = Field(
        None,
        description="Throughput over the sum of the devices' solo throughputs (planner.hetero): the product "
        "of efficiency_ranks, efficiency_rounds and efficiency_exchange.",
    )
    efficiency_ranks: float | None = Field(None, description="Inside sites: shares and micro-batches.")
    efficiency_rounds: float | None = Field(None, description="Between sites: whole inner steps per round.")
    efficiency_exchange: float | None = Field(None, description="The exchange time compute waits for.")


class Plan(Section):
    """A training plan for several sites."""

    version: Literal[1] = PLAN_VERSION
    model: str
    model_params: int = Field(ge=1)
    topology: str = Field(description="The topology file the plan was made for.")
    tokens: float = Field(gt=0)
    seq_len: int = Field(ge=1)
    global_batch: int = Field(ge=1, description="Sequences per (inner) step over all sites.")
    steps: int = Field(ge=1, description="Inner steps to reach `tokens`.")
    sync: SyncSettings
    sites: list[SiteSettings] = Field(min_length=1)
    predicted: Predicted | None = None
    reasons: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        total = sum(s.batch for s in self.sites)
        if total != self.global_batch:
            raise ValueError(f"sites' batches add up to {total}, but global_batch is {self.global_batch}")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("site names must be unique")
        return self

    def site(self, name: str) -> SiteSettings:
        for s in self.sites:
            if s.name == name:
                return s
        raise AtollError(f"plan has no site {name!r}; its sites: {', '.join(s.name for s in self.sites)}")


def load_plan(path: Path) -> Plan:
    """Read and validate a plan.yaml; raises `AtollError` naming the problem."""
    return validate(Plan, read_yaml(Path(path)), source=f"plan {path}")


def write_plan(plan: Plan, path: Path) -> None:
    """Write `plan` as YAML (the format `load_plan` reads)."""
    Path(path).write_text(
        yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )


def plan_settings(plan: Plan) -> dict[str, Any]:
    """Every setting a trainer must honor, as dotted keys: ``sync.codec``, ``sites.beijing.layout.tp``...

    Predictions and reasons are not settings and are left out.
    """
    out: dict[str, Any] = {f"sync.{k}": v for k, v in plan.sync.model_dump().items()}
    out["global_batch"] = plan.global_batch
    out["seq_len"] = plan.seq_len
    out["steps"] = plan.steps
    for site in plan.sites:
        prefix = f"sites.{site.name}"
        out[f"{prefix}.batch"] = site.batch
        out[f"{prefix}.inner_steps"] = site.inner_steps
        for k, v in site.layout.model_dump().items():
            out[f"{prefix}.layout.{k}"] = v
        for d in site.devices:
            if d.sequences is not None:
                out[f"{prefix}.devices.{d.kind}.sequences"] = d.sequences
    return out


def unhonored(plan: Plan, honors: Callable[[str, Any], bool]) -> list[str]:
    """The plan's settings that `honors(key, value)` rejects, as ``key=value`` lines.

    Settings at their neutral value (tp=1, zero=1 ...) are skipped only if `honors` accepts
    them; the trainer decides. Example: ``unhonored(plan, lambda k, v: not k.endswith(".tp") or v == 1)``.
    """
    return [f"{k}={v}" for k, v in plan_settings(plan).items() if not honors(k, v)]


SHORT_RUN_ROUNDS = 64
"""Below this many outer rounds the planner recommends damped averaging (`SHORT_RUN_OUTER`), at
or above it DiLoCo's Nesterov step (`LONG_RUN_OUTER`): see `outer_settings`."""
SHORT_RUN_OUTER = (0.6, 0.0)
LONG_RUN_OUTER = (0.7, 0.9)


def outer_settings(rounds: int) -> tuple[float, float]:
    """(outer lr, outer momentum) for a run of `rounds` outer rounds.

    Measured (`bench/outer_sweep.py`, 16 rounds of H = 32, two sites): momentum costs loss in a
    run this short (Nesterov 0.7/0.9: +7.6% validation loss against DDP, plain averaging +3.4%,
    averaging with outer lr 0.6 +2.7%), as it did at 6 rounds; momentum needs rounds to pay
    off, and DiLoCo's 0.7/0.9 is published from runs of hundreds to thousands of rounds. The
    crossover was not measured here: runs of fewer than `SHORT_RUN_ROUNDS` rounds (4x the
    measured length) get the measured winner, longer runs the published setting.
    """
    return SHORT_RUN_OUTER if rounds < SHORT_RUN_ROUNDS else LONG_RUN_OUTER


def plan_from_candidate(candidate: Candidate, *, model: str, model_params: int, topology: str, tokens: float) -> Plan:
    """The plan.yaml content for one of the search's candidates."""
    c = candidate
    mfu = c.mfu_by_kind()
    eff = c.efficiency
    sites = []
    for sp, site_h in zip(c.sites, c.site_inner_steps, strict=True):
        est = sp.estimate
        lay = est.layout
        devices = [
            DeviceCount(kind=g.device.kind, count=g.count, sequences=(seq if len(est.groups) > 1 else None))
            for g, seq in zip(est.groups, est.sequences)
        ]
        site_mfu = sum(mfu[g.device.kind] * g.count * g.device.peak_flops for g in est.groups) / sum(
            g.count * g.device.peak_flops for g in est.groups
        )
        sites.append(
            SiteSettings(
                name=sp.name,
                devices=devices,
                batch=est.batch,
                inner_steps=site_h,
                layout=LayoutSettings(
                    tp=lay.tp,
                    pp=lay.pp,
                    dp=lay.dp,
                    vp=lay.vp,
                    micro_batch=lay.micro_batch,
                    zero=lay.zero,
                    recompute=lay.recompute,
                    sequence_parallel=lay.sequence_parallel,
                ),
                predicted=SitePredicted(
                    step_s=round(est.seconds, 6),
                    mfu=round(site_mfu, 4),
                    memory_gb=round(max(m.total for m in est.memory) / 1e9, 2),
                    efficiency=round(eff.sites[sp.name], 4),
                ),
            )
        )
    sync = SyncSettings(
        strategy=c.sync.strategy,
        inner_steps=c.sync.inner_steps,
        codec=c.sync.codec if c.sync.strategy != "ddp" else "none",
        fragments=c.sync.fragments,
        overlap_steps=c.sync.overlap_steps,
    )
    if c.sync.strategy != "ddp":
        sync.outer_lr, sync.outer_momentum = outer_settings(c.steps // max(1, c.sync.inner_steps))
    return Plan(
        model=model,
        model_params=model_params,
        topology=topology,
        tokens=tokens,
        seq_len=c.seq_len,
        global_batch=c.global_batch,
        steps=c.steps,
        sync=sync,
        sites=sites,
        predicted=Predicted(
            compute_step_s=round(c.compute_step_s, 6),
            wall_step_s=round(c.wall_step_s, 6),
            sync_s=round(c.sync_s, 3),
            wan_bytes_per_sync=round(c.wan_bytes_per_sync),
            utilization=round(c.utilization, 4),
            time_to_train_s=round(c.time_to_train_s, 1),
            days=round(c.days, 3),
            cost_usd=round(c.cost_usd, 2),
            mfu_by_kind={k: round(v, 4) for k, v in mfu.items()},
            efficiency=round(eff.efficiency, 4),
            efficiency_ranks=round(eff.ranks, 4),
            efficiency_rounds=round(eff.rounds, 4),
            efficiency_exchange=round(eff.exchange, 4),
        ),
        reasons=list(c.reasons),
    )
