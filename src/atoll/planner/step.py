"""Step time of one data-parallel group of identical devices: the intra-site performance model.

Each operation of a decoder block is timed with a roofline on the device: a matrix multiply
takes max(FLOPs / sustained matmul FLOP/s, bytes / achieved memory bandwidth); a bandwidth-bound
operation (norms, activations, residual adds, softmax, dropout, the loss) takes bytes / achieved
bandwidth. Collectives are ring algorithms at the achieved bus bandwidth of the slowest link
they cross. The pipeline runs m micro-batches through p stages in (m + (p-1)/v) stage times,
at the pace of its slowest stage (the first holds the embedding, the last the logits and loss).

Only per-device efficiencies enter (`DeviceSpec.*_efficiency`); there is no per-model fudge.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

from atoll.errors import AtollError
from atoll.hardware import DeviceSpec
from atoll.planner.cost import ring_allgather_seconds, ring_allreduce_seconds, training_flops_per_token
from atoll.planner.memory import Attention, Recompute
from atoll.planner.shape import ModelShape


@dataclass(frozen=True)
class Layout:
    """How one site (or device group) lays the model out: TP x PP x DP and the micro-batch."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int = 1
    """Interleaved virtual stages per pipeline rank (Narayanan et al. 2021); 1: plain 1F1B."""
    micro_batch: int = 1
    zero: int = 1
    """0: DDP (replicated optimizer); 1, 2: ZeRO-1/2; 3: ZeRO-3 / FSDP full sharding."""
    recompute: Recompute = "none"
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "vp", "micro_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AtollError(f"layout.{name} must be a positive integer, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise AtollError(f"layout.zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.recompute not in ("none", "selective", "full"):
            raise AtollError(f"layout.recompute must be none, selective or full, got {self.recompute!r}")
        if self.sequence_parallel and self.tp == 1:
            raise AtollError("layout.sequence_parallel needs tp > 1")

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        """Short text such as ``TP8 PP4(v3) DP32 b2 ZeRO-1 recompute=full SP``."""
        pp = f"PP{self.pp}" + (f"(v{self.vp})" if self.vp > 1 else "")
        zero = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "FSDP"}[self.zero]
        parts = [f"TP{self.tp}", pp, f"DP{self.dp}", f"b{self.micro_batch}", zero]
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}")
        if self.sequence_parallel:
            parts.append("SP")
        return " ".join(parts)


@dataclass(frozen=True)
class RuntimeProfile:
    """How the training software executes a step (what the model shape does not say): the
    efficiency profile of a training runtime, atoll's own or the one a published run used."""

    attention: Attention = "flash"
    """``flash``: fused attention, no T x T matrix in memory; ``materialized``: scores, softmax, dropout."""
    dropout: bool = False
    grad_bytes: int = 2
    """Bytes per gradient element in the data-parallel reduction."""
    overlap_grad_reduce: bool = True
    """Bucketed gradient reduction during the last backward (PyTorch DDP, FSDP2); False: after it."""
    overlap_p2p: bool = False
    """Pipeline sends overlapped with compute; False: blocking sends."""
    optimizer_bytes_per_param: float = 48.0
    """Memory traffic of one Adam update per parameter (grad cast 6, norm and overflow checks 8,
    Adam 28 = read p, g, m, v and write p, m, v in fp32, cast back 6)."""
    loss_bytes_per_logit: float = 48.0
    """Memory traffic of the softmax cross-entropy, forward and backward, per logit (fp32)."""
    latency_intra_s: float = 5e-6
    latency_inter_s: float = 10e-6
    eager_activations: bool = True
    """Autograd keeps what an un-fused PyTorch model saves (see memory.activation_bytes_per_layer)."""


ATOLL_RUNTIME = RuntimeProfile()
"""atoll's trainer on accelerators: SDPA (flash) attention, no dropout, DDP/FSDP2 overlap."""

MEGATRON_2021 = RuntimeProfile(
    attention="materialized", dropout=True, overlap_grad_reduce=False, eager_activations=False
)
"""Megatron-LM as run for SC'21 Table 1: fused softmax on a materialized score matrix,
dropout 0.1, fp16 gradients; `overlap_grad_reduce` is True for its ``--DDP-impl torch`` rows."""


