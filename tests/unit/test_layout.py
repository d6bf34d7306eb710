"""A site's layout: resolved from parallel.*, the rank count and the model; bad ones are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from atoll.config import RunConfig, load_config
from atoll.config.schema import ParallelSection
from atoll.errors import AtollError
from atoll.model import get_preset
from atoll.parallel.layout import Layout, RankPlace, resolve_layout, zero_level

REPO = Path(__file__).resolve().parents[2]
TINY = get_preset("tiny")  # 4 heads, 2 kv heads, 2 layers, ffn 128, vocab 512


def par(**kw: object) -> ParallelSection:
    return ParallelSection.model_validate(kw)


def test_dp_is_what_tp_and_pp_leave() -> None:
    layout = resolve_layout(par(tp=2, zero=3, sequence_parallel=True), world_size=4, model=TINY, seq_len=32)
    assert (layout.tp, layout.pp, layout.dp, layout.zero, layout.sequence_parallel) == (2, 1, 2, 3, True)
    assert resolve_layout(par(), world_size=3).dp == 3


def test_ranks_are_placed_tp_fastest_and_one_rank_per_target_counts() -> None:
    layout = Layout(tp=2, pp=2, dp=2)
    places = [layout.place(r) for r in range(8)]
    assert [(p.pp_rank, p.dp_rank, p.tp_rank) for p in places] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)
    ]  # fmt: skip
    assert [r for r, p in enumerate(places) if p.counts] == [4, 6]  # last stage, tp rank 0, one per replica
    assert RankPlace.data_parallel(1, 3).counts and RankPlace.data_parallel(1, 3).dp_size == 3


def test_zero_follows_shard_unless_set() -> None:
    assert zero_level(par()) == 0 and zero_level(par(shard="fsdp")) == 3 and zero_level(par(zero=1)) == 1
    assert zero_level(par(shard="ddp", zero=2)) == 2
    with pytest.raises(ValueError, match="shard is fsdp"):
        par(shard="fsdp", zero=1)


@pytest.mark.parametrize(
    ("kw", "world", "message"),
    [
        ({"tp": 3}, 3, "parallel.tp 3 does not divide the model's num_heads"),
        ({"tp": 4}, 4, "parallel.tp 4 does not divide the model's num_kv_heads"),
        ({"tp": 2}, 3, "3 ranks, not a multiple of parallel.tp x parallel.pp = 2 x 1"),
        ({"pp": 4}, 4, "parallel.pp 4 is more than the model's 2 layers"),
        ({"pp": 2, "vp": 2, "pp_schedule": "interleaved_1f1b"}, 4, "2 layers do not split into .* = 4 stages"),
        ({"vp": 2}, 1, "virtual stages need --parallel.pp_schedule=interleaved_1f1b"),
        ({"sequence_parallel": True}, 2, "sequence_parallel needs tensor parallelism"),
        ({"tp": 2, "sequence_parallel": True}, 2, "seq_len is 33"),
    ],
)
def test_a_bad_layout_is_one_line_naming_the_fix(kw: dict[str, object], world: int, message: str) -> None:
    with pytest.raises(AtollError, match=message) as exc:
        resolve_layout(par(**kw), world_size=world, model=TINY, seq_len=33)
    assert "\n" not in str(exc.value)


def test_a_pipeline_needs_untied_embeddings_and_equal_micro_batches_its_schedule_runs() -> None:
    import dataclasses

    from atoll.parallel.layout import pipeline_micro_batches

    layout = resolve_layout(par(pp=2), world_size=4, model=TINY)  # pp 2 x dp 2
    assert (layout.pp, layout.dp) == (2, 2)
    assert pipeline_micro_batches(layout, global_batch=8, micro_batch=2) == 2
    assert pipeline_micro_batches(resolve_layout(par(), world_size=2), global_batch=3, micro_batch=2) == 0
    with pytest.raises(AtollError, match="set model.tie_embeddings: false"):
        resolve_layout(par(pp=2), world_size=2, model=dataclasses.replace(TINY, tie_embeddings=True))
    for batch, micro, message in (
        (6, 2, "global_batch 6 is not a multiple of dp x train.micro_batch = 2 x 2"),
        (4, 2, "gives 1 micro-batches per step, and 1f1b needs at least pp \\(2\\)"),
    ):
        with pytest.raises(AtollError, match=message) as exc:
            pipeline_micro_batches(layout, global_batch=batch, micro_batch=micro)
        assert "\n" not in str(exc.value)


def test_config_keys_validate_without_a_model() -> None:
    with pytest.raises(ValueError, match="pp_schedule"):
        par(pp_schedule="zigzag")
    with pytest.raises(ValueError, match="tp"):
        par(tp=0)
    cfg = load_config(
        RunConfig, REPO / "examples" / "configs" / "demo.yaml", ["--parallel.tp=2", "--parallel.recompute=selective"]
    )
    assert (cfg.parallel.tp, cfg.parallel.recompute) == (2, "selective")


def test_pipeline_settings_without_stages_are_reported_as_ignored() -> None:
    from atoll.config.schema import ignored_settings

    cfg = load_config(RunConfig, REPO / "examples" / "configs" / "demo.yaml", ["--parallel.pp_schedule=gpipe"])
    assert ignored_settings(cfg) == [
        "parallel.pp_schedule is ignored: it applies only when parallel.pp is above 1; remove it or set parallel.pp"
    ]
