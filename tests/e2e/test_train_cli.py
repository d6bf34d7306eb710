"""The training CLI end to end on a tiny model: runs, resumes bitwise, exports, refuses bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atoll.report.metrics import read_metrics
from tests.conftest import run_atoll, tiny_config


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp, tiny_data)
    proc = run_atoll("train", str(cfg))
    assert proc.returncode == 0, proc.stderr
    return tmp / "runs" / "t"


def test_run_directory_contents(finished_run: Path) -> None:
    assert (finished_run / "config.yaml").is_file()
    assert (finished_run / "model.json").is_file()
    assert (finished_run / "tokenizer.json").is_file()
    steps = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    assert steps == ["step_00000004", "step_00000008"]
    assert list((finished_run / "tensorboard").iterdir()), "no TensorBoard events"
    train = losses(finished_run)
    assert sorted(train) == list(range(1, 9))
    assert train[8] < train[1], "loss should fall on this tiny corpus"
    assert set(losses(finished_run, "val_loss")) == {4, 8}


def test_stop_and_resume_reproduces_losses_bitwise(tmp_path: Path, tiny_data: Path, finished_run: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_data)
    first = run_atoll("train", str(cfg), "--stop-after", "4")
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "runs" / "t"
    assert max(losses(run_dir)) == 4
    second = run_atoll("train", str(cfg), "--resume")
    assert second.returncode == 0, second.stderr
    assert losses(run_dir) == losses(finished_run)  # float equality: bitwise
    assert losses(run_dir, "val_loss") == losses(finished_run, "val_loss")


def test_export_is_loaded_by_transformers_with_identical_logits(tmp_path: Path, finished_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atoll.model import Transformer
    from atoll.rundir.layout import read_model_json
    from atoll.train.checkpoint import latest_checkpoint, load_model_weights

    out = tmp_path / "hf"
    proc = run_atoll("export", str(finished_run), str(out), "--sample", "The model", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert "transformers sample" in proc.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours = Transformer(read_model_json(finished_run)).eval()
    ckpt = latest_checkpoint(finished_run)
    assert ckpt is not None
    load_model_weights(ckpt.path, ours)
    ids = torch.tensor([tok("The data center link trains a model.")["input_ids"]])
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4


def test_continue_from_exported_hf_directory(tmp_path: Path, tiny_data: Path, finished_run: Path) -> None:
    from safetensors.torch import load_file

    hf_dir = tmp_path / "hf"
    assert run_atoll("export", str(finished_run), str(hf_dir)).returncode == 0
    cfg = tiny_config(
        tmp_path,
        tiny_data,
        model={"preset": None, "init_from": str(hf_dir)},
        train={"steps": 2, "warmup_steps": 0, "lr": 1e-12, "checkpoint_every": 2, "eval_every": 0},
    )
    proc = run_atoll("train", str(cfg))
    assert proc.returncode == 0, proc.stderr
    again = tmp_path / "hf2"
    assert run_atoll("export", str(tmp_path / "runs" / "t"), str(again)).returncode == 0
    a, b = load_file(hf_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k  # lr 1e-12: the weights came through unchanged


# ------------------------------------------------------------------ bad input: one line, exit 2


def assert_user_error(proc: object, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # type: ignore[attr-defined]
    err = proc.stderr.strip()  # type: ignore[attr-defined]
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("atoll: error: "), err
    for f in fragments:
        assert f in err, (f, err)


def test_unknown_config_key(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_data, train={"stepz": 3})
    assert_user_error(run_atoll("train", str(cfg)), "unknown key 'train.stepz'")


def test_wrong_type(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_data)
    assert_user_error(run_atoll("train", str(cfg), "--train.lr=fast"), "train.lr")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_user_error(run_atoll("train", str(tmp_path / "missing.yaml")), "does not exist")


def test_run_directory_that_cannot_be_created(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_data)
    assert_user_error(run_atoll("train", str(cfg), "--run.dir=/proc/atoll"), "/proc/atoll", "--run.dir=runs")


def test_missing_data_directory(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "no-data")
    assert_user_error(run_atoll("train", str(cfg)), "manifest.json", "no-data")


def test_tokenizer_that_does_not_match_the_shards(tmp_path: Path, tiny_data: Path) -> None:
    from atoll.data import train_bpe

    other = tmp_path / "other-tokenizer.json"
    train_bpe(["completely different text for another tokenizer"] * 5, vocab_size=300).save(str(other))
    cfg = tiny_config(tmp_path, tiny_data, data={"tokenizer": str(other)})
    assert_user_error(run_atoll("train", str(cfg)), "does not match")


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_data)
    assert run_atoll("train", str(cfg), "--stop-after", "4").returncode == 0
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / "step_00000004"
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert_user_error(run_atoll("train", str(cfg), "--resume"), "step_00000004", "corrupt")
    assert shard.is_file() and (ckpt / "meta.json").is_file(), "nothing saved may be deleted"
    (ckpt / "meta.json").write_text("{not json", encoding="utf-8")
    assert_user_error(run_atoll("export", str(tmp_path / "runs" / "t"), str(tmp_path / "hf")), "corrupt")


def test_resume_without_checkpoint_and_overwrite_protection(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(
        tmp_path, tiny_data, train={"steps": 2, "warmup_steps": 0, "eval_every": 0, "checkpoint_every": 0}
    )
    assert_user_error(run_atoll("train", str(cfg), "--resume"), "no complete checkpoint")
    assert run_atoll("train", str(cfg)).returncode == 0
    assert_user_error(run_atoll("train", str(cfg)), "already holds checkpoints", "--resume")


def test_bad_model_shape_override(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_data)
    assert_user_error(run_atoll("train", str(cfg), "--model.num_heads=3"), "num_heads")


def test_help_lists_the_verbs() -> None:
    proc = run_atoll("--help")
    assert proc.returncode == 0
    for verb in ("train", "export"):
        assert verb in proc.stdout
