"""A NaN gradient on one rank of a two-rank site: both ranks skip that step and stay identical."""

from __future__ import annotations

import json
import os
from pathlib import Path

from atoll.parallel.launch import launch_local
from atoll.report.metrics import read_metrics
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]


def test_nan_gradient_on_one_rank_is_skipped_by_both(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_data)  # 8 steps, global batch 4, micro-batch 2: one micro-batch per rank
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}", ATOLL_NO_PROGRESS="1")
    rc = launch_local([str(cfg), str(tmp_path), "3"], nproc=2, module="tests.dist.guard_worker", env=env)
    assert rc == 0
    records = read_metrics(tmp_path / "runs" / "t")
    events = [r for r in records if "guard" in r]
    assert [(e["guard"], e["step"], e["reason"]) for e in events] == [("skipped", 3, "non-finite gradient norm")]
    assert events[0]["step_loss"] < 100  # the loss itself was finite
    last = [r for r in records if "skipped_steps" in r][-1]
    assert last["step"] == 8 and last["skipped_steps"] == 1 and last["rollbacks"] == 0
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["finite"] and ranks[1]["finite"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # neither rank applied the step alone
