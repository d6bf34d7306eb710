"""Pipeline parallelism on gloo: pp 2 (GPipe, 1F1B, interleaved), pp 2 × dp 2 (gradients averaged
by the runner or by FSDP2) and pp 2 × tp 2 (with and without sequence parallelism) reproduce one
rank's training; a DCP checkpoint (model and optimizer) of pp 2 resumes on one rank with the same
losses, and the reverse.

The ranks run `tests/dist/pipeline_worker.py`; the one-rank reference runs in this process on the
same micro-batches with the training loop's arithmetic (summed loss × 1/targets, clip, AdamW).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from atoll.parallel.launch import launch_local
from atoll.train.checkpoint import list_checkpoints, load_model_weights
from tests.conftest import REPO
from tests.dist import pipeline_worker as worker

ENV = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}")


def launch(scenario: str, out: Path, nproc: int, *extra: str) -> dict[str, Any]:
    rc = launch_local([scenario, str(out), *extra], nproc=nproc, module="tests.dist.pipeline_worker", env=ENV)
    assert rc == 0
    return json.loads((out / f"{scenario}.json").read_text())


@pytest.fixture(scope="module")
def pp2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("pp2")
    model = worker.full_model()  # one rank's first two steps, for the pipeline to resume
    opt = torch.optim.AdamW(model.parameters(), lr=worker.LR)
    worker.train_full(model, opt, range(2))
    worker.save(model, opt, out / "run-full")
    return out, launch("schedules", out, 2, str(out / "run-full"))


@pytest.fixture(scope="module")
def one_rank() -> dict[str, Any]:
    return worker.reference()


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == worker.STEPS
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == pytest.approx(w, rel=1e-5), step


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_pp2_reproduces_one_ranks_losses_and_norms(
    schedule: str, pp2: tuple[Path, dict[str, Any]], one_rank: dict[str, Any]
) -> None:
    record = pp2[1][schedule]
    assert_close(record["losses"], one_rank["losses"])
    assert_close(record["norms"], one_rank["norms"])  # the whole model's norm, before clipping
    assert max(one_rank["norms"]) > worker.CLIP  # so clipping changed the updates the losses follow
    assert record["eval"] == pytest.approx(one_rank["eval"], rel=1e-5)  # forward-only through the pipeline


def test_pp2_under_bf16_autocast_matches_one_rank(pp2: tuple[Path, dict[str, Any]]) -> None:
    model = worker.full_model()
    want = worker.train_full(model, torch.optim.AdamW(model.parameters(), lr=worker.LR), range(2), dtype="bf16")
    fp32 = worker.reference(steps=2)
    assert pp2[1]["bf16"]["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert pp2[1]["bf16"]["norms"] == pytest.approx(want["norms"], rel=1e-4)
    assert want["norms"] != pytest.approx(fp32["norms"], rel=1e-4)  # bf16 matmuls did run


def test_each_rank_holds_its_stages_under_canonical_names(pp2: tuple[Path, dict[str, Any]]) -> None:
    rank0 = pp2[1]
    # rank 0 of pp 2: layers 0-1 (1f1b), or stages 0 and 2 = layers 0 and 2 (interleaved, vp 2).
    assert {k.split(".")[1] for k in rank0["1f1b"]["keys"] if k.startswith("layers.")} == {"0", "1"}
    assert {k.split(".")[1] for k in rank0["interleaved_1f1b"]["keys"] if k.startswith("layers.")} == {"0", "2"}
    assert "embed.weight" in rank0["1f1b"]["keys"] and "lm_head.weight" not in rank0["1f1b"]["keys"]


def test_a_pp2_checkpoint_resumes_on_one_rank(pp2: tuple[Path, dict[str, Any]], one_rank: dict[str, Any]) -> None:
    model = worker.full_model(seed=9)  # other values, all overwritten by the load
    opt = torch.optim.AdamW(model.parameters(), lr=worker.LR)
    worker.load(model, opt, pp2[0] / "run-pp")
    record = worker.train_full(model, opt, range(2, worker.STEPS))
    assert record["losses"] == pytest.approx(one_rank["losses"][2:], rel=1e-5)  # as if never stopped


def test_export_reads_a_pp2_checkpoint_whole(pp2: tuple[Path, dict[str, Any]]) -> None:
    model = worker.full_model(seed=9)
    load_model_weights(list_checkpoints(pp2[0] / "run-pp")[-1].path, model)  # what `atoll export` loads
    assert worker.full_eval(model) == pytest.approx(pp2[1]["saved_eval"], rel=1e-6)


def test_a_one_rank_checkpoint_resumes_on_pp2(pp2: tuple[Path, dict[str, Any]], one_rank: dict[str, Any]) -> None:
    assert pp2[1]["resumed"]["losses"] == pytest.approx(one_rank["losses"][2:], rel=1e-5)
    assert pp2[1]["resumed"]["norms"] == pytest.approx(one_rank["norms"][2:], rel=1e-5)


def test_misuse_is_refused_in_one_line(pp2: tuple[Path, dict[str, Any]]) -> None:
    errors = pp2[1]["errors"]
    assert len(errors) == 3 and all("\n" not in e for e in errors)
    assert "micro-batches of one (batch, seq+1) shape" in errors[0]
    assert "1f1b needs at least pp (2) micro-batches per step, got 1" in errors[1]
    assert "should hold layers [0, 1] but its model holds [0, 2]" in errors[2]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch("four", tmp_path_factory.mktemp("four"), 4)


@pytest.mark.parametrize("layout", ["pp_dp", "pp_fsdp"])
def test_pp2_by_dp2_reproduces_one_rank(layout: str, four_ranks: dict[str, Any]) -> None:
    # 4 ranks on a (pp 2, dp 2) mesh, each replica half of every step's 8 micro-batches; gradients
    # averaged by the runner (pp_dp) or by FSDP2 on each stage over the dp sub-mesh (pp_fsdp).
    record = four_ranks[layout]
    want = worker.reference(num_micro=2 * worker.MICRO)
    assert_close(record["losses"], want["losses"])
    assert_close(record["norms"], want["norms"])
    assert record["dtensors"] == (19 if layout == "pp_fsdp" else 0)  # rank 0: embed + 2 blocks x 9


@pytest.mark.parametrize(("layout", "dtensors"), [("pp_tp", 1 + 2 * 7), ("pp_sp", 1 + 2 * 9)])
def test_pp2_by_tp2_reproduces_one_rank(
    layout: str, dtensors: int, four_ranks: dict[str, Any], one_rank: dict[str, Any]
) -> None:
    # Tensor parallelism in each stage (vocabulary-parallel embedding and head under loss_parallel),
    # without and with sequence parallelism (stages then send each other sequence slices).
    record = four_ranks[layout]
    assert record["dtensors"] == dtensors  # rank 0: the embedding, two blocks' projections (and norms with SP)
    assert_close(record["losses"], one_rank["losses"])
    assert record["eval"] == pytest.approx(one_rank["eval"], rel=1e-5)
    # Split matmuls round differently, and AdamW's normalized update grows that into a 1e-5
    # relative difference of the step-4 norm (1e-7 at step 1); the losses agree to 1e-7.
    assert record["norms"] == pytest.approx(one_rank["norms"], rel=1e-4)


def test_reference_is_the_training_loops_arithmetic() -> None:
    # The reference's step loss is the global-batch mean of the summed losses.
    model = worker.full_model()
    mbs = worker.step_batches(0)
    with torch.no_grad():
        mean = torch.cat([model(mb[:, :-1]) for mb in mbs]).log_softmax(-1)
    targets = torch.cat([mb[:, 1:] for mb in mbs])
    loss = -mean.gather(-1, targets[..., None]).mean()
    assert worker.reference(steps=1)["losses"][0] == pytest.approx(float(loss), rel=1e-5)
