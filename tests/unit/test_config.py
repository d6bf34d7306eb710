from pathlib import Path

import pytest

from atoll.config import RunConfig, apply_overrides, load_config, parse_overrides
from atoll.errors import AtollError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_every_example_config_validates() -> None:
    configs = sorted((REPO / "examples" / "configs").glob("*.yaml"))
    assert configs, "no example configs found"
    for path in configs:
        cfg = load_config(RunConfig, path)
        assert cfg.train.steps > 0, path


def test_unknown_key_names_the_key_and_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match=r"unknown key 'train.stpes'.*steps"):
        load_config(RunConfig, write(tmp_path, "train:\n  stpes: 3\n"))


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match=r"unknown key 'trian'.*train"):
        load_config(RunConfig, write(tmp_path, "trian:\n  steps: 3\n"))


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match=r"train.steps: .*integer.*'many'"):
        load_config(RunConfig, write(tmp_path, "train:\n  steps: many\n"))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    with pytest.raises(AtollError, match="not valid YAML at line \\d"):
        load_config(RunConfig, write(tmp_path, "train:\n  steps: [1,\n"))
    with pytest.raises(AtollError, match="mapping"):
        load_config(RunConfig, write(tmp_path, "- 1\n- 2\n"))


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: 50\n")
    cfg = load_config(RunConfig, path, ["--train.steps=40", "--train.lr", "1e-4", "--model.qkv_bias=true"])
    assert cfg.train.steps == 40 and cfg.train.lr == 1e-4 and cfg.model.qkv_bias is True
    with pytest.raises(AtollError, match="unknown key 'train.nope'"):
        load_config(RunConfig, path, ["--train.nope=1"])
    with pytest.raises(AtollError, match="--section.key=value"):
        parse_overrides(["steps=3"])
    with pytest.raises(AtollError, match="has no value"):
        parse_overrides(["--train.steps"])


def test_apply_overrides_does_not_mutate_input() -> None:
    base = {"train": {"steps": 1}}
    out = apply_overrides(base, {"train.steps": 2, "run.name": "x"})
    assert base == {"train": {"steps": 1}} and out == {"train": {"steps": 2}, "run": {"name": "x"}}


def test_cross_field_check(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match="warmup_steps"):
        load_config(RunConfig, write(tmp_path, "train:\n  steps: 10\n  warmup_steps: 10\n"))
