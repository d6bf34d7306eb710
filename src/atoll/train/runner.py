"""The default step runner: forward and backward over a rank's micro-batches, for every layout
whose ranks each run the whole depth of the model (data, tensor and sequence parallelism).

`atoll.train.loop` calls a `atoll.train.job.StepRunner` once per step and never asks how the
model is split; a pipeline runner (`atoll.parallel.pipeline`) answers the same two calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from atoll.parallel.dist import average_gradients
from atoll.parallel.layout import RankPlace
from atoll.parallel.tensor import grad_norm, loss_context, reduce_partial_gradients, scalar
from atoll.train.job import LossFn


class LocalRunner:
    """Runs every micro-batch through the rank's (possibly tensor-parallel) model.

    DDP and FSDP2 reduce the gradients on the last micro-batch only (`no_sync`); `uneven` ranks
    (`atoll.train.balance`) reduce none, the loop then sums them once after timing each rank
    alone. With tensor parallelism and zero 0 the gradients are averaged over `dp_group` here,
    after the last micro-batch, and the loss is taken on vocabulary-sharded logits.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        place: RankPlace,
        uneven: bool = False,
        tensor_parallel: bool = False,
        dp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.place = place
        self.uneven = uneven
        self.tensor_parallel = tensor_parallel
        self.dp_group = dp_group  # set: average the gradients over it after the last micro-batch

    def forward_backward(self, micro_batches: list[torch.Tensor], scale: float) -> float:
        loss_sum = 0.0
        last = len(micro_batches) - 1
        for i, micro in enumerate(micro_batches):
            with no_sync(self.model, skip=self.uneven or i < last), loss_context(self.tensor_parallel):
                loss = self.loss_fn(self.model, micro)
                (loss * scale).backward()
            loss_sum += scalar(loss)
        if self.tensor_parallel:
            params = [p for p in self.model.parameters() if p.requires_grad]
            reduce_partial_gradients(params)
            if self.dp_group is not None:
                average_gradients(params, group=self.dp_group, size=self.place.dp_size)
        return loss_sum if self.place.counts else 0.0

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        if self.tensor_parallel:
            return grad_norm(params, max_norm=max_norm)
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def no_sync(model: nn.Module, *, skip: bool) -> contextlib.AbstractContextManager[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not skip:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()  # type: ignore[no-any-return,operator]
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]
