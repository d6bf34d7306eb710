"""Replay (data.replay): the configured share of earlier rows, drawn deterministically, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer

from atoll.config.schema import ignored_settings
from atoll.data import train_bpe
from atoll.data.loader import TokenDataset
from atoll.errors import AtollError
from atoll.finetune.config import FinetuneDataSection, ReplaySection
from atoll.finetune.data import ExampleSet, ExampleStream, prepare_data
from atoll.finetune.replay import draw_replay, replay_count
from atoll.rundir.tokenizer import DEFAULT_CHAT_TEMPLATE, TextTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    tok: Tokenizer = train_bpe(["The packet is routed by the kernel to a netlink socket."] * 20, vocab_size=300)
    return TextTokenizer(
        tokenizer=tok,
        eos_ids=frozenset({0}),
        pad_id=1,
        bos_id=0,
        eos_token="<|endoftext|>",
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(40):
        (root / f"d{i:02d}.txt").write_text(f"Document {i}: the packet {i} is routed by the kernel. " * (3 + i % 5))
    return root


def _prepare(docs: Path, tokenizer: TextTokenizer, out: Path, *, share: float, source: Path, seed: int = 0) -> dict:
    cfg = FinetuneDataSection(paths=[docs], seq_len=32, replay=ReplaySection(share=share, source=source))
    return prepare_data(cfg, tokenizer, out, seed=seed)


def test_replay_count_gives_the_share() -> None:
    assert replay_count(70, 0.3) == 30 and replay_count(80, 0.2) == 20 and replay_count(10, 0.0) == 0
    for n in (1, 7, 100, 1234):
        for share in (0.1, 0.25, 0.5, 0.9):
            r = replay_count(n, share)
            assert abs(r / (n + r) - share) <= 1 / (n + r), (n, share)


def test_mix_has_the_share_and_is_deterministic(
    tmp_path: Path, docs: Path, tokenizer: TextTokenizer, tiny_data: Path
) -> None:
    plain = _prepare(docs, tokenizer, tmp_path / "plain", share=0.0, source=tiny_data)
    mixed = _prepare(docs, tokenizer, tmp_path / "mixed", share=0.25, source=tiny_data)
    again = _prepare(docs, tokenizer, tmp_path / "again", share=0.25, source=tiny_data)
    other = _prepare(docs, tokenizer, tmp_path / "other", share=0.25, source=tiny_data, seed=1)
    own = plain["splits"]["train"]["sequences"]
    replay = mixed["replay"]
    assert "replay" not in plain and replay["own_sequences"] == own and replay["kind"] == "pretrain-data"
    total = mixed["splits"]["train"]["sequences"]
    assert total == own + replay["sequences"] and abs(replay["sequences"] / total - 0.25) <= 1 / total
    # the stage's own rows come first and are unchanged; validation is the stage's own
    plain_rows, mixed_rows = ExampleSet(tmp_path / "plain", "train"), ExampleSet(tmp_path / "mixed", "train")
    assert np.array_equal(mixed_rows.tokens[:own], plain_rows.tokens)
    assert mixed["splits"]["validation"] == plain["splits"]["validation"]
    # every replayed row is a pre-training window, fully counted
    windows = TokenDataset(tiny_data, "train", seq_len=32)
    known = {tuple(np.asarray(windows[i]).tolist()) for i in range(len(windows))}
    assert all(tuple(row.tolist()) in known for row in mixed_rows.tokens[own:])
    assert mixed_rows.mask[own:].all()
    # same seed: the same bytes; another seed: other rows
    assert mixed["files"]["train_tokens.npy"] == again["files"]["train_tokens.npy"]
    assert mixed["files"]["train_tokens.npy"] != other["files"]["train_tokens.npy"]
    # the stream visits replay at exactly the share over each epoch, and resumes into the same mix
    epoch = ExampleStream(total, global_batch=total, seed=0).next_indices()
    assert sorted(epoch.tolist()) == list(range(total)) and (epoch >= own).sum() == replay["sequences"]
    stream = ExampleStream(total, global_batch=4, seed=0)
    stream.next_indices()
    state = json.loads(json.dumps(stream.state_dict()))
    later = [stream.next_indices().tolist() for _ in range(3)]
    resumed = ExampleStream(total, global_batch=4, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_indices().tolist() for _ in range(3)] == later


def test_a_finetuning_stage_replays_its_own_training_rows(
    tmp_path: Path, docs: Path, tokenizer: TextTokenizer, tiny_data: Path
) -> None:
    parent = tmp_path / "parent"
    _prepare(docs, tokenizer, parent / "data", share=0.3, source=tiny_data)
    (parent / "lineage.json").write_text("{}")
    rows = draw_replay(ReplaySection(share=0.5), parent=parent, num_rows=10, seq_len=32, seed=0)
    assert rows is not None and rows.kind == "finetune-stage" and len(rows.tokens) == 10
    parent_rows = {tuple(r.tolist()) for r in ExampleSet(parent / "data", "train").tokens}
    assert all(tuple(r.tolist()) in parent_rows for r in rows.tokens)
    # more rows than the source holds: every row once before any repeats
    many = draw_replay(ReplaySection(share=0.9), parent=parent, num_rows=len(parent_rows), seq_len=32, seed=0)
    assert many is not None and len({tuple(r.tolist()) for r in many.tokens}) == len(parent_rows)
    with pytest.raises(AtollError, match="data.seq_len"):
        draw_replay(ReplaySection(share=0.5), parent=parent, num_rows=10, seq_len=16, seed=0)


def test_replay_errors_and_config(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(AtollError, match="data.replay.source"):
        draw_replay(ReplaySection(share=0.2), parent=hf, num_rows=10, seq_len=32, seed=0)
    assert draw_replay(ReplaySection(share=0.0), parent=hf, num_rows=10, seq_len=32, seed=0) is None
    with pytest.raises(ValidationError):
        ReplaySection(share=1.0)
    section = FinetuneDataSection(paths=[tmp_path], replay=ReplaySection(share=0.0, source=hf))
    assert any("data.replay.source is ignored" in m for m in ignored_settings(section, path="data"))
