"""Why the planner chose what it chose: short sentences with the numbers behind them."""

from __future__ import annotations

import dataclasses

from atoll.planner.candidates import Candidate, PlanRequest, RiskBudget
from atoll.planner.shape import ModelShape
from atoll.planner.wan import codec_bytes


def _days(c: Candidate) -> str:
    return f"{c.days:,.1f} days"


def explain_choice(
    chosen: Candidate,
    cands: list[Candidate],
    *,
    shape: ModelShape,
    budget: RiskBudget,
    req: PlanRequest,
    notes: list[str],
) -> Candidate:
    """`chosen` with its `reasons` filled in, comparing it with the alternatives in `cands`."""
    r: list[str] = []
    tokens_per_step = chosen.global_batch * chosen.seq_len
    r.append(
        f"{chosen.global_batch} sequences x {chosen.seq_len} tokens = {tokens_per_step / 1e6:.2f}M tokens per step; "
        f"{chosen.steps:,} steps for {req.tokens:.3g} tokens"
    )
    rounds = chosen.sync.strategy != "ddp" and len(chosen.sites) > 1
    for sp, site_h in zip(chosen.sites, chosen.site_inner_steps):
        est = sp.estimate
        mem = max(m.total for m in est.memory) / 1e9
        cap = min(m.capacity for m in est.memory) / 1e9
        kinds = "+".join(f"{g.count}x{g.device.kind}" for g in est.groups)
        idle = est.devices_total - est.devices_used
        r.append(
            f"site {sp.name} ({kinds}): {est.layout.describe()}, {est.batch} sequences per step"
            + (f", {site_h} inner steps per round" if rounds else "")
            + f", {est.seconds:.3g} s per step, {mem:.1f} of "
            f"{cap:.0f} GB per device" + (f"; {idle} devices idle (the layout does not divide them)" if idle else "")
        )
        if len(est.groups) > 1:
            shares = ", ".join(f"{g.device.kind} {s}" for g, s in zip(est.groups, est.sequences))
            r.append(f"site {sp.name}: sequences split by speed (the runtime's largest-remainder split): {shares}")
    if rounds and len(set(chosen.site_inner_steps)) > 1:
        r.append(
            f"every site runs the same batch; the round's {chosen.sync.inner_steps} x {len(chosen.sites)} inner "
            "steps are split by the sites' step speeds, so they reach each exchange together (outer average "
            "weighted by tokens)"
        )
    elif len(chosen.sites) > 1 and len({round(sp.estimate.seconds, 9) for sp in chosen.sites}) > 1:
        r.append(
            f"every site runs the same batch and, with {chosen.sync.strategy}, the same steps: the faster sites "
            "wait for the slowest (diloco or delayed would give them more inner steps per round)"
        )
    for name in chosen.unused_sites:
        with_all = [c for c in cands if name in {sp.name for sp in c.sites}]
        if with_all:
            alt = min(with_all, key=lambda c: c.time_to_train_s)
            r.append(f"site {name} left out: the best plan using it takes {_days(alt)} against {_days(chosen)}")
    if len(chosen.sites) > 1:
        links = [sp.link for sp in chosen.sites if sp.link]
        slow = min(min(link.up_bytes_per_s, link.down_bytes_per_s) for link in links)
        fp32 = codec_bytes("none", shape)
        r.append(
            f"WAN: the slowest link carries {slow * 8 / 1e6:,.0f} Mbit/s of payload; the fp32 model "
            f"({fp32 / 1e9:,.1f} GB) takes "
            f"{fp32 / slow:,.0f} s to send once, against {chosen.compute_step_s:.3g} s of compute per step "
            f"(R = {fp32 / slow / chosen.compute_step_s:,.0f})"
        )
        same_sites = [c for c in cands if [sp.name for sp in c.sites] == [sp.name for sp in chosen.sites]]
        ddp = [c for c in same_sites if c.sync.strategy == "ddp"]
        if ddp and chosen.sync.strategy != "ddp":
            d = ddp[0]
            r.append(
                f"ddp across sites would wait {d.exposed_per_step_s:,.1f} s per step on the WAN: utilization "
                f"{d.utilization:.1%}, {_days(d)}"
            )
        r.append(
            f"{chosen.sync.describe()}: {chosen.wan_bytes_per_sync / 1e9:,.2f} GB out of each site per sync, "
            f"{chosen.sync_s:,.1f} s on the WAN; compute waits "
            f"{chosen.exposed_per_step_s * chosen.sync.inner_steps:,.1f} s "
            f"per round of {chosen.sync.inner_steps} steps: utilization {chosen.utilization:.1%}"
        )
        if chosen.sync.strategy != "ddp":
            fastest = min(cands, key=lambda c: c.time_to_train_s)
            r.append(
                f"risk budget {budget.level}: H <= {budget.max_inner_steps}, codecs {', '.join(budget.codecs)}, "
                f">= {budget.min_rounds} outer rounds; this is the safest option within "
                f"{req.time_tolerance:.0%} of the fastest ({fastest.sync.describe()}, {_days(fastest)})"
            )
    r.append(
        f"failures: expected +{chosen.failure_overhead:.1%} time (device MTBF "
        f"{chosen.sites[0].estimate.groups[0].device.mtbf_hours:,.0f} h, "
        f"{req.recovery_s:.0f} s to recover"
        + (
            f", checkpoint every {req.checkpoint_interval_s / 60:.0f} min)"
            if chosen.sync.strategy == "ddp"
            else ", a returning site heals from a peer)"
        )
    )
    r += notes
    return dataclasses.replace(chosen, reasons=tuple(r))
