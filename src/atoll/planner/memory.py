"""Memory per device: model states (weights, gradients, Adam) and activations.

Model states follow the ZeRO paper's mixed-precision Adam accounting (16 bytes per parameter:
2 weights + 2 gradients + 12 fp32 master, momentum and variance); activations follow Korthikanti
et al. (2022), generalized from GPT's GELU MLP to SwiGLU, grouped-query attention and fused
(flash) attention, which stores no T x T score matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from atoll.planner.shape import ModelShape

Recompute = Literal["none", "selective", "full"]
Attention = Literal["flash", "materialized"]

WORKSPACE_BYTES = 2e9
"""Reserved per device for the runtime: CUDA/CANN context, collective buffers, allocator slack."""


def model_state_bytes_per_param(*, zero: int, dp: int) -> float:
    """Bytes per parameter of weights + gradients + Adam states (ZeRO paper, mixed precision).

    zero 0 (DDP): 16; ZeRO-1: 4 + 12/N_d; ZeRO-2: 2 + 14/N_d; ZeRO-3 / FSDP: 16/N_d.
    """
    if zero == 0 or dp <= 1:
        return 16.0
    if zero == 1:
        return 4.0 + 12.0 / dp
    if zero == 2:
        return 2.0 + 14.0 / dp
    if zero == 3:
        return 16.0 / dp
    raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")


def activation_bytes_per_layer(
    shape: ModelShape,
    *,
    seq_len: int,
    micro_batch: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: Recompute = "none",
    attention: Attention = "flash",
    dropout: bool = False,
    element_bytes: int = 2,
    eager: bool = False,
) -> float:
    """Activation bytes one decoder block keeps for its backward pass, for one micro-batch.

    In units of s·b·h (sequence x micro-batch x width), for GPT with dropout and 2-byte elements
    this is Korthikanti et al.'s 10 + 24/t + 5·a·s/(h·t) without sequence parallelism and
    34/t + 5·a·s/(h·t) with it; selective recomputation drops the a·s/h term; full
    recomputation keeps only the block's input. `eager` counts what PyTorch autograd keeps for
    atoll's un-fused model on top: the attention output both as the attention kernel saved it and
    as its reshaped copy, and the SiLU output of SwiGLU.
    """
    s, b, h, e = seq_len, micro_batch, shape.dim, element_bytes
    unit = s * b * h
    if recompute == "full":
        return unit * e / (tp if sequence_parallel else 1)
    # Inputs of the two norms, of the QKV projection and of the MLP; dropout masks (1 byte each).
    replicated = 4 * e + (2 if dropout else 0)
    # Q, K, V, attention output, and the MLP's intermediate tensors (2 for GELU, 3 for SwiGLU).
    sharded = e * (1 + 2 * shape.kv_dim / h) + e + shape.mlp_matrices * e * shape.ffn_dim / h
    if eager:
        sharded += e + (e * shape.ffn_dim / h if shape.mlp == "swiglu" else 0.0)
    scores = 0.0
    if attention == "materialized" and recompute == "none":
        per_score = e + ((1 + e) if dropout else 0)  # softmax output (+ dropout mask and output)
        scores = shape.num_heads * s / h * per_score
    repl_div = tp if sequence_parallel else 1
    return unit * (replicated / repl_div + (sharded + scores) / tp)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on the most loaded device of a layout, by part."""

    model_states: float
    activations: float
    transient: float
    """Largest short-lived buffer: logits and loss, a recomputed block, or gathered FSDP shards."""
    workspace: float
    capacity: float

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.transient + self.workspace

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def estimate_memory(
    shape: ModelShape,
    *,
    seq_len: int,
    micro_batch: int,
    micro_batches: int,
    tp: int,
    pp: int,
    dp: int,
    vp: int = 1,
    zero: int = 1,
    recompute: Recompute = "none",
    sequence_parallel: bool = False,
    attention: Attention = "flash",
    dropout: bool = False,
    element_bytes: int = 2,
    eager: bool = False,
    capacity_bytes: float,
) -> MemoryEstimate:
    """Peak memory of the first pipeline stage (the one holding the most activations).

    With 1F1B the first stage keeps min(m, p) micro-batches in flight; interleaving multiplies
    that by 1 + (p-1)/(p·v) (Korthikanti et al.). The last stage's logits (b·s·V/t in the
    compute dtype plus fp32 for the loss) count as a transient when they are the larger buffer.
    """
    layers_per_stage = -(-shape.num_layers // pp)
    stage_params = layers_per_stage * shape.layer_params() / tp
    stage_params += shape.vocab_size * shape.dim / tp  # embedding (first stage) or head (last)
    states = stage_params * model_state_bytes_per_param(zero=zero, dp=dp)
    per_layer = activation_bytes_per_layer(
        shape,
        seq_len=seq_len,
        micro_batch=micro_batch,
        tp=tp,
        sequence_parallel=sequence_parallel,
        recompute=recompute,
        attention=attention,
        dropout=dropout,
        element_bytes=element_bytes,
        eager=eager,
    )
    in_flight = min(micro_batches, pp)
    interleave = 1.0 + (pp - 1) / (pp * vp) if pp > 1 and vp > 1 else 1.0
    activations = layers_per_stage * per_layer * in_flight * interleave
    logits = seq_len * micro_batch * shape.vocab_size / tp * (element_bytes + 4)
    transient = logits
    if recompute == "full":
        transient = max(
            transient,
            activation_bytes_per_layer(
                shape,
                seq_len=seq_len,
                micro_batch=micro_batch,
                tp=tp,
                sequence_parallel=sequence_parallel,
                recompute="none",
                attention=attention,
                dropout=dropout,
                element_bytes=element_bytes,
                eager=eager,
            ),
        )
    if zero == 3 and dp > 1:
        transient += 2 * shape.layer_params() / tp * element_bytes  # this block's and the prefetched one's
    return MemoryEstimate(
        model_states=states,
        activations=activations,
        transient=transient,
        workspace=WORKSPACE_BYTES,
        capacity=capacity_bytes,
    )
