"""`atoll train --plan plan.yaml`: turn a plan into config overrides, and say what cannot be honored.

Pure: no torch. The trainer honors the cross-site settings (strategy, H per site, codec and its
options, fragments, overlap, outer optimizer), the sequence length, the step count, the batch
per site and the micro-batch, and each site's layout (`parallel.tp`, `pp`, `vp`, `pp_schedule`,
`sequence_parallel`, `recompute`, `zero`; dp is what the site's ranks leave) when every site
has the same one: one config serves all sites. What it cannot do (layouts or batches that differ
between sites, sharding over ranks of different speeds) is listed, never silently dropped.
A plan's per-site H becomes `sync.site_inner_steps` with `sync.balance: always`: the first
round's split, re-measured from then on (`--sync.balance=never` after `--plan` keeps it fixed).
Its per-device sequences become `parallel.device_shares`: where uneven ranks start before the
trainer re-measures them.
"""

from __future__ import annotations

from atoll.config.schema import sync_key_applies
from atoll.planner.plan import Plan

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
# The layout keys the runtime reads (`atoll.parallel.layout`); dp is the ranks' remainder.
_LAYOUT_KEYS = ("tp", "pp", "vp", "pp_schedule", "sequence_parallel", "recompute", "zero")
# What a site whose ranks differ in speed must keep: its uneven batch split needs every rank to
# be a whole replica (`atoll.train.loop.rank_balancer`).
_REPLICATED = {"tp": 1, "pp": 1, "vp": 1, "sequence_parallel": False, "zero": 0}


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
        if plan.sync.strategy in ("diloco", "delayed"):
            # The plan's split starts the run; the trainer then re-measures the sites' step times
            # (a loaded or throttled site is slower than on paper). --sync.balance=never pins it.
            overrides.append("--sync.balance=always")
    shares = {d.kind: d.sequences / d.count for s in plan.sites for d in s.devices if d.sequences is not None}
    if shares:  # where each site's ranks start; the trainer then re-measures them
        overrides.append("--parallel.device_shares={" + ", ".join(f"{k}: {v:g}" for k, v in shares.items()) + "}")
    layout_args, layout_unhonored = _layout_overrides(plan)
    overrides += layout_args
    unhonored += layout_unhonored
    return overrides, unhonored


def _layout_overrides(plan: Plan) -> tuple[list[str], list[str]]:
    """The sites' layout as ``--parallel.*`` overrides where the sites agree; the rest listed."""
    overrides: list[str] = []
    unhonored: list[str] = []
    mixed = any(len(s.devices) > 1 or any(d.sequences is not None for d in s.devices) for s in plan.sites)
    for key in _LAYOUT_KEYS:
        values = {s.name: getattr(s.layout, key) for s in plan.sites if hasattr(s.layout, key)}
        if not values:
            continue  # an older plan without this key
        if key == "zero" and all(s.layout.dp == 1 for s in plan.sites):
            continue  # one replica per site: nothing to shard over, whatever level the plan names
        if mixed and key in _REPLICATED:
            unhonored += [f"sites.{n}.layout.{key}={v}" for n, v in values.items() if v != _REPLICATED[key]]
        elif len(set(values.values())) > 1:
            unhonored += [f"sites.{n}.layout.{key}={v}" for n, v in values.items()]
        else:
            value = next(iter(values.values()))
            if key in ("vp", "pp_schedule") and plan.sites[0].layout.pp == 1:
                continue  # read only with pipeline stages
            overrides.append(f"--parallel.{key}={str(value).lower() if isinstance(value, bool) else value}")
            if key == "vp" and value > 1 and not hasattr(plan.sites[0].layout, "pp_schedule"):
                overrides.append("--parallel.pp_schedule=interleaved_1f1b")
    return overrides, unhonored


def describe(unhonored: list[str]) -> str:
    return "plan settings this trainer does not honor yet (ignored): " + ", ".join(unhonored)