@dataclass(frozen=True)
class OpCost:
    """One operation of a decoder block, forward, for one micro-batch on one device."""

    name: str
    flops: float
    bytes: float
    seconds: float
    backward_seconds: float
    bound: Literal["compute", "memory", "attention", "network"]


@dataclass(frozen=True)
class StepEstimate:
    """Predicted time of one optimizer step of one data-parallel group, by part (seconds)."""

    layout: Layout
    micro_batches: int
    stage_seconds: float
    """Slowest stage's time for one micro-batch: forward, backward, recompute, TP and p2p traffic."""
    pipeline_seconds: float
    """All micro-batches through the pipeline, bubble included."""
    bubble_seconds: float
    tp_seconds: float
    """Tensor-parallel collectives inside `pipeline_seconds` (not overlapped)."""
    p2p_seconds: float
    dp_seconds: float
    """Exposed data-parallel gradient (and FSDP parameter) traffic."""
    dp_total_seconds: float
    """All data-parallel traffic, hidden or not."""
    optimizer_seconds: float
    tokens: int
    """Tokens the group processes per step: dp x micro_batch x micro_batches x seq_len."""
    model_flops: float
    """6N + 12·L·H·Q·T FLOPs of those tokens (no recomputation): the MFU numerator."""
    peak_flops: float
    """Peak FLOP/s of all the group's devices."""
    ops: tuple[OpCost, ...] = field(default=(), repr=False)

    @property
    def seconds(self) -> float:
        return self.pipeline_seconds + self.dp_seconds + self.optimizer_seconds

    @property
    def mfu(self) -> float:
        """Model FLOPs utilization: model FLOPs / (step seconds x peak FLOP/s of the devices)."""
        return self.model_flops / (self.seconds * self.peak_flops)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _gemm(name: str, dev: DeviceSpec, e: int, m: float, n: float, k: float, batch: float = 1.0) -> OpCost:
    flops = 2.0 * m * n * k * batch
    nbytes = e * (m * k + k * n + m * n) * batch
    t = max(flops / dev.matmul_flops, nbytes / dev.memory_bytes_per_s)
    bound: Literal["compute", "memory"] = (
        "compute" if flops / dev.matmul_flops >= nbytes / dev.memory_bytes_per_s else "memory"
    )
    # The backward runs two multiplies of the same size (input gradient and weight gradient).
    return OpCost(name, flops, nbytes, t, 2.0 * t, bound)


def _mem(name: str, dev: DeviceSpec, fwd_bytes: float, bwd_bytes: float | None = None) -> OpCost:
    bwd = 2.0 * fwd_bytes if bwd_bytes is None else bwd_bytes
    rate = dev.memory_bytes_per_s
    return OpCost(name, 0.0, fwd_bytes, fwd_bytes / rate, bwd / rate, "memory")


@functools.lru_cache(maxsize=4096)
def block_ops(
    shape: ModelShape,
    *,
    seq_len: int,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    runtime: RuntimeProfile,
    device: DeviceSpec,
) -> tuple[OpCost, ...]:
    """The operations of one decoder block for one micro-batch on one tensor-parallel rank (cached)."""
    s, b, h, t, e = seq_len, micro_batch, shape.dim, tp, device.compute_bytes
    rows = b * s
    f = shape.ffn_dim
    heads = shape.num_heads / t
    repl = t if sequence_parallel else 1  # elementwise work outside TP regions is split only with SP
    ops = [
        _mem("norm (attention)", device, 2 * e * rows * h / repl),
        _gemm("qkv projection", device, e, rows, (h + 2 * shape.kv_dim) / t, h),
    ]
    if not shape.learned_positions:
        ops.append(_mem("rotary embedding", device, 2 * e * rows * (h + shape.kv_dim) / t))
    if runtime.attention == "flash":
        # Causal: the kernel skips the masked half. Backward: 5 multiplies against 2 forward.
        flops = 4.0 * b * s * s * heads * shape.head_dim * 0.5
        fwd = flops / (device.peak_flops * device.attention_efficiency)
        ops.append(OpCost("flash attention", flops, 0.0, fwd, 2.5 * fwd, "attention"))
    else:
        ops.append(_gemm("scores Q·Kᵀ", device, e, s, s, shape.head_dim, batch=b * heads))
        scores = b * heads * s * s
        fwd_bytes = 2 * e + ((2 * e + 1) if runtime.dropout else 0)
        bwd_bytes = 3 * e + ((2 * e + 1) if runtime.dropout else 0)
        ops.append(
            _mem("softmax" + (" + dropout" if runtime.dropout else ""), device, scores * fwd_bytes, scores * bwd_bytes)
        )
        ops.append(_gemm("scores·V", device, e, s, shape.head_dim, s, batch=b * heads))
    residual_bytes = (3 * e + (1 if runtime.dropout else 0)) * rows * h / repl
    ops += [
        _gemm("output projection", device, e, rows, h, h / t),
        _mem("residual add (attention)", device, residual_bytes),
        _mem("norm (MLP)", device, 2 * e * rows * h / repl),
        _gemm(
            "MLP up" + (" + gate" if shape.mlp == "swiglu" else ""),
            device,
            e,
            rows,
            (shape.mlp_matrices - 1) * f / t,
            h,
        ),
        _mem("SwiGLU" if shape.mlp == "swiglu" else "GELU", device, (shape.mlp_matrices) * e * rows * f / t),
        _gemm("MLP down", device, e, rows, h, f / t),
        _mem("residual add (MLP)", device, residual_bytes),
    ]
    return tuple(ops)


