"""`atoll train --plan plan.yaml`: turn a plan into config overrides, and say what cannot be honored.

Pure: no torch. The trainer honors the cross-site settings (strategy, H per site, codec and its
options, fragments, overlap, outer optimizer), the sequence length, the step count, the batch
per site and the micro-batch, and each site's layout (`parallel.tp`, `pp`, `vp`, `pp_schedule`,
`sequence_parallel`, `recompute`, `zero`; dp is what the site's ranks leave): a layout every
site shares becomes `--parallel.*` overrides; layouts that differ between sites become each
site's `parallel:` entry of the topology the run is launched with (`site_layouts`, written by
`atoll train --plan --topology`). What it cannot do (batches that differ between sites,
sharding over ranks of different speeds) is listed, never silently dropped.
A plan's per-site H becomes `sync.site_inner_steps` with `sync.balance: always`: the first
round's split, re-measured from then on (`--sync.balance=never` after `--plan` keeps it fixed).
Its per-device sequences become `parallel.device_shares`: where uneven ranks start before the
trainer re-measures them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atoll.config.schema import sync_key_applies
from atoll.config.topology import Topology
from atoll.errors import AtollError
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


def plan_overrides(plan: Plan, *, per_site: bool = False) -> tuple[list[str], list[str]]:
    """(``--section.key=value`` overrides for the run config, ``key=value`` settings not honored).

    `per_site`: the run's sites take their own layouts (`site_layouts`, through the topology), so
    layout keys that differ between sites are not listed as unhonored."""
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
    else:
        unhonored += [f"sites.{s.name}.layout.micro_batch={s.layout.micro_batch}" for s in plan.sites]
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
    layout_args, layout_unhonored = _layout_overrides(plan, per_site=per_site)
    overrides += layout_args
    unhonored += layout_unhonored
    return overrides, unhonored


def _site_layout(plan: Plan, site: Any) -> dict[str, Any]:
    """The layout keys one site's ranks read, as the plan gives them."""
    out: dict[str, Any] = {}
    for key in _LAYOUT_KEYS:
        if not hasattr(site.layout, key):
            continue  # an older plan without this key
        if key == "zero" and all(s.layout.dp == 1 for s in plan.sites):
            continue  # one replica per site: nothing to shard over, whatever level the plan names
        if key in ("vp", "pp_schedule") and site.layout.pp == 1:
            continue  # read only with pipeline stages
        out[key] = getattr(site.layout, key)
    if out.get("vp", 1) > 1 and "pp_schedule" not in out:
        out["pp_schedule"] = "interleaved_1f1b"
    return out


def _mixed(plan: Plan) -> bool:
    """Whether some site's ranks differ in speed (several device kinds, or planned shares)."""
    return any(len(s.devices) > 1 or any(d.sequences is not None for d in s.devices) for s in plan.sites)


def _layout_overrides(plan: Plan, *, per_site: bool) -> tuple[list[str], list[str]]:
    """The sites' layout as ``--parallel.*`` overrides where the sites agree; the rest listed
    (unless `per_site`: then `site_layouts` carries them)."""
    overrides: list[str] = []
    unhonored: list[str] = []
    per_site = per_site and not _mixed(plan)  # uneven ranks: every site keeps whole replicas
    layouts = {s.name: _site_layout(plan, s) for s in plan.sites}
    keys = [k for k in (*_LAYOUT_KEYS,) if any(k in lay for lay in layouts.values())]
    for key in keys:
        values = {n: lay[key] for n, lay in layouts.items() if key in lay}
        if _mixed(plan) and key in _REPLICATED:
            unhonored += [f"sites.{n}.layout.{key}={v}" for n, v in values.items() if v != _REPLICATED[key]]
        elif len(values) == len(layouts) and len(set(values.values())) == 1:
            value = next(iter(values.values()))
            overrides.append(f"--parallel.{key}={str(value).lower() if isinstance(value, bool) else value}")
        elif not per_site:
            unhonored += [f"sites.{n}.layout.{key}={v}" for n, v in values.items()]
    return overrides, unhonored


def site_layouts(plan: Plan) -> dict[str, dict[str, Any]]:
    """Each site's layout keys that not every site shares ({} when one config serves all), for
    the topology's per-site `parallel:` entries. Sites of mixed devices keep whole replicas."""
    if _mixed(plan):
        return {}
    layouts = {s.name: _site_layout(plan, s) for s in plan.sites}
    keys = {k for lay in layouts.values() for k in lay}
    present = list(layouts.values())
    differ = {k for k in keys if not all(k in lay for lay in present) or len({lay[k] for lay in present}) > 1}
    out = {n: {k: v for k, v in lay.items() if k in differ} for n, lay in layouts.items()}
    return {n: lay for n, lay in out.items() if lay} if differ else {}


def with_site_layouts(topology: Topology, layouts: dict[str, dict[str, Any]], *, plan_path: Path) -> Topology:
    """`topology` with each site's planned layout added to its `parallel` (the plan's keys win).
    Raises `AtollError` naming a planned site the topology lacks."""
    names = [s.name for s in topology.sites]
    unknown = sorted(set(layouts) - set(names))
    if unknown:
        raise AtollError(
            f"plan {plan_path} lays out site(s) {', '.join(unknown)} that the topology lacks ({', '.join(names)}); "
            "plan against the topology you train with"
        )
    sites = [s.model_copy(update={"parallel": {**s.parallel, **layouts.get(s.name, {})}}) for s in topology.sites]
    return Topology.model_validate({**topology.model_dump(), "sites": [s.model_dump() for s in sites]})


def describe(unhonored: list[str]) -> str:
    return "plan settings this trainer does not honor yet (ignored): " + ", ".join(unhonored)
