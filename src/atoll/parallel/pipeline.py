"""Pipeline parallelism inside a site: the model split into stages by layers, run by
`torch.distributed.pipelining` (GPipe, 1F1B or interleaved 1F1B).

Stages are contiguous ranges of layers, in order: stage 0 also embeds the tokens, the last stage
also applies the final norm, the output head and the loss. With `vp` virtual stages per rank
(interleaved 1F1B) there are pp × vp stages and rank r runs stages r, r + pp, r + 2pp, ...

Each rank holds ONE module, `build_stage_model`'s `Transformer` part: all of its layers under
the full model's parameter names (`layers.{i}.*` with the original i, `embed.weight` only on the
rank of stage 0, `norm.weight` and `lm_head.weight` only on the rank of the last stage). That
is what the optimizer, checkpoints (DCP) and `atoll export` see, so nothing is renamed across
layouts. `PipelineRunner` builds, per virtual stage, a thin module that runs that stage's range
of the same layers (sharing the parameters) for `PipelineStage`.

`PipelineRunner` has the training loop's step-runner shape (`forward_backward`,
`clip_grad_norm`, plus `evaluate`). Every rank of the pipeline group calls each method with the
same micro-batches (only the first stage reads the inputs and only the last the targets; the
others need their count and shape).

    model = build_stage_model(cfg, pp=2, pp_rank=rank, vp=1)
    runner = PipelineRunner(model, schedule="1f1b", num_micro_batches=4, group=pp_group, device=device)
    loss_sum = runner.forward_backward(micro_batches, scale=1 / global_targets)
    norm = runner.clip_grad_norm(list(model.parameters()), max_norm=1.0)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)
from torch.distributed.tensor import DTensor

from atoll.errors import AtollError
from atoll.model.config import ModelConfig
from atoll.model.llama import Layers, Transformer
from atoll.model.loss import autocast
from atoll.parallel.dist import average_gradients
from atoll.parallel.layout import check_schedule

log = logging.getLogger(__name__)

SCHEDULES: dict[str, Any] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
}


def split_layers(num_layers: int, *, pp: int, vp: int = 1, stage_layers: Sequence[int] | None = None) -> list[range]:
    """The layers of each of the pp × vp stages, in pipeline order.

    Even by default (`num_layers` must be divisible by pp × vp); `stage_layers` gives the number
    of layers of each stage instead (a planner's uneven split). Raises `AtollError` for a split
    that leaves a stage without layers or does not cover the model exactly.
    """
    if pp < 1 or vp < 1:
        raise AtollError(f"pp ({pp}) and vp ({vp}) must be at least 1")
    if pp > num_layers:
        raise AtollError(
            f"parallel.pp ({pp}) is more than the model's {num_layers} layers (model.num_layers); "
            "every stage needs a layer: lower pp"
        )
    num_stages = pp * vp
    if stage_layers is None:
        if num_layers % num_stages:
            raise AtollError(
                f"model.num_layers ({num_layers}) is not divisible by pp × vp = {pp} × {vp} stages; "
                "choose pp and vp whose product divides it, or give stage_layers"
            )
        counts = [num_layers // num_stages] * num_stages
    else:
        counts = list(stage_layers)
        if len(counts) != num_stages or min(counts, default=0) < 1 or sum(counts) != num_layers:
            raise AtollError(
                f"stage_layers {counts} must give {num_stages} stages (pp × vp) of at least one layer "
                f"each, summing to model.num_layers ({num_layers})"
            )
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def rank_stages(pp_rank: int, *, pp: int, vp: int = 1) -> list[int]:
    """The stages rank `pp_rank` runs: pp_rank, pp_rank + pp, ... (vp of them)."""
    return [pp_rank + k * pp for k in range(vp)]


def build_stage_model(
    cfg: ModelConfig, *, pp: int, pp_rank: int, vp: int = 1, stage_layers: Sequence[int] | None = None
) -> Transformer:
    """This rank's part of the model: the layers of all its stages under the full model's names.

    Under the same seed its values are the full model's (see `Transformer`). Raises `AtollError`
    for a bad split, and for tied embeddings with pp > 1 (`model.tie_embeddings: false` instead).
    """
    if not 0 <= pp_rank < pp:
        raise AtollError(f"pipeline rank {pp_rank} is outside 0..{pp - 1}")
    ranges = split_layers(cfg.num_layers, pp=pp, vp=vp, stage_layers=stage_layers)
    stages = rank_stages(pp_rank, pp=pp, vp=vp)
    if cfg.tie_embeddings and pp > 1:
        raise AtollError(
            "tied embeddings cannot be split between pipeline stages (stage 0 embeds, the last stage "
            f"projects with the same matrix) and pp is {pp}; set model.tie_embeddings: false"
        )
    layers = [i for s in stages for i in ranges[s]]
    return Transformer(cfg, layers=layers, embed=0 in stages, head=len(ranges) - 1 in stages)


class StagePart(nn.Module):
    """One virtual stage: a contiguous range of a rank's layers, plus the embedding on the first
    stage and the head on the last. Its modules are the rank's container's own (shared
    parameters), registered here too so that DDP or FSDP2 can wrap a stage."""

    def __init__(
        self, model: Transformer, layers: range, *, first: bool, last: bool, device: torch.device, dtype: str
    ) -> None:
        super().__init__()
        self.layer_ids = list(layers)
        self.first, self.last = first, last
        self.run_device, self.dtype = device, dtype
        self.embed = model.embed if first else None
        self.layers = Layers({i: model.layers.block(i) for i in self.layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.seq_len: int | None = None
        """The step's sequence length, set by the runner (a sequence-parallel stage gets a slice)."""
        object.__setattr__(self, "_model", model)  # not a child: its other stages are not this one's

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with autocast(self.run_device, self.dtype):
            return self._model(inputs, layers=self.layer_ids, embed=self.first, head=self.last, seq_len=self.seq_len)


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


class PipelineRunner:
    """Runs one step's micro-batches through the pipeline; one per rank of the pipeline group.

    `model` is `build_stage_model`'s part for this rank (same pp, vp and stage_layers). `group`
    is the pipeline process group (or a 1-D device mesh of it), whose rank is this rank's pipeline
    index. With `dp_group`, gradients are averaged over it after each step (what DDP gives); leave
    it None when the stages are wrapped by DDP/FSDP2 outside. `count_loss` false makes this rank
    report no loss even on the last stage (e.g. every tensor-parallel rank but one).
    `loss_context` is entered around each step's schedule (forward, loss and backward): tensor
    parallelism's `loss_parallel` for vocabulary-sharded logits.

    Each method is collective over the pipeline group (and `dp_group`) and blocks until its part
    of the schedule is done; the groups' timeouts bound the waits.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        schedule: str,
        num_micro_batches: int,
        group: dist.ProcessGroup | DeviceMesh,
        device: torch.device,
        vp: int = 1,
        stage_layers: Sequence[int] | None = None,
        dtype: str = "fp32",
        dp_group: dist.ProcessGroup | None = None,
        count_loss: bool = True,
        loss_context: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.group = group.get_group() if isinstance(group, DeviceMesh) else group
        self.pp = dist.get_world_size(self.group)
        self.pp_rank = dist.get_rank(self.group)
        self.vp = vp
        self.schedule_name = schedule
        check_schedule(schedule, pp=self.pp, vp=vp, num_micro_batches=num_micro_batches)
        self.model = model
        self.device = device
        self.dp_group = dp_group
        ranges = split_layers(model.cfg.num_layers, pp=self.pp, vp=vp, stage_layers=stage_layers)
        self.num_stages = len(ranges)
        self.stage_ids = rank_stages(self.pp_rank, pp=self.pp, vp=vp)
        held = [i for s in self.stage_ids for i in ranges[s]]
        if model.layers.indices() != sorted(held):
            raise AtollError(
                f"pipeline rank {self.pp_rank} should hold layers {sorted(held)} but its model holds "
                f"{model.layers.indices()}; build it with build_stage_model and the same pp, vp and stage_layers"
            )
        self.has_first = 0 in self.stage_ids
        self.has_last = self.num_stages - 1 in self.stage_ids
        self.counts = self.has_last and count_loss
        self.parts = [
            StagePart(model, ranges[s], first=s == 0, last=s == self.num_stages - 1, device=device, dtype=dtype)
            for s in self.stage_ids
        ]
        self.loss_context = loss_context or contextlib.nullcontext
        self._scale = 1.0
        self._schedules: dict[tuple[Any, ...], Any] = {}

    # ------------------------------------------------------------------ schedules

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's loss: summed cross-entropy × scale (grads are not rescaled by torch:
        scale_grads=False), carrying its unscaled value for the runner to report."""
        summed = _summed_cross_entropy(logits, targets)
        scaled = summed * self._scale
        scaled.atoll_unscaled = summed.detach()  # type: ignore[attr-defined]
        return scaled

    def _schedule_for(self, num: int, shape: tuple[int, ...], *, train: bool) -> Any:
        """The schedule (and its stages) for `num` micro-batches of `shape`; built once per kind.

        PipelineStage infers the shapes sent between stages from the first run, so a new count or
        shape gets new stages (all ranks see the same ones, in the same order)."""
        key = (num, shape, train)
        if key not in self._schedules:
            if train:
                check_schedule(self.schedule_name, pp=self.pp, vp=self.vp, num_micro_batches=num)
                cls = SCHEDULES[self.schedule_name]
            else:  # forward only: no backward to interleave, and no constraint on the count
                cls = ScheduleGPipe if len(self.parts) == 1 else ScheduleLoopedBFS
            stages = [
                PipelineStage(part, sid, self.num_stages, self.device, group=self.group)
                for sid, part in zip(self.stage_ids, self.parts, strict=True)
            ]
            multi = cls in (ScheduleInterleaved1F1B, ScheduleLoopedBFS)
            self._schedules[key] = cls(
                stages if multi else stages[0], n_microbatches=num, loss_fn=self._loss, scale_grads=False
            )
        return self._schedules[key]

    def _run(self, micro_batches: list[torch.Tensor], *, train: bool) -> tuple[float, int]:
        shapes = {tuple(mb.shape) for mb in micro_batches}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise AtollError(
                f"the pipeline needs micro-batches of one (batch, seq+1) shape, got {sorted(shapes)}; "
                "give every micro-batch of a step the same size"
            )
        shape = next(iter(shapes))
        schedule = self._schedule_for(len(micro_batches), shape, train=train)
        for part in self.parts:
            part.seq_len = shape[1] - 1
        batch = torch.cat(micro_batches).to(self.device, non_blocking=True)  # split back by the schedule
        args = (batch[:, :-1],) if self.has_first else ()
        target = batch[:, 1:] if self.has_last else None
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        with self.loss_context():
            if train:
                schedule.step(*args, target=target, losses=losses, return_outputs=False)
            else:
                with torch.no_grad():
                    schedule.eval(*args, target=target, losses=losses)
        if not self.counts or losses is None:
            return 0.0, 0
        values = [loss.atoll_unscaled for loss in losses]  # type: ignore[attr-defined]
        values = [v.to_local() if isinstance(v, DTensor) else v for v in values]  # replicated: whole
        return float(torch.stack(values).sum()), target.numel() if target is not None else 0

    # ------------------------------------------------------------------ the step-runner protocol

    def forward_backward(self, micro_batches: list[torch.Tensor], scale: float) -> float:
        """Forward and backward over this step's micro-batches (each (B, T+1) tokens), each
        micro-batch's summed next-token loss times `scale` before backward; gradients accumulate
        into the parameters, in their parameter's placement (a sequence-parallel norm's pending
        partial sums are summed over tp), averaged over `dp_group` when given. Returns the summed unscaled
        loss this rank counts: the last stage's, 0.0 elsewhere, so a sum over the site counts
        each target once per data-parallel replica."""
        self._scale = float(scale)
        total, _ = self._run(micro_batches, train=True)
        settle_partial_gradients(list(self.model.parameters()))
        if self.dp_group is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            average_gradients(params, group=self.dp_group, size=dist.get_world_size(self.dp_group))
        return total

    def evaluate(self, micro_batches: list[torch.Tensor]) -> tuple[float, int]:
        """Forward only (GPipe's order, or looped breadth-first with virtual stages: any number of
        micro-batches): (summed next-token loss, number of targets) this rank counts; (0.0, 0)
        except on the last stage."""
        self._scale = 1.0
        return self._run(micro_batches, train=False)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """The gradient's 2-norm over the whole model (all stages: squared norms summed over the
        pipeline group; DTensor gradients counted over their whole mesh), clipping `params` to
        `max_norm` when it is positive. Same number on every rank of the pipeline group."""
        return clip_grad_norm(params, max_norm, group=self.group, device=self.device)


def shard_stages(runner: PipelineRunner, *, mesh: DeviceMesh, zero: int) -> None:
    """FSDP2 over `mesh` (the dp sub-mesh) on each of `runner`'s stages: every block, then the
    stage itself (not the rank's container: the schedule runs its stages one at a time); zero 3
    reshards after forward, 1 and 2 do not. Collective over `mesh`; call before the first step
    and before building the optimizer (the parameters become sharded DTensors)."""
    from torch.distributed.fsdp import fully_shard

    reshard = zero == 3
    for part in runner.parts:
        for block in part.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(part, mesh=mesh, reshard_after_forward=reshard)


def clip_grad_norm(
    params: list[nn.Parameter], max_norm: float, *, group: dist.ProcessGroup, device: torch.device
) -> float:
    """Total 2-norm of the gradients of a model split across `group` (each rank passes its own
    parameters), clipped to `max_norm` when positive, as `clip_grad_norm_` would on one rank.

    Plain gradients count as they are (replicated ones are the same on every rank that holds
    them); DTensor gradients (tensor parallelism, FSDP2) count over their whole mesh.
    """
    grads = [p.grad for p in params if p.grad is not None]
    squared = torch.zeros((), device=device)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if plain:
        squared += torch.nn.utils.get_total_norm(plain).float().to(device) ** 2
    meshes: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            meshes.setdefault(id(g.device_mesh), []).append(g)
    for on_mesh in meshes.values():  # one norm per mesh: torch does not stack DTensors of different meshes
        norm = torch.nn.utils.get_total_norm(on_mesh)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squared += norm.float().to(device) ** 2
    dist.all_reduce(squared, group=group)
    total = squared.sqrt()
    if max_norm > 0:
        # clip_grads_with_norm_'s coefficient, applied as a number: its foreach path does not mix
        # DTensor and plain gradients
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return float(total)


@torch.no_grad()
def settle_partial_gradients(params: list[nn.Parameter]) -> None:
    """Give DTensor gradients left as pending partial sums (a sequence-parallel norm's weight: each
    tp rank saw a slice of the sequence) their parameter's placement; collective over those
    meshes, in parameter order. FSDP2 does this in its reduce-scatter."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)  # type: ignore[attr-defined]
