"""Fine-tuning end to end on a tiny model: a LoRA stage through the CLI, then lineage, merge, PEFT
and transformers loading, eval with the overlap check, generation, resume, full fine-tuning of a
Hugging Face parent on instructions, and the errors a user can make."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from atoll.config import RunConfig, load_config
from atoll.report.metrics import read_metrics
from tests.conftest import run_atoll, tiny_config

DOMAIN = "netlink socket kernel message family attribute header nlmsg bind send recv multicast group".split()


def atoll(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (PEFT and transformers are imported once per session)."""
    from atoll.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


def domain_docs(root: Path, *, num: int = 12, seed: int = 1) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        paras = [" ".join(rng.choice(DOMAIN) for _ in range(rng.randint(10, 30))).capitalize() + "." for _ in range(6)]
        (root / f"doc{i:02d}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return root


def ft_config(tmp: Path, parent: Path, data_path: Path, *, name: str = "lora", **sections: dict[str, Any]) -> Path:
    cfg: dict[str, Any] = {
        "run": {"name": name, "dir": str(tmp / "runs"), "seed": 0},
        "finetune": {"parent": str(parent), "method": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.1}},
        "data": {
            "format": "text",
            "paths": [str(data_path)],
            "chunk_chars": 300,
            "validation_fraction": 0.2,
            "seq_len": 32,
        },
        "train": {
            "steps": 6,
            "global_batch": 4,
            "micro_batch": 2,
            "lr": 1e-2,
            "warmup_steps": 1,
            "weight_decay": 0.0,
            "log_every": 1,
            "eval_every": 3,
            "eval_batches": 2,
            "checkpoint_every": 3,
        },
        "parallel": {"device": "cpu", "threads": 1},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    from atoll.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("base")
    run_training(load_config(RunConfig, tiny_config(tmp, tiny_data)))
    return tmp / "runs" / "t"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, base_run: Path) -> dict[str, Path]:
    """A LoRA stage made by the real CLI in a child process."""
    tmp = tmp_path_factory.mktemp("chain")
    data = domain_docs(tmp / "domain")
    cfg = ft_config(tmp, base_run, data)
    proc = run_atoll("finetune", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "(lora) finished at step 6/6" in proc.stdout
    return {"tmp": tmp, "data": data, "config": cfg, "stage": tmp / "runs" / "lora", "base": base_run}


def test_stage_directory_and_lineage_record(chain: dict[str, Path]) -> None:
    stage = chain["stage"]
    lineage = json.loads((stage / "lineage.json").read_text())
    assert lineage["method"] == "lora" and lineage["status"] == "finished" and lineage["steps"] == 6
    assert lineage["parent"]["kind"] == "pretrain" and lineage["parent"]["fingerprint"]["step"] == 8
    assert lineage["trainable_params"] == 2 * 4 * (
        64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 128 + 64 + 128 + 128 + 64
    )
    assert lineage["data"]["documents"]["validation"] >= 1 and len(lineage["data"]["sources_sha256"]) == 64
    assert lineage["tokens"] > 0
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "data/heldout.jsonl",
        "data/hashes.json",
        "chat_template.jinja",
        "tokenizer.json",
        "model.json",
    ):
        assert (stage / name).is_file(), name
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    records = read_metrics(stage)
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, 7))
    assert sorted(r["step"] for r in records if "val_loss" in r) == [3, 6]