def _tp_allreduce_seconds(
    shape: ModelShape, *, seq_len: int, micro_batch: int, tp: int, device: DeviceSpec, runtime: RuntimeProfile
) -> float:
    """One tensor-parallel all-reduce (or all-gather + reduce-scatter with SP) of the block output."""
    size = seq_len * micro_batch * shape.dim * device.compute_bytes
    return ring_allreduce_seconds(
        size, tp, bus_bytes_per_s=device.intra_node_bytes_per_s, latency_s=runtime.latency_intra_s
    )


def dp_bus_bytes_per_s(layout: Layout, *, device: DeviceSpec, per_node: int) -> float:
    """Bus bandwidth of a data-parallel ring: NVLink-class inside a node, else the NICs.

    The g ranks of one data-parallel group that share a node drive g NICs in parallel (one ring
    per NIC), so the ring's inter-node bandwidth is g x one device's NIC.
    """
    model_parallel = layout.tp * layout.pp
    per_node_ranks = max(1, per_node // model_parallel) if model_parallel <= per_node else 1
    if layout.dp <= per_node_ranks:
        return device.intra_node_bytes_per_s
    return min(device.intra_node_bytes_per_s, per_node_ranks * device.nic_bytes_per_s)


def estimate_step(
    shape: ModelShape,
    *,
    seq_len: int,
    layout: Layout,
    micro_batches: int,
    device: DeviceSpec,
    per_node: int = 8,
    runtime: RuntimeProfile = ATOLL_RUNTIME,
) -> StepEstimate:
    """Predict one optimizer step of `layout` running `micro_batches` per data-parallel replica.

    Pure arithmetic (microseconds); the search calls it for thousands of layouts. Raises
    `AtollError` when the layout cannot split the model (heads or layers not divisible).
    """
    lay = layout
    if shape.num_heads % lay.tp or (shape.num_kv_heads % lay.tp and lay.tp % shape.num_kv_heads):
        raise AtollError(f"tp={lay.tp} does not divide the {shape.num_heads} attention heads of {shape.name}")
    if lay.pp * lay.vp > shape.num_layers:
        raise AtollError(f"pp x vp = {lay.pp * lay.vp} exceeds the {shape.num_layers} layers of {shape.name}")
    if micro_batches < 1:
        raise AtollError("micro_batches must be >= 1")
    s, b, t, e = seq_len, lay.micro_batch, lay.tp, device.compute_bytes
    ops = block_ops(
        shape, seq_len=s, micro_batch=b, tp=t, sequence_parallel=lay.sequence_parallel, runtime=runtime, device=device
    )
    fwd = sum(op.seconds for op in ops)
    bwd = sum(op.backward_seconds for op in ops)
    core = sum(op.seconds for op in ops if op.name.startswith(("scores", "softmax", "flash")))
    ar = _tp_allreduce_seconds(shape, seq_len=s, micro_batch=b, tp=t, device=device, runtime=runtime)
    tp_fwd, tp_bwd = 2 * ar, 2 * ar
    recompute = {"none": 0.0, "selective": core, "full": fwd + tp_fwd}[lay.recompute]
    layer_s = fwd + bwd + recompute + tp_fwd + tp_bwd
    layer_tp = tp_fwd + tp_bwd + (tp_fwd if lay.recompute == "full" else 0.0)

    layers_per_stage = -(-shape.num_layers // lay.pp)
    rows = b * s
    embed = _mem("embedding", device, 2 * e * rows * shape.dim, (e + 4) * rows * shape.dim)
    head = _gemm("output head", device, e, rows, shape.vocab_size / t, shape.dim)
    loss = _mem(
        "loss",
        device,
        rows * shape.vocab_size / t * runtime.loss_bytes_per_logit / 3,
        rows * shape.vocab_size / t * runtime.loss_bytes_per_logit * 2 / 3,
    )
    first_extra = embed.seconds + embed.backward_seconds
    last_extra = head.seconds + head.backward_seconds + loss.seconds + loss.backward_seconds
    if lay.pp == 1:
        stage = layers_per_stage * layer_s + first_extra + last_extra
    else:
        stage = layers_per_stage * layer_s + max(first_extra, last_extra)

    p2p = 0.0
    if lay.pp > 1:
        act = rows * shape.dim * e / t  # scatter-gather (or SP): each TP rank sends its 1/t
        crosses_nodes = lay.tp * lay.pp > per_node
        bw = device.nic_bytes_per_s if crosses_nodes else device.intra_node_bytes_per_s
        lat = runtime.latency_inter_s if crosses_nodes else runtime.latency_intra_s
        one = act / bw + lat
        p2p = 0.0 if runtime.overlap_p2p else 2 * lay.vp * one
    stage_total = stage + p2p
    m = micro_batches
    pipeline = (m + (lay.pp - 1) / lay.vp) * stage_total
    bubble = (lay.pp - 1) / lay.vp * stage_total

    # Data-parallel traffic of the first stage (it holds the embedding: the most parameters).
    stage_params = layers_per_stage * shape.layer_params() / t + shape.vocab_size * shape.dim / t
    bus = dp_bus_bytes_per_s(lay, device=device, per_node=per_node)
    lat = runtime.latency_inter_s
    d = lay.dp
    last_backward = layers_per_stage * (bwd + tp_bwd + recompute)
    if lay.zero == 3 and d > 1:
        per_micro = 3 * ring_allgather_seconds(stage_params * e, d, bus_bytes_per_s=bus, latency_s=lat)
        dp_total = m * per_micro
        compute_per_micro = stage
        dp_exposed = per_micro / 3 + m * max(0.0, per_micro - compute_per_micro)
    else:
        grads = stage_params * runtime.grad_bytes
        if lay.zero == 2:
            reduce = ring_allgather_seconds(grads, d, bus_bytes_per_s=bus, latency_s=lat)
            gather = ring_allgather_seconds(stage_params * e, d, bus_bytes_per_s=bus, latency_s=lat)
        else:
            reduce = ring_allreduce_seconds(grads, d, bus_bytes_per_s=bus, latency_s=lat)
            gather = 0.0
        dp_total = reduce + gather
        if runtime.overlap_grad_reduce and d > 1:
            # Buckets go out as the backward produces them; the last bucket (~ one block) cannot hide.
            dp_exposed = max(0.0, reduce - last_backward) + reduce / max(1, layers_per_stage) + gather
        else:
            dp_exposed = dp_total
    opt_params = stage_params / (d if lay.zero >= 1 else 1)
    optimizer = opt_params * runtime.optimizer_bytes_per_param / device.memory_bytes_per_s

    tokens = lay.dp * b * m * s
    model_flops = training_flops_per_token(shape, seq_len=s) * tokens
    return StepEstimate(
        layout=lay,
        micro_batches=m,
        stage_seconds=stage_total,
        pipeline_seconds=pipeline,
        bubble_seconds=bubble,
        tp_seconds=(m + (lay.pp - 1) / lay.vp) * layers_per_stage * layer_tp,
        p2p_seconds=(m + (lay.pp - 1) / lay.vp) * p2p,
        dp_seconds=dp_exposed,
        dp_total_seconds=dp_total,
        optimizer_seconds=optimizer,
        tokens=tokens,
        model_flops=model_flops,
        peak_flops=lay.devices * device.peak_flops,
        ops=tuple([*ops, embed, head, loss]),
    )
