"""Pipeline splits and schedule checks, without a process group."""

from __future__ import annotations

import dataclasses

import pytest

from atoll.errors import AtollError
from atoll.model import PRESETS
from atoll.parallel.layout import check_schedule
from atoll.parallel.pipeline import build_stage_model, rank_stages, split_layers

CFG = dataclasses.replace(PRESETS["tiny"], num_layers=4, tie_embeddings=False)


def test_even_split_and_interleaved_ownership() -> None:
    assert split_layers(8, pp=2) == [range(0, 4), range(4, 8)]
    assert split_layers(8, pp=2, vp=2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert rank_stages(1, pp=2, vp=2) == [1, 3]
    assert split_layers(6, pp=2, stage_layers=[4, 2]) == [range(0, 4), range(4, 6)]


def test_stage_models_hold_their_stages() -> None:
    first = build_stage_model(CFG, pp=2, pp_rank=0, vp=2)
    last = build_stage_model(CFG, pp=2, pp_rank=1, vp=2)
    assert first.layers.indices() == [0, 2] and first.embed is not None and first.norm is None
    assert last.layers.indices() == [1, 3] and last.embed is None and last.lm_head is not None
    uneven = build_stage_model(CFG, pp=2, pp_rank=1, stage_layers=[3, 1])
    assert uneven.layers.indices() == [3]


def test_pp_more_than_layers_is_refused() -> None:
    with pytest.raises(AtollError, match=r"parallel.pp \(8\) is more than the model's 4 layers"):
        build_stage_model(CFG, pp=8, pp_rank=0)


def test_layers_not_divisible_by_stages_are_refused() -> None:
    with pytest.raises(AtollError, match=r"not divisible by pp × vp = 2 × 3 stages"):
        split_layers(4, pp=2, vp=3)
    with pytest.raises(AtollError, match="must give 2 stages"):
        split_layers(4, pp=2, stage_layers=[4, 0])
    with pytest.raises(AtollError, match="summing to model.num_layers"):
        split_layers(4, pp=2, stage_layers=[2, 3])


def test_tied_embeddings_with_pp_are_refused() -> None:
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    with pytest.raises(AtollError, match="set model.tie_embeddings: false") as err:
        build_stage_model(tied, pp=2, pp_rank=1)
    assert "\n" not in str(err.value)
    assert build_stage_model(tied, pp=1, pp_rank=0).is_whole  # one stage keeps the tied matrix


@pytest.mark.parametrize(
    ("schedule", "vp", "micro", "match"),
    [
        ("1f1b", 1, 1, "1f1b needs at least pp"),
        ("interleaved_1f1b", 2, 5, "needs a multiple of 2"),
        ("gpipe", 2, 4, "needs pp_schedule: interleaved_1f1b"),
        ("zero_bubble", 1, 4, "unknown pipeline schedule"),
        ("gpipe", 1, 0, "at least one micro-batch"),
    ],
)
def test_schedule_constraints_are_one_line_errors(schedule: str, vp: int, micro: int, match: str) -> None:
    with pytest.raises(AtollError, match=match) as err:
        check_schedule(schedule, pp=2, vp=vp, num_micro_batches=micro)
    assert "\n" not in str(err.value)


def test_schedules_torch_accepts_pass() -> None:
    check_schedule("gpipe", pp=2, vp=1, num_micro_batches=1)
    check_schedule("1f1b", pp=2, vp=1, num_micro_batches=2)
    check_schedule("interleaved_1f1b", pp=2, vp=2, num_micro_batches=6)


def test_the_layout_checks_name_the_schedules_the_pipeline_runs() -> None:
    from atoll.parallel.layout import SCHEDULE_NAMES
    from atoll.parallel.pipeline import SCHEDULES

    assert tuple(SCHEDULES) == SCHEDULE_NAMES
