"""`atoll train --plan plan.yaml`: turn a plan into config overrides, and say what cannot be honored.

Pure: no torch. The trainer honors the cross-site settings (strategy, H per site, codec and its
options, fragments, overlap, outer optimizer), the sequence length, the step count, the batch
per site and the micro-batch, and full sharding (FSDP2). What it does not do yet (tensor and
pipeline parallelism, sequence parallelism, recomputation, different batches per site) is
listed, never silently dropped. A plan's per-site H becomes `sync.site_inner_steps` (fixed
counts; without them the trainer balances rounds by measurement), and its per-device sequences
become `parallel.device_shares`: where uneven ranks start before the trainer re-measures them.
"""

from __future__ import annotations

from atoll.config.schema import sync_key_applies
from atoll.planner.plan import Plan, plan_settings

_SYNC_KEYS = {
    "strategy": "sync.strategy",
    "inner_steps": "sync.inner_steps",
    "codec": "sync.codec",
    "fragments": "sync.fragments",
    "overlap_steps": "sync.overlap_steps",
    "outer_lr": "sync.outer_lr",
    "outer_momentum": "sync.outer_momentum",
    "quant_block": "sync.block_size",
    "topk_fraction": "sync.topk_fraction",
    "lowrank_rank": "sync.rank",
}
_NEUTRAL_LAYOUT = {"tp": 1, "pp": 1, "vp": 1, "recompute": "none", "sequence_parallel": False}


def plan_overrides(plan: Plan) -> tuple[list[str], list[str]]:
    """(``--section.key=value`` overrides for the run config, ``key=value`` settings not honored)."""
    overrides: list[str] = []
    unhonored: list[str] = []
    for key, value in plan.sync.model_dump().items():
        target = _SYNC_KEYS[key]
        # A plan holds every key; the ones its strategy and codec do not read would only be
        # reported as ignored by the config.
        if sync_key_applies(target.removeprefix("sync."), strategy=plan.sync.strategy, codec=plan.sync.codec):
            overrides.append(f"--{target}={value}")
    overrides += [f"--data.seq_len={plan.seq_len}", f"--train.steps={plan.steps}"]
    batches = {s.batch for s in plan.sites}
    if len(batches) == 1:
        overrides.append(f"--train.global_batch={batches.pop()}")
    else:
        unhonored += [f"sites.{s.name}.batch={s.batch}" for s in plan.sites]
    micro = {s.layout.micro_batch for s in plan.sites}
    if len(micro) == 1:
        overrides.append(f"--train.micro_batch={micro.pop()}")
    site_h = {s.name: s.inner_steps for s in plan.sites if s.inner_steps != plan.sync.inner_steps}
    if site_h:
        overrides.append("--sync.site_inner_steps={" + ", ".join(f"{k}: {v}" for k, v in site_h.items()) + "}")
    shares = {d.kind: d.sequences / d.count for s in plan.sites for d in s.devices if d.sequences is not None}
    if shares:  # where each site's ranks start; the trainer then re-measures them
        overrides.append("--parallel.device_shares={" + ", ".join(f"{k}: {v:g}" for k, v in shares.items()) + "}")
    zeros = {s.layout.zero for s in plan.sites}
    if zeros == {3}:
        overrides.append("--parallel.shard=fsdp")
    elif not zeros <= {0, 1}:
        unhonored += [f"sites.{s.name}.layout.zero={s.layout.zero}" for s in plan.sites if s.layout.zero not in (0, 1)]
    for key, value in plan_settings(plan).items():
        leaf = key.rsplit(".", 1)[-1]
        if ".layout." in key and leaf in _NEUTRAL_LAYOUT and value != _NEUTRAL_LAYOUT[leaf]:
            unhonored.append(f"{key}={value}")
        elif ".devices." in key and not key.endswith(".sequences"):
            unhonored.append(f"{key}={value}")
    return overrides, unhonored


def describe(unhonored: list[str]) -> str:
    return "plan settings this trainer does not honor yet (ignored): " + ", ".join(unhonored)
