"""A run that notices when it goes wrong: non-finite steps skipped, rollbacks, spikes, a diverged run stopped."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from atoll.config import RunConfig, load_config
from atoll.report.metrics import read_metrics
from atoll.train.checkpoint import list_checkpoints, load_model_weights
from atoll.train.job import DivergedError
from tests.conftest import run_atoll, tiny_config

REPO = Path(__file__).resolve().parents[2]


def guard_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if "guard" in r]


def final_weights(run_dir: Path, ckpt: Path | None = None) -> dict[str, torch.Tensor]:
    """The weights of checkpoint `ckpt` of the run (default: its latest)."""
    from atoll.model import Transformer
    from atoll.rundir.layout import read_model_json

    model = Transformer(read_model_json(run_dir))
    load_model_weights(ckpt or list_checkpoints(run_dir)[-1].path, model)
    return model.state_dict()


@pytest.fixture
def poisoned_loss(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[set[int], float], None]]:
    """Make the training loss of chosen forward calls (0-based, training mode only) NaN or scaled."""
    import atoll.train.trainer as trainer

    real = trainer.token_loss_sum
    plan: dict[str, Any] = {"calls": set(), "factor": 1.0, "seen": 0}

    def loss(model: torch.nn.Module, chunk: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, int]:
        value, n = real(model, chunk, **kw)
        if model.training:
            call = plan["seen"]
            plan["seen"] += 1
            if call in plan["calls"]:
                value = value * plan["factor"]
        return value, n

    monkeypatch.setattr(trainer, "token_loss_sum", loss)

    def arm(calls: set[int], factor: float) -> None:
        plan.update(calls=calls, factor=factor, seen=0)

    yield arm


def _config(tmp: Path, data: Path, **train: Any) -> RunConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    return load_config(RunConfig, tiny_config(tmp, data, train=train))


def test_rollback_resumes_bitwise_and_skips_the_batches_it_names(
    tmp_path: Path, tiny_data: Path, poisoned_loss: Callable[[set[int], float], None]
) -> None:
    from atoll.train.trainer import run_training

    # Two micro-batches per step: steps 5-7 (calls 8-13) give NaN, three in a row -> rollback
    # to the checkpoint of step 4, skipping the batches of steps 5-7 (indices 4, 5, 6).
    poisoned_loss(set(range(8, 14)), float("nan"))
    hurt = run_training(_config(tmp_path / "hurt", tiny_data))
    hurt_dir = hurt.run_dir
    events = guard_records(hurt_dir)
    assert [e["guard"] for e in events] == ["skipped", "skipped", "rollback", "rolled_back"]
    assert [e["batch"] for e in events[:3]] == [4, 5, 6]
    assert events[3]["step"] == 4 and events[3]["skip_batches"] == [4, 5, 6] and events[3]["rollbacks"] == 1
    assert hurt.step == 8 and all(torch.isfinite(t).all() for t in final_weights(hurt_dir).values())

    # The same run told up front to skip those batches trains on exactly the same data.
    poisoned_loss(set(), 1.0)
    clean = run_training(_config(tmp_path / "clean", tiny_data, skip_batches=[4, 5, 6]))
    assert guard_records(clean.run_dir) == []
    ref, got = final_weights(clean.run_dir), final_weights(hurt_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    after = {r["step"]: r["loss"] for r in read_metrics(hurt_dir) if "loss" in r and r["step"] > 4}
    expected = {r["step"]: r["loss"] for r in read_metrics(clean.run_dir) if "loss" in r and r["step"] > 4}
    assert after == expected  # float equality: bitwise
    meta = json.loads((list_checkpoints(hurt_dir)[-1].path / "meta.json").read_text())
    assert meta["guard"]["skip_batches"] == [4, 5, 6] and meta["guard"]["batches"] == 11


def test_a_lasting_spike_rolls_back_and_a_normal_run_never_fires(
    tmp_path: Path, tiny_data: Path, poisoned_loss: Callable[[set[int], float], None]
) -> None:
    from atoll.train.trainer import run_training

    # The guard judges spikes after 50 normal steps; steps 61-65 (calls 120-129) read 4x the loss.
    settings = dict(steps=80, checkpoint_every=20, eval_every=0, spike_steps=5, log_every=10, lr=1e-3)
    poisoned_loss(set(range(120, 130)), 4.0)
    hurt = run_training(_config(tmp_path / "hurt", tiny_data, **settings))
    events = guard_records(hurt.run_dir)
    assert [e["guard"] for e in events] == ["spike"] * 4 + ["rollback", "rolled_back"]
    assert [e["step"] for e in events[:5]] == [61, 62, 63, 64, 65]
    assert events[-1]["step"] == 60 and events[-1]["skip_batches"] == [60, 61, 62, 63, 64]
    assert hurt.step == 80 and hurt.val_loss is not None and hurt.val_loss < 10

    poisoned_loss(set(), 1.0)
    normal = run_training(_config(tmp_path / "normal", tiny_data, **settings))
    assert guard_records(normal.run_dir) == []
    last = [r for r in read_metrics(normal.run_dir) if "spikes" in r][-1]
    assert last["spikes"] == 0 and last["skipped_steps"] == 0 and last["rollbacks"] == 0


def test_no_checkpoint_to_return_to_stops_the_run(
    tmp_path: Path, tiny_data: Path, poisoned_loss: Callable[[set[int], float], None]
) -> None:
    from atoll.train.trainer import run_training

    poisoned_loss(set(range(0, 100)), float("inf"))
    with pytest.raises(DivergedError, match=r"training diverged at step 3 .*no checkpoint before step 1.*train\.lr"):
        run_training(_config(tmp_path, tiny_data))
    assert list_checkpoints(tmp_path / "runs" / "t") == []


def test_a_diverging_learning_rate_ends_with_a_message_and_no_bad_checkpoint(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_data, train={"checkpoint_every": 1, "steps": 12})
    proc = run_atoll("train", str(cfg), "--train.lr=1e10")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("atoll: error: training diverged at step ") and "lower train.lr (now 1e+10)" in last
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "runs" / "t"
    assert [r["guard"] for r in guard_records(run_dir)].count("rolled_back") == 2  # max_rollbacks
    for ckpt in list_checkpoints(run_dir):
        assert all(torch.isfinite(p).all() for p in final_weights(run_dir, ckpt.path).values())


def test_export_and_serve_refuse_non_finite_weights(tmp_path: Path, tiny_data: Path) -> None:
    from atoll.model import Transformer
    from atoll.parallel.dist import dist_env_from_environ
    from atoll.rundir.layout import read_model_json
    from atoll.train.checkpoint import save_checkpoint

    cfg = tiny_config(tmp_path, tiny_data, train={"steps": 4, "checkpoint_every": 4})
    assert run_atoll("train", str(cfg)).returncode == 0
    run_dir = tmp_path / "runs" / "t"
    # A checkpoint with NaN weights, as a run without the guard would have written one.
    model = Transformer(read_model_json(run_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(
        run_dir,
        step=5,
        model=model,
        optimizer=optimizer,
        extra={},
        env=dist_env_from_environ(),
        device=torch.device("cpu"),
        keep=5,
    )
    proc = run_atoll("export", str(run_dir), str(tmp_path / "hf"))
    assert proc.returncode != 0 and "non-finite weights" in proc.stderr and "--step" in proc.stderr
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert run_atoll("export", str(run_dir), str(tmp_path / "hf"), "--step", "4").returncode == 0
    proc = run_atoll("generate", str(run_dir), "--prompt", "a", "--max-new-tokens", "2")
    assert proc.returncode != 0 and "non-finite weights" in proc.stderr
