"""Several ranks of one site on gloo: DDP and FSDP2 compute the same training as one rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atoll.parallel.launch import free_port
from atoll.report.metrics import read_metrics
from tests.conftest import REPO, run_atoll, tiny_config


def metric(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("one")
    cfg = tiny_config(tmp, tiny_data, train={"steps": 6, "checkpoint_every": 0, "eval_every": 3})
    proc = run_atoll("train", str(cfg))
    assert proc.returncode == 0, proc.stderr
    return tmp / "runs" / "t"


def assert_same_training(a: Path, b: Path) -> None:
    la, lb = metric(a, "loss"), metric(b, "loss")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-6), step
    va, vb = metric(a, "val_loss"), metric(b, "val_loss")
    assert va.keys() == vb.keys() and va
    for step in va:
        assert vb[step] == pytest.approx(va[step], rel=1e-5), step


def test_ddp_two_ranks_match_one_rank(tmp_path: Path, tiny_data: Path, one_rank: Path) -> None:
    # Same global batch (4): one rank accumulates 2 micro-batches of 2, two ranks take 2 each.
    cfg = tiny_config(tmp_path, tiny_data, train={"steps": 6, "checkpoint_every": 0, "eval_every": 3})
    proc = run_atoll("train", str(cfg), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    assert_same_training(one_rank, tmp_path / "runs" / "t")


def test_fsdp2_under_torchrun_matches_one_rank(tmp_path: Path, tiny_data: Path, one_rank: Path) -> None:
    cfg = tiny_config(
        tmp_path, tiny_data, train={"steps": 6, "checkpoint_every": 6, "eval_every": 3}, parallel={"shard": "fsdp"}
    )
    env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "atoll.train",
        str(cfg),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "t"
    assert_same_training(one_rank, run_dir)
    # The sharded checkpoint exports to one full model.
    out = run_atoll("export", str(run_dir), str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr


def test_a_failing_rank_stops_the_launch_with_its_exit_code(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_data)
    proc = run_atoll("train", str(cfg), "--nproc", "2", "--resume")
    assert proc.returncode == 2
    assert "no complete checkpoint" in proc.stderr


def test_uneven_ranks_match_one_rank_loss_and_gradient(tmp_path: Path, tiny_data: Path, one_rank: Path) -> None:
    # Rank 1 is 3x slower: it takes 1 of the 4 sequences, rank 0 takes 3 (2 micro-batches: 2 + 1),
    # re-measured every 2 steps. The loss weighting keeps the gradient the global-batch mean.
    cfg = tiny_config(
        tmp_path,
        tiny_data,
        train={"steps": 6, "checkpoint_every": 0, "eval_every": 3},
        parallel={"rank_slowdowns": [1.0, 3.0], "rebalance_every": 2},
    )
    proc = run_atoll("train", str(cfg), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "t"
    assert_same_training(one_rank, run)
    norms, reference = metric(run, "grad_norm"), metric(one_rank, "grad_norm")
    for step in reference:
        assert norms[step] == pytest.approx(reference[step], rel=1e-5), step
    shares = metric(run, "rank_shares")
    assert shares[1] == [3, 1] and all(sum(s) == 4 and s[0] > s[1] for s in shares.values())
