"""Memory predictions against what a real (tiny, CPU) atoll model allocates."""

from __future__ import annotations

import pytest
import torch

from atoll.model import ModelConfig, Transformer
from atoll.planner.memory import activation_bytes_per_layer, estimate_memory, model_state_bytes_per_param
from atoll.planner.shape import shape_from_config


def _config(num_layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=512, dim=128, num_layers=num_layers, num_heads=4, num_kv_heads=4, ffn_dim=384, max_seq_len=128
    )


def _saved_activation_bytes(cfg: ModelConfig, *, batch: int, seq: int) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    return sum(storages.values())


def test_activations_per_layer_match_autograd() -> None:
    batch, seq = 4, 64
    per_layer = (
        _saved_activation_bytes(_config(4), batch=batch, seq=seq)
        - _saved_activation_bytes(_config(2), batch=batch, seq=seq)
    ) / 2
    shape = shape_from_config(_config(2), name="t")
    predicted = activation_bytes_per_layer(shape, seq_len=seq, micro_batch=batch, element_bytes=4, eager=True)
    assert predicted == pytest.approx(per_layer, rel=0.10)


def test_model_states_match_adam_after_a_step() -> None:
    cfg = _config(2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, cfg.vocab_size, (2, 16))).sum().backward()
    opt.step()
    measured = sum(p.numel() * p.element_size() for p in model.parameters())
    measured += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    measured += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    shape = shape_from_config(cfg, name="t")
    # fp32 training holds 4 (weights) + 4 (grads) + 8 (Adam) = the same 16 bytes as ZeRO's mixed precision.
    assert measured == model_state_bytes_per_param(zero=0, dp=1) * shape.num_params()


def test_whole_model_estimate_bounds_the_measurement() -> None:
    cfg = _config(2)
    batch, seq = 4, 64
    measured = _saved_activation_bytes(cfg, batch=batch, seq=seq)
    shape = shape_from_config(cfg, name="t")
    est = estimate_memory(
        shape,
        seq_len=seq,
        micro_batch=batch,
        micro_batches=1,
        tp=1,
        pp=1,
        dp=1,
        zero=0,
        element_bytes=4,
        eager=True,
        capacity_bytes=1e12,
    )
    assert est.activations + est.transient == pytest.approx(measured, rel=0.15)