def test_peft_and_transformers_load_the_adapter_and_the_merge_unchanged(
    chain: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atoll.rundir.load import load_stage_model

    tmp, stage = chain["tmp"], chain["stage"]
    assert atoll(capsys, "merge", str(chain["base"]), str(tmp / "base-hf"))[0] == 0
    code, out, _ = atoll(capsys, "merge", str(stage), str(tmp / "merged-hf"))
    assert code == 0 and "merged" in out
    base = AutoModelForCausalLM.from_pretrained(tmp / "base-hf")
    with_adapter = PeftModel.from_pretrained(base, stage / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged-hf").eval()
    ours = load_stage_model(stage)
    tok = AutoTokenizer.from_pretrained(tmp / "merged-hf")
    ids = torch.tensor([tok("netlink socket kernel message")["input_ids"]])
    with torch.no_grad():
        a, b, c = with_adapter(ids).logits, merged(ids).logits, ours(ids)
        plain = AutoModelForCausalLM.from_pretrained(tmp / "base-hf").eval()(ids).logits
    assert (a - b).abs().max() <= 1e-4 and (a - c).abs().max() <= 1e-4
    assert (a - plain).abs().max() > 1e-3, "the adapter must change the model"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nhi\n<|assistant|>\n"
    assert json.loads((tmp / "merged-hf" / "atoll_lineage.json").read_text())[-1]["method"] == "lora"
    # `atoll export` on the LoRA stage merges too, and refuses a pre-training --step for it.
    assert atoll(capsys, "export", str(stage), str(tmp / "exported-hf"))[0] == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp / "exported-hf").eval()
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, b)
    code, _, err = atoll(capsys, "export", str(stage), str(tmp / "never"), "--step", "1")
    assert code == 2 and "fine-tuned stage" in err and not (tmp / "never").exists()


