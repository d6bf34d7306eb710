"""Cost formulas against hand-worked numbers: FLOPs, collectives, bubble, memory, WAN bytes."""

from __future__ import annotations

import pytest

from atoll.planner.cost import (
    allreduce_bytes_per_rank,
    bubble_fraction,
    megatron_flops_per_iteration,
    ring_allgather_seconds,
    ring_allreduce_seconds,
    training_flops_per_token,
)
from atoll.planner.memory import activation_bytes_per_layer, model_state_bytes_per_param
from atoll.planner.shape import PLANNER_PRESETS, ModelShape, gpt_shape
from atoll.planner.wan import codec_bytes, exposed_per_round
from atoll.sync.link_model import WanLink, allgather_bytes, allgather_seconds

GPT = gpt_shape("g", layers=2, dim=1024, heads=16, vocab=1000, seq_len=512)


def test_megatron_eq3_by_hand() -> None:
    # 1T row: 96 B s l h^2 (1 + s/6h + V/16lh)
    f = megatron_flops_per_iteration(batch=3072, seq_len=2048, layers=128, hidden=25600, vocab=51200)
    by_hand = 96 * 3072 * 2048 * 128 * 25600**2 * (1 + 2048 / (6 * 25600) + 51200 / (16 * 128 * 25600))
    assert f == pytest.approx(by_hand, rel=1e-12)
    assert f / (102.6 * 3072) / 1e12 == pytest.approx(163, rel=0.01)  # the paper's 163 TFLOP/s at ~102.6 s


def test_shape_param_counts() -> None:
    # Megatron's count for its GPT: 12·l·h² (1 + 13/12h + (V + s)/12lh), l = layers.
    g = PLANNER_PRESETS["gpt-1.7b"]
    layers, h, v, s = 24, 2304, 51200, 2048
    assert g.num_params() == pytest.approx(
        12 * layers * h * h * (1 + 13 / (12 * h) + (v + s) / (12 * layers * h)), rel=1e-3
    )
    assert PLANNER_PRESETS["qwen1.5-107b"].num_params() == pytest.approx(107.1e9, rel=0.005)
    assert PLANNER_PRESETS["llama3-10b"].num_params() == pytest.approx(10.2e9, rel=0.01)
    # The PaLM formula works on a ModelShape as on a ModelConfig.
    assert training_flops_per_token(GPT, seq_len=512) == 6 * GPT.matmul_params() + 12 * 2 * 16 * 64 * 512


def test_ring_collectives_by_hand() -> None:
    assert allreduce_bytes_per_rank(800.0, 4) == 2 * 3 / 4 * 800
    assert ring_allreduce_seconds(1e9, 8, bus_bytes_per_s=1e9, latency_s=1e-3) == pytest.approx(1.75 + 14e-3)
    assert ring_allgather_seconds(1e9, 4, bus_bytes_per_s=1e9) == pytest.approx(0.75)
    assert ring_allreduce_seconds(1e9, 1, bus_bytes_per_s=1.0) == 0.0


def test_pipeline_bubble() -> None:
    assert bubble_fraction(stages=8, micro_batches=48) == pytest.approx(7 / 48)
    assert bubble_fraction(stages=8, micro_batches=48, interleave=2) == pytest.approx(7 / 96)


def test_zero_memory_per_parameter() -> None:
    assert model_state_bytes_per_param(zero=0, dp=8) == 16
    assert model_state_bytes_per_param(zero=1, dp=8) == 4 + 12 / 8
    assert model_state_bytes_per_param(zero=2, dp=8) == 2 + 14 / 8
    assert model_state_bytes_per_param(zero=3, dp=8) == 2
    assert model_state_bytes_per_param(zero=3, dp=1) == 16


def test_activations_match_korthikanti() -> None:
    s, b, h, a = 512, 2, GPT.dim, GPT.num_heads
    sbh = s * b * h
    kw = dict(seq_len=s, micro_batch=b, attention="materialized", dropout=True)
    assert activation_bytes_per_layer(GPT, **kw) == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert activation_bytes_per_layer(GPT, tp=4, **kw) == pytest.approx(sbh * (10 + 24 / 4 + 5 * a * s / (h * 4)))
    assert activation_bytes_per_layer(GPT, tp=4, sequence_parallel=True, **kw) == pytest.approx(
        sbh * (34 / 4 + 5 * a * s / (h * 4))
    )
    assert activation_bytes_per_layer(GPT, tp=4, sequence_parallel=True, recompute="selective", **kw) == pytest.approx(
        sbh * 34 / 4
    )
    assert activation_bytes_per_layer(GPT, recompute="full", **kw) == pytest.approx(2 * sbh)


