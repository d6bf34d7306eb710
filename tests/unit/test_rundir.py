"""A run directory's layout and what a directory is, without training anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atoll.errors import AtollError
from atoll.model import ModelConfig
from atoll.rundir.layout import (
    CONFIG_YAML,
    HF_CONFIG_JSON,
    LINEAGE_JSON,
    MODEL_JSON,
    read_model_json,
    read_run_config,
    site_dir,
    site_dirs,
    site_run_name,
    write_model_json,
)
from atoll.rundir.lineage import LINEAGE_FORMAT, LINEAGE_VERSION, classify_stage, read_lineage, write_lineage

TINY = ModelConfig(vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128, max_seq_len=32)


def test_model_json_round_trips_and_a_missing_one_is_named(tmp_path: Path) -> None:
    write_model_json(tmp_path, TINY)
    assert read_model_json(tmp_path) == TINY
    with pytest.raises(AtollError, match=f"no {MODEL_JSON}"):
        read_model_json(tmp_path / "elsewhere")


def test_sites_live_under_the_run_and_only_those_with_a_model_count(tmp_path: Path) -> None:
    assert site_run_name("t", "east") == "t/sites/east"
    assert site_dir(tmp_path, "east") == tmp_path / "sites" / "east"
    assert site_dirs(tmp_path) == []
    for name in ("west", "east", "empty"):
        site_dir(tmp_path, name).mkdir(parents=True)
    for name in ("west", "east"):
        write_model_json(site_dir(tmp_path, name), TINY)
    assert [d.name for d in site_dirs(tmp_path)] == ["east", "west"]


def test_run_config_is_a_plain_dict_or_empty(tmp_path: Path) -> None:
    assert read_run_config(tmp_path) == {}
    (tmp_path / CONFIG_YAML).write_text("model:\n  init_from: base\n")
    assert read_run_config(tmp_path) == {"model": {"init_from": "base"}}
    (tmp_path / CONFIG_YAML).write_text("- a list\n")
    assert read_run_config(tmp_path) == {}


def test_classify_stage_by_the_files_it_holds(tmp_path: Path) -> None:
    hf, run, stage = tmp_path / "hf", tmp_path / "run", tmp_path / "stage"
    for d in (hf, run, stage):
        d.mkdir()
    (hf / HF_CONFIG_JSON).write_text("{}")
    write_model_json(run, TINY)
    write_model_json(stage, TINY)
    write_lineage(stage, {"format": LINEAGE_FORMAT, "version": LINEAGE_VERSION, "method": "lora"})
    assert [classify_stage(d).kind for d in (hf, run, stage)] == ["hf", "pretrain", "lora"]
    assert read_lineage(stage)["method"] == "lora" and not (stage / (LINEAGE_JSON + ".tmp")).exists()
    with pytest.raises(AtollError, match="does not exist"):
        classify_stage(tmp_path / "missing")
    with pytest.raises(AtollError, match="neither an atoll run"):
        classify_stage(tmp_path)
    (stage / LINEAGE_JSON).write_text(json.dumps({"format": LINEAGE_FORMAT, "version": LINEAGE_VERSION + 1}))
    with pytest.raises(AtollError, match="lineage version"):
        classify_stage(stage)
