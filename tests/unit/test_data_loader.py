"""Samples, the deterministic batch stream (rank slices, resume, epochs) and eval batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atoll.data.corpus import prepare_corpus
from atoll.data.loader import BatchStream, TokenDataset, eval_batches, even_split
from atoll.data.manifest import MANIFEST_FILE, Manifest, ShardInfo, SplitInfo
from atoll.data.sources import Document
from atoll.data.tokenizer import file_sha256
from atoll.errors import AtollError

SEQ_LEN = 4
# Shard sizes chosen so the tails are unused: 50 tokens -> 12 samples, 23 -> 5, 9 -> 2.
TRAIN_SHARDS = (50, 23, 9)


def write_data_dir(root: Path, train_shards: tuple[int, ...] = TRAIN_SHARDS) -> Path:
    """A data directory whose token at stream position p is p (so windows are easy to check)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text("{}")  # only its hash is checked by the loader
    splits = {}
    for name, sizes in (("train", train_shards), ("validation", (41,))):
        infos, pos = [], 0
        for k, n in enumerate(sizes):
            file = f"{name}_{k:05d}.bin"
            np.arange(pos, pos + n, dtype="<u2").tofile(root / file)
            sha = file_sha256(root / file)
            infos.append(ShardInfo(file=file, sha256=sha, num_tokens=n, num_documents=1))
            pos += n
        splits[name] = SplitInfo(num_documents=len(sizes), num_tokens=pos, shards=tuple(infos))
    manifest = Manifest(
        dtype="uint16",
        seq_len=SEQ_LEN,
        vocab_size=1000,
        tokenizer_sha256=file_sha256(root / "tokenizer.json"),
        sources={"t": 4},
        splits=splits,
    )
    (root / MANIFEST_FILE).write_text(json.dumps(manifest.to_json()))
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> TokenDataset:
    return TokenDataset(write_data_dir(tmp_path / "data"), "train", seq_len=SEQ_LEN)


def test_windows_are_slices_within_shards(dataset: TokenDataset) -> None:
    assert len(dataset) == 12 + 5 + 2
    shard_starts = [0, 50, 73]
    expected = [
        np.arange(start + k * SEQ_LEN, start + k * SEQ_LEN + SEQ_LEN + 1)
        for start, count in zip(shard_starts, (12, 5, 2), strict=True)
        for k in range(count)
    ]
    for i, window in enumerate(expected):
        sample = dataset[i]
        assert sample.dtype == np.int64 and sample.shape == (SEQ_LEN + 1,)
        np.testing.assert_array_equal(sample, window)
    # Last sample of shard 0 ends at token 48, first of shard 1 starts at 50: no crossing.
    assert dataset[11][-1] == 48 and dataset[12][0] == 50
    np.testing.assert_array_equal(dataset[-1], expected[-1])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataset_errors(tmp_path: Path) -> None:
    root = write_data_dir(tmp_path / "data")
    expected = r"has no sample of seq_len 60: it has 82 tokens.*seq_len <= 49"
    with pytest.raises(AtollError, match=expected):
        TokenDataset(root, "train", seq_len=60)
    with pytest.raises(AtollError, match="no split 'test'"):
        TokenDataset(root, "test", seq_len=SEQ_LEN)
    with pytest.raises(AtollError, match="prepare the data first"):
        TokenDataset(tmp_path / "empty", "train", seq_len=SEQ_LEN)
    shard = root / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(AtollError, match=r"train_00001\.bin has 10 bytes"):
        TokenDataset(root, "train", seq_len=SEQ_LEN)