def test_lineage_prints_the_chain(chain: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = atoll(capsys, "lineage", str(chain["stage"]))
    assert code == 0
    assert out.index("0. t: pretrain") < out.index("1. lora: lora (r=4, alpha=8")
    assert "manifest.json sha256" in out and "sources sha256" in out and "6 steps" in out
    code, out, _ = atoll(capsys, "lineage", str(chain["stage"]), "--json")
    assert [r["method"] for r in json.loads(out)] == ["pretrain", "lora"]


def eval_chain(
    capsys: pytest.CaptureFixture[str], chain: dict[str, Path], general: Path, out: Path, *extra: str
) -> tuple[int, str, str]:
    """`atoll eval` of the base run and the LoRA stage on the general and the domain sets, as JSON in `out`."""
    data = ["--data", f"general={general}", "--data", f"domain={chain['stage']}"]
    return atoll(capsys, "eval", str(chain["base"]), str(chain["stage"]), *data, "--json", str(out), *extra)


def test_eval_table_chart_json_and_domain_gain(
    chain: dict[str, Path], tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = chain["tmp"]
    code, out, _ = eval_chain(capsys, chain, tiny_data, tmp / "res.json", "--plot", str(tmp / "res.png"))
    assert code == 0 and "perplexity on held-out sets" in out
    results = json.loads((tmp / "res.json").read_text())
    assert results["command"].startswith("atoll eval ")
    base, stage = results["stages"]
    assert [base["stage"], base["method"], stage["stage"], stage["method"]] == ["t", "pretrain", "lora", "lora"]
    assert stage["parent"] == str(chain["base"]) and stage["trainable_params"] > 0 and stage["tokens"] > 0
    assert set(stage["ppl"]) == {"general", "domain"}
    assert stage["ppl"]["domain"] < base["ppl"]["domain"], results
    assert results["sets"]["domain"]["overlap_checked_against"]
    assert (tmp / "res.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_real_stage_shows_its_lineage_and_evaluation(
    chain: dict[str, Path], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "eval.json"
    code, _, err = eval_chain(capsys, chain, tiny_data, results)
    assert code == 0, err
    page_path = tmp_path / "stage.html"
    code, out, err = atoll(capsys, "report", str(chain["stage"]), "--eval", str(results), "--out", str(page_path))
    assert code == 0, err
    page = page_path.read_text(encoding="utf-8")
    assert "Lineage (root first)" in page and "Evaluation: perplexity (loss)" in page
    ppl = json.loads(results.read_text())["stages"][1]["ppl"]["domain"]
    assert f"{ppl:.2f}" in page  # the stage's own row of the evaluation table
    assert page.count('<figure class="plot') >= 2  # its loss against tokens and against wall-clock


def test_eval_refuses_a_set_that_overlaps_training_data(
    chain: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from atoll.finetune.config import FinetuneDataSection
    from atoll.finetune.data import chunk_examples, content_hash, read_examples

    examples, _ = read_examples([chain["data"]], FinetuneDataSection(paths=[chain["data"]]))
    trained = set(json.loads((chain["stage"] / "data" / "hashes.json").read_text())["train"])
    chunk = next(ex.text for ex in chunk_examples(examples, max_chars=300) if content_hash(ex.text) in trained)
    leak = chain["tmp"] / "leak"
    leak.mkdir()
    (leak / "a.txt").write_text("  " + chunk.replace("\n", " \n"))  # reformatted whitespace: still the same document
    code, _, err = atoll(capsys, "eval", str(chain["stage"]), "--data", f"leak={leak}")
    assert (
        code == 2
        and err.startswith("atoll: error: held-out set 'leak'")
        and "1 of its 1 documents were trained on" in err
    )
    assert err.strip().count("\n") == 0


def test_generate_streams_text(chain: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = atoll(
        capsys,
        "generate",
        str(chain["stage"]),
        "--prompt",
        "netlink socket",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    )
    assert code == 0 and out.startswith("netlink socket") and "tokens in" in err


def test_resume_reproduces_the_uninterrupted_stage_bitwise(chain: dict[str, Path], base_run: Path) -> None:
    from safetensors.torch import load_file

    from atoll.finetune.config import FinetuneConfig
    from atoll.finetune.setup import prepare_finetune
    from atoll.finetune.trainer import run_finetune

    tmp = chain["tmp"]
    cfg = load_config(FinetuneConfig, ft_config(tmp, base_run, chain["data"], name="resumed"))
    prepare_finetune(cfg, resume=False)
    assert run_finetune(cfg, stop_after=3).stopped_early
    assert json.loads((tmp / "runs" / "resumed" / "lineage.json").read_text())["status"] == "running"
    prepare_finetune(cfg, resume=True)
    result = run_finetune(cfg, resume=True)
    assert result.step == 6 and not result.stopped_early

    def losses(run: Path, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in read_metrics(run) if key in r}

    assert losses(tmp / "runs" / "resumed", "loss") == losses(chain["stage"], "loss")
    assert losses(tmp / "runs" / "resumed", "val_loss") == losses(chain["stage"], "val_loss")
    a = load_file(tmp / "runs" / "resumed" / "adapter" / "adapter_model.safetensors")
    b = load_file(chain["stage"] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replay_stage_records_the_mix_and_resumes_bitwise(chain: dict[str, Path], base_run: Path) -> None:
    from atoll.finetune.config import FinetuneConfig
    from atoll.finetune.setup import prepare_finetune
    from atoll.finetune.trainer import run_finetune

    tmp = chain["tmp"]

    def config(name: str) -> FinetuneConfig:
        return load_config(
            FinetuneConfig, ft_config(tmp, base_run, chain["data"], name=name, data={"replay": {"share": 0.25}})
        )

    whole = config("replay")
    prepare_finetune(whole, resume=False)
    run_finetune(whole)
    lineage = json.loads((tmp / "runs" / "replay" / "lineage.json").read_text())
    replay = lineage["data"]["replay"]
    assert replay["kind"] == "pretrain-data" and replay["source"] == str(base_run)
    assert abs(replay["sequences"] / (replay["sequences"] + replay["own_sequences"]) - 0.25) < 0.05
    part = config("replay-resumed")
    prepare_finetune(part, resume=False)
    assert run_finetune(part, stop_after=3).stopped_early
    prepare_finetune(part, resume=True)
    assert run_finetune(part, resume=True).step == 6
    runs = tmp / "runs"
    for key in ("loss", "val_loss"):
        a = {r["step"]: r[key] for r in read_metrics(runs / "replay-resumed") if key in r}
        assert a == {r["step"]: r[key] for r in read_metrics(runs / "replay") if key in r}, key
    assert a != {r["step"]: r["val_loss"] for r in read_metrics(chain["stage"]) if "val_loss" in r}


def test_a_second_lora_stage_chains_and_a_changed_parent_is_refused(chain: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    from atoll.errors import AtollError
    from atoll.finetune.config import FinetuneConfig
    from atoll.finetune.setup import prepare_finetune
    from atoll.finetune.trainer import run_finetune
    from atoll.rundir.lineage import lineage_chain
    from atoll.rundir.load import load_stage_model, load_stage_state

    tmp = chain["tmp"]
    sub = domain_docs(tmp / "sub", num=6, seed=9)
    cfg = load_config(
        FinetuneConfig,
        ft_config(tmp, chain["stage"], sub, name="sub", train={"steps": 2, "eval_every": 0, "checkpoint_every": 0}),
    )
    prepare_finetune(cfg, resume=False)
    run_finetune(cfg)
    stage = tmp / "runs" / "sub"
    assert [r["stage"] for r in lineage_chain(stage)] == ["t", "lora", "sub"]
    assert load_stage_model(stage)(torch.tensor([[1, 2, 3]])).isfinite().all()
    adapter = chain["stage"] / "adapter" / "adapter_model.safetensors"
    original = adapter.read_bytes()
    tensors = load_file(adapter)
    save_file({k: v + 1 for k, v in tensors.items()}, str(adapter))
    try:
        with pytest.raises(AtollError, match="changed after"):
            load_stage_state(stage)
    finally:
        adapter.write_bytes(original)
    load_stage_state(stage)


def test_full_finetuning_of_a_hugging_face_parent_on_instructions(
    chain: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from atoll.export import export_run
    from atoll.finetune.config import FinetuneConfig
    from atoll.finetune.setup import prepare_finetune
    from atoll.finetune.trainer import run_finetune
    from atoll.model import load_hf_model
    from atoll.rundir.lineage import classify_stage, lineage_chain, model_config_of
    from atoll.rundir.load import load_stage_state

    tmp = chain["tmp"]
    hf = tmp / "base-hf2"
    assert atoll(capsys, "merge", str(chain["base"]), str(hf))[0] == 0
    rng = random.Random(3)
    jsonl = tmp / "qa.jsonl"
    with jsonl.open("w") as f:
        for _ in range(40):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({"prompt": f"{a} plus {b}", "response": f"is {a + b}"}) + "\n")
    cfg = load_config(
        FinetuneConfig,
        ft_config(
            tmp,
            hf,
            jsonl,
            name="full",
            finetune={"method": "full"},
            data={"format": "instruct", "paths": [str(jsonl)], "seq_len": 64, "chunk_chars": 0},
            train={"steps": 8, "lr": 3e-3, "eval_every": 0, "checkpoint_every": 0},
        ),
    )
    prepare_finetune(cfg, resume=False)
    result = run_finetune(cfg)
    stage = tmp / "runs" / "full"
    assert (
        classify_stage(stage).kind == "full"
        and result.trainable_params == model_config_of(classify_stage(stage)).num_params()
    )
    losses = [r["loss"] for r in read_metrics(stage) if "loss" in r]
    assert losses[-1] < losses[0]
    assert [r["method"] for r in lineage_chain(stage)] == ["hf", "full"]
    export_run(stage, tmp / "full-hf")  # a full stage is a plain run: `atoll export` works on it
    _, exported = load_hf_model(tmp / "full-hf")
    _, ours = load_stage_state(stage)
    assert all(torch.equal(exported[k], ours[k]) for k in ours)


def test_user_mistakes_are_one_line(chain: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ft_config(tmp_path, chain["base"], chain["data"], train={"stepz": 1})
    code, _, err = atoll(capsys, "finetune", str(cfg))
    assert code == 2 and err.strip().count("\n") == 0 and "unknown key 'train.stepz'" in err
    cfg = ft_config(tmp_path, tmp_path / "nowhere", chain["data"])
    code, _, err = atoll(capsys, "finetune", str(cfg))
    assert code == 2 and "does not exist" in err
    code, _, err = atoll(capsys, "finetune", str(chain["config"]))
    assert code == 2 and "already holds checkpoints" in err
    cfg = ft_config(tmp_path, chain["base"], chain["data"], name="fresh")
    code, _, err = atoll(capsys, "finetune", str(cfg), "--resume")
    assert code == 2 and "no complete checkpoint" in err
    cfg = ft_config(tmp_path, chain["base"], chain["data"], name="long", data={"seq_len": 4096})
    code, _, err = atoll(capsys, "finetune", str(cfg))
    assert code == 2 and "exceeds the parent's context" in err
    code, _, err = atoll(capsys, "eval", str(chain["stage"]), "--data", "x=")
    assert code == 2 and "NAME=PATH" in err


def test_two_sites_exchange_only_the_adapters(chain: dict[str, Path], tmp_path: Path) -> None:
    """Two sites of two ranks each, through the one training loop: the sites end with the same
    adapters, the WAN carried only the adapters, and the metrics hold what pre-training's do
    (compute utilization; WAN bytes summed over the site's ranks, each of which sends its share)."""
    from atoll.model import ModelConfig
    from atoll.sync.envelope import ENVELOPE_BYTES

    cfg = ft_config(tmp_path, chain["base"], chain["data"], name="sites", sync={"strategy": "diloco", "inner_steps": 3})
    topology = Path(__file__).resolve().parents[2] / "examples" / "topologies" / "lab-two-sites.yaml"
    proc = run_atoll("finetune", str(cfg), "--topology", str(topology), "--wan", "none", "--ranks-per-site", "2")
    assert proc.returncode == 0, proc.stderr
    stage = tmp_path / "runs" / "sites"
    lineage = json.loads((stage / "lineage.json").read_text())
    assert lineage["status"] == "finished" and lineage["wan"]["sites"] == 2
    ends = [[r for r in read_metrics(d) if "sync_applied" in r][-1] for d in (stage, stage / "sites" / "west")]
    assert ends[0]["params_checksum"] == ends[1]["params_checksum"]
    # two outer rounds, each sending the adapters in fp32, plus a sealed header per rank on those
    # and on the closing digest check (two ranks x three exchanges): not the model
    adapters = lineage["trainable_params"] * 4
    model = ModelConfig(**json.loads((stage / "model.json").read_text())).num_params() * 4
    assert ends[0]["wan_bytes_sent"] == 2 * adapters + 2 * 3 * (8 + ENVELOPE_BYTES) < model
    assert lineage["wan"]["bytes_sent_by_first_site"] == ends[0]["wan_bytes_sent"]
    steps = [r for r in read_metrics(stage) if "loss" in r]
    assert steps and all(0 < r["compute_utilization"] <= 1 for r in steps)
    assert all(r["compute_seconds"] <= r["wall_seconds"] for r in steps)
    # west is 1.5x slower (the topology's slowdown): the rounds are balanced by measurement, the
    # same two rounds everywhere, their 2 x 3 steps shared by speed
    rounds = [[h[1] for h in e["sync_rounds"]] for e in ends]
    assert len(rounds[0]) == len(rounds[1]) == 2
    assert all(a + b == 6 and a >= b for a, b in zip(*rounds))


def test_uneven_ranks_fine_tune_like_one_rank(chain: dict[str, Path], tmp_path: Path) -> None:
    """Two ranks, the second 3x slower, take 3 and 1 of the 4 rows (through the one loop): the
    masked loss and its gradient are the global batch's, as with one rank."""
    runs = {}
    for name, flags, parallel in (
        ("one", (), {}),
        ("uneven", ("--nproc", "2"), {"rank_slowdowns": [1.0, 3.0], "rebalance_every": 3}),
    ):
        lora = {"rank": 4, "alpha": 8, "dropout": 0.0}  # no dropout: the ranks' random streams differ
        cfg = ft_config(tmp_path, chain["base"], chain["data"], name=name, parallel=parallel, finetune={"lora": lora})
        proc = run_atoll("finetune", str(cfg), *flags)
        assert proc.returncode == 0, proc.stderr
        runs[name] = [r for r in read_metrics(tmp_path / "runs" / name) if "loss" in r]
    for a, b in zip(runs["one"], runs["uneven"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-5
        )
    assert runs["uneven"][0]["rank_shares"] == [3, 1]
