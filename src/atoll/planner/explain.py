"""`atoll plan --explain`: the arithmetic behind the chosen plan, line by line."""

from __future__ import annotations

from atoll.planner.candidates import Candidate, PlanRequest
from atoll.planner.cost import matmul_params, training_flops_per_token
from atoll.planner.shape import ModelShape
from atoll.planner.wan import codec_bytes, exposed_per_round


def _t(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.2f} h"
    if seconds >= 1:
        return f"{seconds:,.3f} s"
    return f"{seconds * 1e3:,.3f} ms"


def explain(c: Candidate, shape: ModelShape, req: PlanRequest) -> list[tuple[str, list[str]]]:
    """Sections of (title, lines) showing how every predicted number of `c` was computed."""
    out: list[tuple[str, list[str]]] = []
    s = c.seq_len
    n = matmul_params(shape)
    attn = shape.num_layers * shape.num_heads * shape.head_dim * s
    fpt = training_flops_per_token(shape, seq_len=s)
    out.append(
        (
            "model",
            [
                f"{shape.name}: {shape.num_params():,} parameters ({shape.num_layers} layers, dim {shape.dim}, "
                f"{shape.num_heads} heads / {shape.num_kv_heads} kv, ffn {shape.ffn_dim} {shape.mlp}, "
                f"vocab {shape.vocab_size})",
                (
                    f"FLOPs per token = 6N + 12·L·H·Q·T = 6 x {n:,} + 12 x {attn:,} = {fpt:.4g} (N: matmul "
                    "parameters incl. the head)"
                ),
                (
                    f"steps = ceil(tokens / (batch x seq)), whole rounds of H = ceil({req.tokens:.4g} / "
                    f"({c.global_batch} x {s})) = {c.steps:,}"
                ),
            ],
        )
    )
    for sp in c.sites:
        est = sp.estimate
        lay = est.layout
        lines = [f"layout {lay.describe()}; {est.batch} sequences per step"]
        for g, r, m, seq, step, mem in zip(
            est.groups, est.replicas, est.micro_batches, est.sequences, est.steps, est.memory
        ):
            dev = g.device
            lines.append(
                f"{g.count} x {dev.kind}: {r} replicas x {m} micro-batches of {lay.micro_batch} "
                f"({seq} sequences); sustained matmul {dev.matmul_flops / 1e12:.0f} TFLOP/s "
                f"({dev.peak_tflops:g} x {dev.matmul_efficiency}), memory {dev.memory_bytes_per_s / 1e12:.2f} TB/s"
            )
            lines.append("  one block, one micro-batch (forward | backward):")
            for op in step.ops:
                lines.append(
                    f"    {op.name:<26} {_t(op.seconds):>12} | {_t(op.backward_seconds):>12}  ({op.bound}-bound)"
                )
            lines += [
                f"  stage time per micro-batch (fwd + bwd + recompute + TP + p2p) = {_t(step.stage_seconds)}",
                f"  pipeline = (m + (p-1)/v) x stage = ({m} + {lay.pp - 1}/{lay.vp}) x {_t(step.stage_seconds)} = "
                f"{_t(step.pipeline_seconds)} (bubble {_t(step.bubble_seconds)}, TP collectives {_t(step.tp_seconds)}, "
                f"p2p {_t(step.p2p_seconds)})",
                f"  data-parallel reduction {_t(step.dp_total_seconds)}, exposed {_t(step.dp_seconds)}; "
                f"optimizer {_t(step.optimizer_seconds)}",
                (
                    f"  step = {_t(step.pipeline_seconds)} + {_t(step.dp_seconds)} + "
                    f"{_t(step.optimizer_seconds)} = {_t(step.seconds)}"
                ),
                f"  memory per device: model states {mem.model_states / 1e9:.1f} GB + activations "
                f"{mem.activations / 1e9:.1f} GB + transient {mem.transient / 1e9:.1f} GB + workspace "
                f"{mem.workspace / 1e9:.1f} GB = {mem.total / 1e9:.1f} of {mem.capacity / 1e9:.0f} GB",
            ]
        out.append((f"site {sp.name}", lines))
    if len(c.sites) > 1:
        sync = c.sync
        lines = []
        if sync.strategy == "ddp":
            payload = shape.num_params() * req.runtime.grad_bytes
            lines.append(
                f"payload = gradients in {req.runtime.grad_bytes} bytes x {shape.num_params():,} = "
                f"{payload / 1e9:.2f} GB, every step"
            )
        else:
            payload = codec_bytes(sync.codec, shape)
            lines.append(f"payload = {sync.codec}({shape.num_params():,} parameters) = {payload / 1e9:.3f} GB per site")
        k = len(c.sites)
        lines.append(
            f"each site sends (all-gather) (S-1) x payload = {k - 1} x {payload / 1e9:.3f} GB = "
            f"{c.wan_bytes_per_sync / 1e9:.3f} GB per sync"
        )
        for sp in c.sites:
            if sp.link:
                lines.append(
                    f"  {sp.name}: up {sp.link.up_bytes_per_s * 8 / 1e6:,.0f} Mbit/s, down "
                    f"{sp.link.down_bytes_per_s * 8 / 1e6:,.0f} Mbit/s "
                    f"-> {c.wan_bytes_per_sync / min(sp.link.up_bytes_per_s, sp.link.down_bytes_per_s):,.1f} s"
                )
        lines.append(f"sync time = slowest site + latency hops = {_t(c.sync_s)}")
        exposed = exposed_per_round(
            sync.strategy,
            inner_steps=sync.inner_steps,
            step_s=c.compute_step_s,
            sync_s=c.sync_s,
            fragments=sync.fragments,
            overlap_steps=sync.overlap_steps,
            latency_s=c.sync_latency_s,
        )
        rule = {
            "ddp": "exposed = sync time, every step",
            "diloco": "exposed per round = sync time",
            "delayed": (
                f"exposed per round = max(0, sync - H x step) = max(0, {_t(c.sync_s)} - "
                f"{sync.inner_steps} x {_t(c.compute_step_s)})"
            ),
            "streaming": (
                "exposed per round = max(F x max(0, frag - tau x step), F x frag - H x step), "
                f"frag = transfer/F + latency, F={sync.fragments}, tau={sync.overlap_steps}"
            ),
        }[sync.strategy]
        lines.append(f"{rule} = {_t(exposed)}")
        lines.append(
            f"wall step = slowest site's round / H {_t(c.compute_step_s)} + {_t(exposed)} / {sync.inner_steps} = "
            f"{_t(c.wall_step_s)}"
        )
        out.append(("WAN exchange", lines))
    out.append(("efficiency", _efficiency_lines(c)))
    out.append(
        (
            "time to train",
            [
                f"utilization = sum(devices x site step) / (devices x wall step) = {c.utilization:.4f}",
                f"failures: expected overhead {c.failure_overhead:.4f} (rate = devices / MTBF; cost per "
                "failure = recovery "
                + (
                    "+ half a checkpoint interval, everyone waits)"
                    if c.sync.strategy == "ddp" or len(c.sites) == 1
                    else "+ heal + half a round, that site's tokens only)"
                ),
                f"time = steps x wall step x (1 + overhead) = {c.steps:,} x {_t(c.wall_step_s)} x "
                f"{1 + c.failure_overhead:.4f} = "
                f"{c.time_to_train_s / 86400:,.2f} days",
                f"cost = hours x sum(devices x $/h) = ${c.cost_usd:,.0f} (catalog prices are illustrative)",
            ],
        )
    )
    return out


def _efficiency_lines(c: Candidate) -> list[str]:
    """How `c.efficiency` comes about: per site H, step, round and solo rate, then the factors."""
    eff = c.efficiency
    lines = []
    for sp, h in zip(c.sites, c.site_inner_steps):
        est = sp.estimate
        solo = eff.sites[sp.name]
        lines.append(
            f"{sp.name}: H {h} x step {_t(est.seconds)} = {_t(h * est.seconds)} per round, "
            f"{est.batch} sequences per step; its throughput in the run / alone = {solo:.4f}"
        )
    lines += [
        "alone: each group of alike devices runs whole micro-batches with its own data-parallel traffic",
        f"inside sites = sum(batch / step) / sum(solo) = {eff.ranks:.4f} (shares, micro-batches)",
        f"rounds = sum(H x batch) / slowest round / sum(batch / step) = {eff.rounds:.4f} (whole inner steps)",
        f"exchange = slowest round / (slowest round + exposed exchange) = {eff.exchange:.4f}",
        f"efficiency = {eff.ranks:.4f} x {eff.rounds:.4f} x {eff.exchange:.4f} = {eff.efficiency:.4f}",
    ]
    return lines