def test_codec_bytes_and_wan_time_by_hand() -> None:
    shape = ModelShape(name="m", num_layers=2, dim=64, num_heads=4, num_kv_heads=4, ffn_dim=128, vocab_size=100)
    n = shape.num_params()
    # Tensor by tensor, as the codecs send them: 8 of 64x64 (q, k, v, o), 4 of 128x64 (gate, up),
    # 2 of 64x128 (down), 2 of 100x64 (embedding, head), 5 norms of 64.
    assert n == 8 * 4096 + 6 * 8192 + 2 * 6400 + 5 * 64
    assert codec_bytes("none", shape) == 4 * n
    assert codec_bytes("fp16", shape) == 2 * n
    scales = 8 * 32 + 6 * 64 + 2 * 50 + 5 * 1  # one per 128 elements, rounded up per tensor
    assert codec_bytes("int8", shape) == n + 4 * scales
    assert codec_bytes("int4", shape) == n // 2 + 4 * scales
    # k = round(1%) per tensor (41, 82, 64, 1): fp32 values, int16 indices (uint8 for the norms)
    assert codec_bytes("topk", shape) == 8 * 41 * 6 + 6 * 82 * 6 + 2 * 64 * 6 + 5 * 1 * 5
    # rank 8: fp32 factors 8 x (rows + cols) per matrix; the norms go as they are
    assert codec_bytes("lowrank", shape, lowrank_rank=8) == 4 * 8 * (8 * 128 + 6 * 192 + 2 * 164) + 5 * 64 * 4
    # Two sites at 1 Gbit/s (125 MB/s): the all-gather moves S-1 = 1 payload each way.
    links = [WanLink("a", 125e6, 125e6, 0.01), WanLink("b", 125e6, 250e6, 0.02)]
    assert allgather_bytes(1e9, 2) == 1e9
    assert allgather_seconds(1e9, links) == pytest.approx(8.0 + 0.03)
    assert allgather_bytes(1e9, 3) == 2e9  # gathered as the transport does, whatever the codec: never summed on the way


def test_exposed_time_per_strategy() -> None:
    assert exposed_per_round("diloco", inner_steps=100, step_s=1.0, sync_s=30.0) == 30.0
    assert exposed_per_round("delayed", inner_steps=100, step_s=1.0, sync_s=130.0) == 30.0
    assert exposed_per_round("delayed", inner_steps=100, step_s=1.0, sync_s=30.0) == 0.0
    # 4 fragments of 10 s each, overlapped with 1 step of 2 s: 4 x 8 s.
    assert (
        exposed_per_round("streaming", inner_steps=100, step_s=2.0, sync_s=40.0, fragments=4, overlap_steps=1) == 32.0
    )
    # The link itself is the bottleneck when F fragment exchanges outlast the round.
    assert exposed_per_round("streaming", inner_steps=10, step_s=1.0, sync_s=40.0, fragments=4, overlap_steps=5) == 30.0


@pytest.mark.parametrize("preset", ["tiny", "demo", "llama3-8b", "qwen2-72b"])
def test_shape_tensors_are_the_models_parameters(preset: str) -> None:
    # The planner's WAN bytes are exact only if it sees the tensors the codecs encode, one by one.
    import torch

    from atoll.model import Transformer
    from atoll.model.config import get_preset
    from atoll.planner.shape import shape_from_config

    cfg = get_preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    real: dict[tuple[int, ...], int] = {}
    for p in model.parameters():
        real[tuple(p.shape)] = real.get(tuple(p.shape), 0) + 1
    planned: dict[tuple[int, ...], int] = {}
    for dims, count in shape_from_config(cfg, name=preset).tensors():
        if count:
            planned[dims] = planned.get(dims, 0) + count
    assert planned == real
