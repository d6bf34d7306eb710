"""parallel.compile: each decoder block compiled in place, the same loss, names and checkpoints."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from atoll.errors import AtollError
from atoll.model import Transformer, get_preset
from atoll.model.loss import token_loss_sum
from atoll.parallel import compiled
from atoll.parallel.dist import DistEnv, wrap_model

CPU = torch.device("cpu")


def loss_and_grads(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss, _ = token_loss_sum(model, batch, device=CPU, dtype="fp32")
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]


def test_compiled_blocks_give_the_same_loss_gradients_and_names() -> None:
    torch.manual_seed(0)
    # One block: each block is compiled on its own (inductor on CPU: ~10 s each on 2 cores).
    model = Transformer(dataclasses.replace(get_preset("tiny"), num_layers=1))
    batch = torch.randint(0, 512, (2, 17))
    other = wrap_model(copy.deepcopy(model), device=CPU, env=DistEnv(), compile=True)
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in other.layers)
    assert other.state_dict().keys() == model.state_dict().keys()  # checkpoints keep the model's names
    ref_loss, ref_grads = loss_and_grads(model, batch)
    loss, grads = loss_and_grads(other, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_on_cpu_without_a_compiler_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled.shutil, "which", lambda _name: None)
    with pytest.raises(AtollError, match="C\\+\\+ compiler.*parallel.compile=false"):
        compiled.compile_blocks(Transformer(get_preset("tiny")), CPU)
