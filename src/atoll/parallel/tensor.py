"""Tensor (and sequence) parallelism inside a site, with `torch.distributed.tensor`.

`parallelize` shards a `atoll.model.llama.Transformer` over the "tp" dimension of the site's
mesh, from outside the model (the model file imports only torch):

    embed                 vocabulary-parallel: rows (tokens) sharded, the lookup's partial sums
                          all-reduced (or reduce-scattered along the sequence with SP)
    attn.q/k/v_proj       column-wise: each rank holds whole heads (heads and kv heads divide tp)
    attn.o_proj           row-wise: the rank's heads' share of the output, summed over tp
    mlp.gate/up_proj      column-wise
    mlp.down_proj         row-wise
    lm_head               column-wise with the logits left sharded over the vocabulary
                          (`Shard(-1)`); `loss_context` computes the cross-entropy on the shards,
                          so the full (B, T, vocab) logits are never gathered
    tied head             the final norm's output becomes a replicated DTensor, so the model's
                          ``F.linear(x, embed.weight)`` multiplies by the vocabulary-sharded
                          embedding and gives the same `Shard(-1)` logits

With `sequence_parallel`, the norms run on a slice of the sequence (`Shard(1)`) and the
attention and MLP gather it first; the row-wise projections then reduce-scatter instead of
all-reducing. The gradient of a replicated parameter (a norm's weight without SP) is the same on
every tp rank, so the total norm (`grad_norm`) counts it once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)


def parallelize(model: nn.Module, mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard `model` (a `Transformer`, unwrapped, whole or a pipeline stage's part) over the 1-D tp
    `mesh` in place; collective. A part without the embedding (every stage but the first) or the
    head (every stage but the last) shards only what it holds."""
    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()  # the residual stream between blocks
    has_embed = getattr(model, "embed", None) is not None
    has_norm = getattr(model, "norm", None) is not None
    has_head = getattr(model, "lm_head", None) is not None
    top: dict[str, Any] = {}
    if has_embed:
        top["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if sp and has_norm:
        top["norm"] = SequenceParallel()
    if has_head:
        top["lm_head"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, mesh, top)
    if has_norm and not has_head:  # tied: logits = F.linear(norm(x), embed.weight)
        model.norm.register_forward_hook(lambda _m, _args, out: _replicated(out, mesh))  # type: ignore[union-attr]
    for block in model.layers:  # type: ignore[union-attr]
        plan: dict[str, Any] = {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=stream),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=stream),
        }
        if sp:
            gather = {"input_layouts": (Shard(1),), "desired_input_layouts": (Replicate(),), "use_local_output": True}
            plan |= {
                "attn_norm": SequenceParallel(),
                "mlp_norm": SequenceParallel(),
                "attn": PrepareModuleInput(**gather),
                "mlp": PrepareModuleInput(**gather),
            }
        parallelize_module(block, mesh, plan)


def _replicated(out: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    if isinstance(out, DTensor):
        return out.redistribute(mesh, [Replicate()])
    return DTensor.from_local(out, mesh, [Replicate()], run_check=False)


def loss_context(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Around a forward whose loss reads vocabulary-sharded logits, and its backward: the
    cross-entropy then works on the shards (nothing outside it changes)."""
    return loss_parallel() if enabled else contextlib.nullcontext()


def scalar(value: torch.Tensor) -> float:
    """A loss's value as a float; a replicated DTensor's local copy is the whole value."""
    if isinstance(value, DTensor):
        value = value.to_local()
    return float(value.item())


@torch.no_grad()
def reduce_partial_gradients(params: list[nn.Parameter]) -> None:
    """Sum the gradients that tensor parallelism leaves as pending partial sums over tp (a
    sequence-parallel norm's weight: each rank saw a slice of the sequence) into the parameter's
    own placement; collective over tp. FSDP2 does this itself in its reduce-scatter; without it
    the optimizer and the gradient norm need the sum. Every rank calls it with the same order."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)  # type: ignore[attr-defined]


@torch.no_grad()
def grad_norm(params: list[nn.Parameter], *, max_norm: float) -> float:
    """The whole model's gradient norm over parameters that may be DTensors sharded over any
    mesh dimensions; clips to `max_norm` (> 0) as `torch.nn.utils.clip_grad_norm_` would.

    Collective over the mesh dimensions the gradients are sharded on (every rank must call it
    with its parameters in the same order). A plain tensor's gradient, or a DTensor's along a
    replicated dimension, is the same on every rank there and counts once.
    """
    groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            shard_dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            groups.setdefault((id(g.device_mesh), shard_dims), []).append(g)
        else:
            plain.append(g)
    total = torch.zeros((), dtype=torch.float64)
    if plain:
        total += _sum_squares(plain).cpu()
    for (_, shard_dims), grads in groups.items():
        part = _sum_squares([g.to_local() for g in grads])
        mesh = grads[0].device_mesh  # type: ignore[attr-defined]
        for dim in shard_dims:
            dist.all_reduce(part, group=mesh.get_group(dim))
        total += part.cpu()
    norm = math.sqrt(float(total))
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            locals_ = [
                p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None
            ]
            torch._foreach_mul_(locals_, coef)
    return norm


def _sum_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].new_zeros((), dtype=torch.float64)
    for t in tensors:
        total += t.detach().double().pow(2).sum()
    return total