def test_even_split() -> None:
    assert [even_split(10, 3, r) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert [even_split(8, 2, r) for r in range(2)] == [(0, 4), (4, 4)]
    assert even_split(5, 1, 0) == (0, 5)
    with pytest.raises(AtollError, match="smaller than the 4 ranks"):
        even_split(3, 4, 0)
    with pytest.raises(AtollError, match="rank 2 is not in a world of size 2"):
        even_split(4, 2, 2)


def take(stream: BatchStream, steps: int) -> list[torch.Tensor]:
    return [stream.next_batch() for _ in range(steps)]


@pytest.mark.parametrize(("global_batch", "world_size"), [(6, 2), (5, 2), (7, 3)])
def test_rank_slices_concatenate_to_single_rank_batch(
    dataset: TokenDataset, global_batch: int, world_size: int
) -> None:
    def stream(start: int, count: int) -> BatchStream:
        return BatchStream(dataset, global_batch=global_batch, seed=7, rank_start=start, rank_count=count)

    single = take(stream(0, global_batch), 8)
    slices = [even_split(global_batch, world_size, r) for r in range(world_size)]
    per_rank = [take(stream(start, count), 8) for start, count in slices]
    for step, batch in enumerate(single):
        assert batch.dtype == torch.long and batch.shape == (global_batch, SEQ_LEN + 1)
        assert torch.equal(torch.cat([r[step] for r in per_rank]), batch)


def test_resume_from_state_equals_uninterrupted(dataset: TokenDataset) -> None:
    def stream() -> BatchStream:
        return BatchStream(dataset, global_batch=5, seed=3, rank_start=1, rank_count=3)

    uninterrupted = take(stream(), 12)
    first = stream()
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    assert state["steps"] == 5
    resumed = stream()
    resumed.load_state_dict(state)
    for a, b in zip(take(resumed, 7), uninterrupted[5:], strict=True):
        assert torch.equal(a, b)
    assert resumed.state_dict()["steps"] == 12


def test_epochs_are_seeded_permutations_and_cross_cleanly(dataset: TokenDataset) -> None:
    n = len(dataset)  # 19
    stream = BatchStream(dataset, global_batch=5, seed=11, rank_start=0, rank_count=5)
    indices = np.concatenate([stream.next_global_indices() for _ in range(4)])  # 20 > 19
    perm0 = np.random.default_rng((11, 0)).permutation(n)
    perm1 = np.random.default_rng((11, 1)).permutation(n)
    np.testing.assert_array_equal(indices[:n], perm0)
    np.testing.assert_array_equal(indices[n:], perm1[:1])
    expected = {"epoch": 1, "offset": 1, "steps": 4, "seed": 11, "num_samples": n}
    assert stream.state_dict() == expected
    # A global batch bigger than the dataset spans several epochs in one step.
    big = BatchStream(dataset, global_batch=45, seed=11, rank_start=0, rank_count=45)
    first_step = big.next_global_indices()
    np.testing.assert_array_equal(first_step[: 2 * n], np.concatenate([perm0, perm1]))
    assert (big.epoch, big.offset) == (2, 45 - 2 * n)


def test_batch_stream_rejects_bad_slices_and_foreign_state(dataset: TokenDataset) -> None:
    with pytest.raises(AtollError, match="rank slice"):
        BatchStream(dataset, global_batch=4, seed=0, rank_start=3, rank_count=2)
    stream = BatchStream(dataset, global_batch=4, seed=0, rank_start=0, rank_count=4)
    with pytest.raises(AtollError, match="data seed 1 differs"):
        stream.load_state_dict({"epoch": 0, "offset": 0, "steps": 0, "seed": 1, "num_samples": len(dataset)})
    with pytest.raises(AtollError, match="had 3 samples"):
        stream.load_state_dict({"epoch": 0, "offset": 0, "steps": 0, "seed": 0, "num_samples": 3})
    with pytest.raises(AtollError, match="malformed"):
        stream.load_state_dict({"epoch": 0})


def test_eval_batches_are_fixed_and_shared(tmp_path: Path) -> None:
    val = TokenDataset(write_data_dir(tmp_path / "data"), "validation", seq_len=SEQ_LEN)
    assert len(val) == 10
    one = list(eval_batches(val, global_batch=4, max_batches=5, rank_start=0, rank_count=4))
    assert len(one) == 2  # only full batches: 10 samples -> 2 of 4
    assert torch.equal(torch.cat(one), torch.from_numpy(np.stack([val[i] for i in range(8)])))
    ranks = [list(eval_batches(val, global_batch=4, max_batches=5, rank_start=2 * r, rank_count=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for b in range(2):
        assert torch.equal(torch.cat([ranks[0][b], ranks[1][b]]), one[b])
    assert len(list(eval_batches(val, global_batch=4, max_batches=1, rank_start=2, rank_count=2))) == 1
    with pytest.raises(AtollError, match="fewer than one eval batch"):
        eval_batches(val, global_batch=12, max_batches=1, rank_start=0, rank_count=4)
    with pytest.raises(AtollError, match="not inside a global batch"):
        eval_batches(val, global_batch=4, max_batches=1, rank_start=3, rank_count=2)


def test_prepared_corpus_round_trips_through_loader(tmp_path: Path) -> None:
    words = "so long as men can breathe or eyes can see".split()
    docs = [Document(id=str(i), source="s", text=" ".join(words[i:] + words[:i])) for i in range(8)]
    out = tmp_path / "data"
    manifest = prepare_corpus(docs, out, vocab_size=300, seq_len=8, val_fraction=0.25, shard_tokens=40)
    ds = TokenDataset(out, "train", seq_len=8)
    stream = np.fromfile(out / manifest.splits["train"].shards[0].file, dtype="<u2")
    np.testing.assert_array_equal(ds[0], stream[:9])
    np.testing.assert_array_equal(ds[1], stream[8:17])
    batch = BatchStream(ds, global_batch=3, seed=0, rank_start=0, rank_count=3).next_batch()
    assert batch.shape == (3, 9) and int(batch.max()) < 300


# ---------------------------------------------------------------------------- uneven splits


def test_split_counts_is_largest_remainder_with_one_sample_each() -> None:
    from atoll.data.shares import split_counts

    assert split_counts(8, [1.0, 1.0, 1.0]) == [3, 3, 2]  # even_split's split for equal speeds
    assert split_counts(4, [1.0, 0.5]) == [3, 1]  # quotas 2.67, 1.33: the larger remainder wins
    assert split_counts(10, [3.0, 1.0, 1.0]) == [6, 2, 2]
    assert split_counts(3, [100.0, 1.0, 1.0]) == [1, 1, 1]  # at least one each, however slow
    assert split_counts(5, [100.0, 1.0]) == [4, 1]
    for weights in ([0.3, 2.0, 1.1, 0.7], [1.0] * 5, [5.0, 1e-3]):
        assert sum(split_counts(17, weights)) == 17 and min(split_counts(17, weights)) >= 1
    with pytest.raises(AtollError, match="cannot give each of 3 ranks"):
        split_counts(2, [1.0, 1.0, 1.0])
    with pytest.raises(AtollError, match="positive and finite"):
        split_counts(4, [1.0, 0.0])


def test_weighted_split_slices_tile_the_global_batch() -> None:
    from atoll.data.loader import even_split, weighted_split

    weights = [2.0, 1.0, 0.5]
    slices = [weighted_split(9, weights, r) for r in range(3)]
    assert slices == [(0, 5), (5, 3), (8, 1)]
    assert [weighted_split(10, [1.0] * 4, r) for r in range(4)] == [even_split(10, 4, r) for r in range(4)]
