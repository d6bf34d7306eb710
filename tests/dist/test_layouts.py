"""Layouts inside a site on gloo: tensor, sequence, pipeline and data parallelism and their
sharding levels compute the same training as one rank (same data order), and their checkpoints
load at any layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from atoll.report.metrics import read_metrics
from tests.conftest import run_atoll, tiny_config

STEPS = 4
TRAIN = {"steps": STEPS, "checkpoint_every": 0, "eval_every": 2}


def metric(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def train(tmp: Path, data: Path, *args: str, nproc: int = 1, train: dict | None = None, **sections: dict) -> Path:
    cfg = tiny_config(tmp, data, train={**TRAIN, **(train or {})}, **sections)
    proc = run_atoll("train", str(cfg), "--nproc", str(nproc), *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "t"


def assert_same_training(reference: Path, run: Path, *, steps: int = STEPS) -> None:
    for key in ("loss", "grad_norm"):  # the gradient norm checks the sharded gradients are whole
        ref, got = metric(reference, key), metric(run, key)
        assert sorted(got) == list(range(1, steps + 1)), (key, sorted(got))
        for step in got:
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (key, step)
    ref, got = metric(reference, "val_loss"), metric(run, "val_loss")
    assert got and got.keys() <= ref.keys()
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    return train(tmp_path_factory.mktemp("one"), tiny_data)


def test_tp2_with_sequence_parallel_matches_one_rank_and_exports_the_same_model(
    tmp_path: Path, tiny_data: Path, one_rank: Path
) -> None:
    run = train(tmp_path, tiny_data, "--parallel.tp=2", "--parallel.sequence_parallel=true", nproc=2)
    assert_same_training(one_rank, run)
    # The checkpoint holds DTensor shards; the export gathers them into the one-rank model.
    ours, theirs = tmp_path / "hf", tmp_path / "hf-one"
    assert run_atoll("export", str(run), str(ours)).returncode == 0
    assert run_atoll("export", str(one_rank), str(theirs)).returncode == 0
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        # Weights of std 0.02 after 4 Adam steps at lr 3e-3: float rounding moves them by ~1e-6.
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=0, atol=1e-5), k


def test_tp2_checkpoint_resumes_at_tp1_with_the_same_next_steps(
    tmp_path: Path, tiny_data: Path, one_rank: Path
) -> None:
    # tp 2 (with full recompute) to step 2; the DTensor checkpoint then loads into one whole rank.
    cfg = tiny_config(tmp_path, tiny_data, train=TRAIN)
    proc = run_atoll(
        "train", str(cfg), "--nproc", "2", "--parallel.tp=2", "--parallel.recompute=full", "--stop-after", "2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_atoll("train", str(cfg), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(one_rank, tmp_path / "runs" / "t")


def test_tp2_by_dp2_matches_one_rank(tmp_path: Path, tiny_data: Path, one_rank: Path) -> None:
    # zero 0: the two tp pairs average their gradients over dp without DDP.
    assert_same_training(one_rank, train(tmp_path, tiny_data, "--parallel.tp=2", nproc=4))


def test_tp2_by_dp2_fsdp_with_sequence_parallel_matches_one_rank(
    tmp_path: Path, tiny_data: Path, one_rank: Path
) -> None:
    run = train(
        tmp_path, tiny_data, "--parallel.tp=2", "--parallel.zero=3", "--parallel.sequence_parallel=true", nproc=4
    )
    assert_same_training(one_rank, run)


def test_zero_1_matches_one_rank(tmp_path: Path, tiny_data: Path, one_rank: Path) -> None:
    # zero 1 and 2 are the same FSDP2 setting (no reshard after forward); zero 3 is tested above
    # and, as parallel.shard=fsdp, in test_ddp.py.
    assert_same_training(one_rank, train(tmp_path, tiny_data, "--parallel.zero=1", nproc=2))


def assert_same_export(run: Path, reference: Path, tmp: Path) -> None:
    ours, theirs = tmp / "hf", tmp / "hf-one"
    assert run_atoll("export", str(run), str(ours)).returncode == 0
    assert run_atoll("export", str(reference), str(theirs)).returncode == 0
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=0, atol=1e-5), k


def test_a_plan_with_pipeline_stages_trains_as_one_rank(tmp_path: Path, tiny_data: Path, one_rank: Path) -> None:
    # A one-site plan whose layout is pp 2 (1f1b, the default schedule): `atoll train --plan`
    # honours it (nothing listed as ignored) and the two stages train as the one rank does.
    layout = {"tp": 1, "pp": 2, "dp": 1, "vp": 1, "micro_batch": 2, "zero": 1}
    plan = {
        "version": 1,
        "model": "tiny",
        "model_params": 100_000,
        "topology": "lab.yaml",
        "tokens": 512.0,
        "seq_len": 32,
        "global_batch": 4,
        "steps": STEPS,
        "sync": {"strategy": "ddp", "inner_steps": 1},
        "sites": [{"name": "lab", "devices": [{"kind": "cpu", "count": 2}], "batch": 4, "layout": layout}],
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan), encoding="utf-8")
    cfg = tiny_config(tmp_path, tiny_data, train=TRAIN)
    proc = run_atoll("train", str(cfg), "--nproc", "2", "--plan", str(tmp_path / "plan.yaml"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not honor" not in proc.stderr, proc.stderr
    assert "tp 1 x pp 2 x dp 1" in proc.stderr
    assert_same_training(one_rank, tmp_path / "runs" / "t")


def test_a_one_rank_checkpoint_resumes_on_interleaved_pp2_vp2_as_one_rank_goes_on(
    tmp_path: Path, tiny_data: Path
) -> None:
    # Four layers in pp 2 x vp 2 stages (rank 0 runs layers 0 and 2, rank 1 layers 1 and 3). A
    # one-rank run's step-2 checkpoint (whole model, AdamW state of both parameter groups) loads
    # into the stages, which then train steps 3-6 as the one rank did.
    deep = {"preset": "tiny", "num_layers": 4}
    longer = {"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3}
    (tmp_path / "one").mkdir()
    reference = train(tmp_path / "one", tiny_data, model=deep, train=longer)
    cfg = tiny_config(tmp_path, tiny_data, model=deep, train={**TRAIN, **longer})
    run = tmp_path / "runs" / "t"
    shutil.copytree(reference, run)
    for step in (4, 6):
        shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
    args = ("--parallel.pp=2", "--parallel.vp=2", "--parallel.pp_schedule=interleaved_1f1b")
    proc = run_atoll("train", str(cfg), "--resume", "--nproc", "2", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tp 1 x pp 2 x dp 1" in proc.stderr
    assert_same_training(reference, run, steps=6)
    assert set(metric(run, "val_loss")) == {2, 4, 6}


def test_pp2_by_tp2_matches_one_rank_resumes_at_dp4_and_exports_the_same_model(
    tmp_path: Path, tiny_data: Path, one_rank: Path
) -> None:
    # Four ranks: two stages, each split over two tp ranks (vocabulary-parallel embedding and
    # head under loss_parallel), zero 0. Checkpoints at steps 2 and 4.
    run = train(tmp_path, tiny_data, "--parallel.pp=2", "--parallel.tp=2", nproc=4, train={"checkpoint_every": 2})
    assert_same_training(one_rank, run)
    assert_same_export(run, one_rank, tmp_path)
    # Its step-2 checkpoint (model and AdamW state, both parameter groups) resumes on four
    # data-parallel replicas of one sequence each.
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")
    proc = run_atoll("train", str(tmp_path / "config.yaml"), "--resume", "--nproc", "4", "--train.micro_batch=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stderr and "tp 1 x pp 1 x dp 4" in proc.stderr
    assert_same_training(one_rank, run)


def test_tied_embeddings_under_tp2_match_one_rank(tmp_path: Path, tiny_data: Path) -> None:
    tied = {"preset": "tiny", "tie_embeddings": True}
    short = {"steps": 3, "eval_every": 0}
    (tmp_path / "one").mkdir()
    (tmp_path / "tp").mkdir()
    reference = train(tmp_path / "one", tiny_data, train=short, model=tied)
    run = train(tmp_path / "tp", tiny_data, "--parallel.tp=2", nproc=2, train=short, model=tied)
    assert_same_training(reference, run, steps=3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "2", "--parallel.tp=2", "--model.num_heads=2", "--model.num_kv_heads=1"], "num_kv_heads (1)"),
        (["--nproc", "3", "--parallel.tp=2"], "3 ranks, not a multiple of parallel.tp x parallel.pp = 2 x 1"),
        (["--nproc", "4", "--parallel.pp=4"], "parallel.pp 4 is more than the model's 2 layers"),
        (
            ["--nproc", "2", "--parallel.pp=2", "--parallel.vp=2", "--parallel.pp_schedule=interleaved_1f1b"],
            "2 layers do not split into parallel.pp x parallel.vp = 2 x 2 = 4 stages",
        ),
        (["--nproc", "2", "--parallel.pp=2", "--train.global_batch=2"], "1f1b needs at least pp (2) micro-batches"),
    ],
)
def test_a_bad_layout_is_one_line_and_exit_2(tmp_path: Path, tiny_data: Path, args: list[str], message: str) -> None:
    cfg = tiny_config(tmp_path, tiny_data)
    proc = run_atoll("train", str(cfg), *args)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("atoll: error: "), err
    assert message in err
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()
