"""A model split into pipeline stages: canonical names, the full model's values, the same logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atoll.errors import AtollError
from atoll.model import PRESETS
from atoll.model.llama import Transformer

CFG = dataclasses.replace(PRESETS["tiny"], num_layers=4, tie_embeddings=False)


def full_and_stages(parts: list[tuple[list[int], bool, bool]]) -> tuple[Transformer, list[Transformer]]:
    torch.manual_seed(0)
    full = Transformer(CFG)
    stages = []
    for layers, embed, head in parts:
        torch.manual_seed(0)
        stages.append(Transformer(CFG, layers=layers, embed=embed, head=head))
    return full, stages


def test_stages_hold_the_full_models_parameters_under_its_names() -> None:
    full, (first, last) = full_and_stages([([0, 1], True, False), ([2, 3], False, True)])
    whole = full.state_dict()
    a, b = first.state_dict(), last.state_dict()
    assert set(a) | set(b) == set(whole) and not set(a) & set(b)
    assert "embed.weight" in a and "layers.1.attn.q_proj.weight" in a and "norm.weight" not in a
    assert {"layers.2.mlp.down_proj.weight", "norm.weight", "lm_head.weight"} <= set(b)
    for key, value in (a | b).items():  # same seed: each stage drew the values the full model did
        assert torch.equal(value, whole[key]), key
    assert full.is_whole and not first.is_whole and not last.is_whole


def test_stages_chained_give_the_full_models_logits() -> None:
    full, (first, last) = full_and_stages([([0, 1], True, False), ([2, 3], False, True)])
    tokens = torch.randint(0, CFG.vocab_size, (2, 16))
    hidden = first(tokens)
    assert hidden.shape == (2, 16, CFG.dim)
    assert torch.equal(last(hidden), full(tokens))


def test_an_interleaved_container_runs_each_virtual_stage_alone() -> None:
    # pp 2, vp 2: rank 0 holds stages 0 and 2 (layers 0 and 2), rank 1 stages 1 and 3.
    full, (rank0, rank1) = full_and_stages([([0, 2], True, False), ([1, 3], False, True)])
    assert rank0.layers.indices() == [0, 2] and list(rank0.state_dict())[1].startswith("layers.0.")
    tokens = torch.randint(0, CFG.vocab_size, (2, 8))
    x = rank0(tokens, layers=[0], head=False)
    x = rank1(x, layers=[1], embed=False, head=False)
    x = rank0(x, layers=[2], embed=False, head=False)
    assert torch.equal(rank1(x, layers=[3], embed=False), full(tokens))


def test_layers_behave_like_a_module_list() -> None:
    model = Transformer(CFG, layers=[1, 3], embed=False)
    held = model.layers
    assert len(held) == 2 and list(held) == [held.block(1), held.block(3)] == [held[0], held[1]]
    for k, block in enumerate(held):  # how recomputation wraps blocks: by position
        held[k] = torch.nn.Sequential(block)
    assert held.block(3) is held[-1] and "layers.3.0.attn.q_proj.weight" in model.state_dict()
    with pytest.raises(IndexError, match="layer 0 is not held"):
        held.block(0)
    with pytest.raises(IndexError, match="2 blocks held"):
        held[2] = torch.nn.Identity()


def test_bad_parts_are_refused() -> None:
    with pytest.raises(AtollError, match="model.tie_embeddings: false"):
        Transformer(dataclasses.replace(CFG, tie_embeddings=True), layers=[0, 1], head=False)
    with pytest.raises(AtollError, match="not all in 0..3"):
        Transformer(CFG, layers=[3, 4])
    middle = Transformer(CFG, layers=[1], embed=False, head=False)
    with pytest.raises(AtollError, match="no embedding or no output head"):
        middle(torch.zeros(1, 4, dtype=torch.long), embed=True)
    with pytest.raises(AtollError, match="hidden states must have shape"):
        middle(torch.zeros(1, 4, dtype=torch.long))
