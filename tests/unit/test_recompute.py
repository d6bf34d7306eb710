"""Activation recompute changes what is kept, never what is computed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from atoll.model import Transformer, get_preset
from atoll.model.loss import token_loss_sum
from atoll.parallel.recompute import apply_recompute, plain_name


def loss_and_grads(model: Transformer, batch: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss, _ = token_loss_sum(model, batch, device=torch.device("cpu"), dtype="fp32")
    loss.backward()
    return loss.item(), {plain_name(n): p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]


@pytest.mark.parametrize(("mode", "wrapped"), [("full", "layers.0"), ("selective", "layers.0.attn")])
def test_recompute_gives_the_same_loss_and_gradients(mode: str, wrapped: str) -> None:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    batch = torch.randint(0, 512, (2, 17))
    other = copy.deepcopy(model)
    apply_recompute(other, mode)
    assert isinstance(other.get_submodule(wrapped), CheckpointWrapper)
    assert other.state_dict().keys() == model.state_dict().keys()  # checkpoints keep the model's names
    ref_loss, ref_grads = loss_and_grads(model, batch)
    loss, grads = loss_and_grads(other, batch)
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name


def test_no_recompute_leaves_the_model_alone() -> None:
    model = Transformer(get_preset("tiny"))
    apply_recompute(model, "none")
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())
