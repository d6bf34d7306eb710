"""The step-time model against the published Megatron-LM table, and its basic behaviour."""

from __future__ import annotations

import dataclasses

import pytest

from atoll.hardware import get_device
from atoll.planner.shape import PLANNER_PRESETS
from atoll.planner.sites import DeviceGroup, SearchSpace, best_site_layout
from atoll.planner.step import MEGATRON_2021, Layout, estimate_step
from atoll.planner.validation import CALCULON_ERRORS, MEGATRON_TABLE1, megatron_layout, predict_row


def test_megatron_table1_within_15_percent_and_closer_than_calculon() -> None:
    errors = [predict_row(row).error for row in MEGATRON_TABLE1]
    assert all(abs(e) <= 0.15 for e in errors), errors
    mean_abs = sum(abs(e) for e in errors) / len(errors)
    assert mean_abs < CALCULON_ERRORS["average"]
    assert max(abs(e) for e in errors) < CALCULON_ERRORS["worst"]


@pytest.mark.parametrize("row", [MEGATRON_TABLE1[0], MEGATRON_TABLE1[4], MEGATRON_TABLE1[6]], ids=lambda r: r.model)
def test_free_search_is_at_least_as_fast_as_the_papers_layout(row: object) -> None:
    paper = predict_row(row)  # type: ignore[arg-type]
    shape = PLANNER_PRESETS[row.model]  # type: ignore[attr-defined]
    runtime = dataclasses.replace(MEGATRON_2021, overlap_grad_reduce=row.torch_ddp)  # type: ignore[attr-defined]
    # The paper's own knobs only (full recomputation, no ZeRO, no sequence parallelism).
    space = SearchSpace(
        zero=(0,),
        recompute=("full",),
        interleave=(1, 2, 3, 4, 5),
        sequence_parallel=False,
        micro_batch=(1, 2, 4, 8, 16),
    )
    best = best_site_layout(
        shape,
        (DeviceGroup(get_device("a100-80g"), row.gpus, 8),),
        batch=row.batch,  # type: ignore[attr-defined]
        seq_len=2048,
        space=space,
        runtime=runtime,
    )
    assert best and best[0].seconds <= paper.step.seconds * (1 + 1e-9)
    assert all(m.fits for m in best[0].memory)


def test_paper_layouts_fit_in_memory() -> None:
    from atoll.planner.memory import estimate_memory

    dev = get_device("a100-80g")
    for row in MEGATRON_TABLE1:
        lay = megatron_layout(row)
        mem = estimate_memory(
            PLANNER_PRESETS[row.model],
            seq_len=2048,
            micro_batch=lay.micro_batch,
            micro_batches=row.batch // (lay.dp * lay.micro_batch),
            tp=lay.tp,
            pp=lay.pp,
            dp=lay.dp,
            vp=lay.vp,
            zero=0,
            recompute="full",
            attention="materialized",
            dropout=True,
            capacity_bytes=dev.memory_bytes,
        )
        assert mem.fits, row.model


def test_step_model_behaves() -> None:
    shape = PLANNER_PRESETS["llama3-10b"]
    dev = get_device("h100")
    base = estimate_step(shape, seq_len=4096, layout=Layout(tp=1, dp=8), micro_batches=4, device=dev)
    slower = dataclasses.replace(
        dev, matmul_efficiency=dev.matmul_efficiency / 2, attention_efficiency=dev.attention_efficiency / 2
    )
    assert (
        estimate_step(shape, seq_len=4096, layout=Layout(tp=1, dp=8), micro_batches=4, device=slower).seconds
        > 1.5 * base.seconds
    )
    recompute = estimate_step(
        shape, seq_len=4096, layout=Layout(tp=1, dp=8, recompute="full"), micro_batches=4, device=dev
    )
    assert recompute.seconds > 1.2 * base.seconds
    assert 0.3 < base.mfu < 0.75
    piped = estimate_step(shape, seq_len=4096, layout=Layout(pp=2, dp=4), micro_batches=4, device=dev)
    assert piped.bubble_seconds == pytest.approx(piped.stage_seconds)
