"""Reading prepared shards: fixed-length samples and a deterministic, resumable batch stream.

A sample is a window of `seq_len + 1` tokens (inputs are `[:-1]`, targets `[1:]`) taken at
stride `seq_len` inside one shard. `BatchStream` decides each optimizer step's global batch
from (seed, position) alone and hands each rank a contiguous slice of it, so what is trained
on does not depend on how many ranks share the batch, and a resumed run sees exactly the
batches the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoll.data.manifest import PREPARE_HINT, Manifest, ShardInfo, numpy_dtype
from atoll.data.shares import split_counts
from atoll.data.tokenizer import file_sha256
from atoll.errors import AtollError

logger = logging.getLogger(__name__)


class TokenDataset:
    """The samples of one split of a prepared data directory, for one site, memory-mapped.

    Sample `i` is an int64 array of `seq_len + 1` tokens. The shards the site reads (all of
    the split's shards when `site` is None or the manifest has no site map; see
    `Manifest.site_shards`) are laid end to end; a shard of `n` tokens holds
    `(n - 1) // seq_len` samples and its tail is unused, because windows never cross a shard
    boundary. Construction checks that the shards exist with the right sizes; with
    `verify_hashes` (the default) each shard's SHA-256 is checked the first time a sample is
    read from it, so a corrupted shard raises `AtollError` naming the file before any step
    uses it. Raises `AtollError` for an unknown split or site, or one with no sample at this
    `seq_len`.
    """

    def __init__(
        self, data_dir: Path | str, split: str, *, seq_len: int, site: str | None = None, verify_hashes: bool = True
    ) -> None:
        if seq_len < 1:
            raise AtollError(f"seq_len must be positive, got {seq_len}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = seq_len
        self.site = site
        self.manifest = Manifest.load(self.data_dir)
        if split not in self.manifest.splits:
            known = ", ".join(sorted(self.manifest.splits))
            raise AtollError(f"no split {split!r} in {self.data_dir}: use one of {known}")
        self.manifest.verify(self.data_dir, check_hashes=False)
        dtype = numpy_dtype(self.manifest.dtype)
        shards = self.manifest.site_shards(split, site)
        self.shards: tuple[ShardInfo, ...] = shards
        self._verified = [not verify_hashes] * len(shards)
        self._shards = [np.memmap(self.manifest.shard_path(self.data_dir, s), dtype=dtype, mode="r") for s in shards]
        counts = np.array([max(0, (s.num_tokens - 1) // seq_len) for s in shards], dtype=np.int64)
        # _starts[k] is the index of shard k's first sample; searchsorted maps index -> shard.
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._len = int(self._starts[-1])
        where = f"split {split!r}" + (f" at site {site!r}" if site is not None else "")
        if not shards:
            raise AtollError(
                f"{where} in {self.data_dir} has no shard: place data on this site (placement in the data config)"
            )
        if self._len == 0:
            longest = max(s.num_tokens for s in shards)
            raise AtollError(
                f"{where} in {self.data_dir} has no sample of seq_len {seq_len}: it has "
                f"{sum(s.num_tokens for s in shards)} tokens, at most {longest} in one shard; "
                f"use seq_len <= {longest - 1} or prepare more data"
            )

    @property
    def num_tokens(self) -> int:
        """Tokens in this site's shards of the split (for weighting sites by data)."""
        return sum(s.num_tokens for s in self.shards)

    def _check_shard(self, k: int) -> None:
        shard = self.shards[k]
        path = self.manifest.shard_path(self.data_dir, shard)
        sha = file_sha256(path)
        if sha != shard.sha256:
            raise AtollError(
                f"shard {path} is corrupted (sha256 {sha} != {shard.sha256} in the manifest): "
                f"{PREPARE_HINT} into {self.data_dir}"
            )
        self._verified[k] = True

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        if not -self._len <= index < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples")
        index %= self._len
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        if not self._verified[shard]:
            self._check_shard(shard)
        start = (index - int(self._starts[shard])) * self.seq_len
        return self._shards[shard][start : start + self.seq_len + 1].astype(np.int64)

    def gather(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Samples at `indices` stacked into a LongTensor of shape (len(indices), seq_len + 1)."""
        if len(indices) == 0:
            return torch.empty((0, self.seq_len + 1), dtype=torch.long)
        return torch.from_numpy(np.stack([self[int(i)] for i in indices]))


def even_split(global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """This rank's (start, count) of a global batch shared evenly by `world_size` ranks.

    The first `global_batch % world_size` ranks get one extra sample. Raises `AtollError` if
    some rank would get nothing.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise AtollError(f"rank {rank} is not in a world of size {world_size}")
    if global_batch < world_size:
        raise AtollError(
            f"global batch {global_batch} is smaller than the {world_size} ranks sharing it: "
            f"use a global batch of at least {world_size}"
        )
    base, extra = divmod(global_batch, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


def weighted_split(global_batch: int, weights: Sequence[float], rank: int) -> tuple[int, int]:
    """This rank's (start, count) of a global batch shared in proportion to `weights` (one per rank,
    e.g. measured samples/s), at least one sample each (`split_counts`). With equal weights it is
    `even_split`'s split."""
    if not 0 <= rank < len(weights):
        raise AtollError(f"rank {rank} is not in a world of size {len(weights)}")
    counts = split_counts(global_batch, weights)
    return sum(counts[:rank]), counts[rank]


class BatchStream:
    """The batches of one training run, for one rank, one optimizer step at a time.

    Epoch `e` visits the samples in the order `np.random.default_rng((seed, e)).permutation`
    (with a CRC-32 of the site name between seed and epoch when the dataset is a site's);
    step `k` takes the next `global_batch` indices of that sequence (continuing into the next
    epoch when one runs out) and this rank gets positions [rank_start, rank_start +
    rank_count) of them. Every rank walks the same sequence, so concatenating the ranks'
    slices gives the one-rank batch. Not thread-safe; does no communication.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        global_batch: int,
        seed: int,
        rank_start: int,
        rank_count: int,
    ) -> None:
        if global_batch < 1:
            raise AtollError(f"global batch must be positive, got {global_batch}")
        if rank_count < 1 or rank_start < 0 or rank_start + rank_count > global_batch:
            raise AtollError(
                f"rank slice [{rank_start}, {rank_start + rank_count}) is not a non-empty part "
                f"of the global batch of {global_batch}: use even_split() to compute it"
            )
        self.dataset = dataset
        self.global_batch = global_batch
        self.seed = seed
        self.rank_start = rank_start
        self.rank_count = rank_count
        self.epoch = 0
        self.offset = 0  # position within the current epoch's permutation
        self.steps = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            # A site's stream mixes in the site name, so sites that read the same shards
            # (all-to-all placement) still see different orders; site None keeps the
            # single-site order of earlier versions.
            key = (
                (self.seed, epoch)
                if self.dataset.site is None
                else (self.seed, zlib.crc32(self.dataset.site.encode()), epoch)
            )
            self._perm = np.random.default_rng(key).permutation(len(self.dataset))
            self._perm_epoch = epoch
        return self._perm

    def next_global_indices(self) -> np.ndarray:
        """Advance one step and return the whole global batch's sample indices."""
        parts = []
        needed = self.global_batch
        while needed:
            perm = self._permutation(self.epoch)
            take = min(needed, len(perm) - self.offset)
            parts.append(perm[self.offset : self.offset + take])
            self.offset += take
            needed -= take
            if self.offset == len(perm):
                self.epoch += 1
                self.offset = 0
        self.steps += 1
        return np.concatenate(parts)

    def set_slice(self, rank_start: int, rank_count: int) -> None:
        """Take another part of each global batch from the next step on (a re-balanced site)."""
        if rank_count < 1 or rank_start < 0 or rank_start + rank_count > self.global_batch:
            raise AtollError(f"rank slice [{rank_start}, {rank_start + rank_count}) is outside the global batch")
        self.rank_start, self.rank_count = rank_start, rank_count

    def next_batch(self) -> torch.Tensor:
        """This rank's part of the next step: a LongTensor (rank_count, seq_len + 1)."""
        indices = self.next_global_indices()
        return self.dataset.gather(indices[self.rank_start : self.rank_start + self.rank_count])

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position; the rank slice is not part of it, so a run may resume
        on a different number of ranks."""
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "offset": self.offset,
            "steps": self.steps,
            "seed": self.seed,
            "num_samples": len(self.dataset),
        }
        if self.dataset.site is not None:
            state["site"] = self.dataset.site
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` output. Raises `AtollError` if it came from a stream
        over different data or with a different seed, since the batches would then differ."""
        try:
            epoch, offset, steps = int(state["epoch"]), int(state["offset"]), int(state["steps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AtollError(
                f"batch stream state {state!r} is malformed ({exc!r}): resume from a checkpoint written by atoll"
            ) from exc
        if state.get("site") is not None and state["site"] != self.dataset.site:
            raise AtollError(
                f"checkpoint's data stream belongs to site {state['site']!r}, this stream to "
                f"{self.dataset.site!r}: resume each site from its own state"
            )
        if "seed" in state and state["seed"] != self.seed:
            raise AtollError(
                f"checkpoint's data seed {state['seed']} differs from this run's {self.seed}: "
                "use the same seed to resume"
            )
        if "num_samples" in state and state["num_samples"] != len(self.dataset):
            raise AtollError(
                f"checkpoint's data had {state['num_samples']} samples, this run's has "
                f"{len(self.dataset)}: resume with the same data directory and seq_len"
            )
        if epoch < 0 or steps < 0 or not 0 <= offset < len(self.dataset):
            raise AtollError(f"batch stream state {state!r} is out of range: resume from a checkpoint written by atoll")
        self.epoch, self.offset, self.steps = epoch, offset, steps


def eval_batches(
    dataset: TokenDataset,
    *,
    global_batch: int,
    max_batches: int,
    rank_start: int,
    rank_count: int,
) -> Iterator[torch.Tensor]:
    """Fixed validation batches for this rank: LongTensors (rank_count, seq_len + 1).

    Global batch `b` is samples [b * global_batch, (b + 1) * global_batch) in order, and this
    rank gets its slice [rank_start, rank_start + rank_count) of it, as in `BatchStream`: the
    evaluated samples do not depend on how many ranks share them. Only full global batches are
    used (at most `max_batches`). Raises `AtollError` if the split cannot fill even one.
    """
    if global_batch < 1 or max_batches < 1:
        raise AtollError(f"eval global_batch ({global_batch}) and max_batches ({max_batches}) must be positive")
    if rank_count < 1 or rank_start < 0 or rank_start + rank_count > global_batch:
        raise AtollError(
            f"rank slice [{rank_start}, {rank_start + rank_count}) is not inside a global batch of {global_batch}"
        )
    num_batches = min(max_batches, len(dataset) // global_batch)
    if num_batches == 0:
        raise AtollError(
            f"split {dataset.split!r} has {len(dataset)} samples of seq_len {dataset.seq_len}, "
            f"fewer than one eval batch of {global_batch}: lower train.global_batch or "
            "data.seq_len, or prepare more validation data"
        )

    def generate() -> Iterator[torch.Tensor]:
        for b in range(num_batches):
            start = b * global_batch + rank_start
            yield dataset.gather(range(start, start + rank_count))

    # Validate eagerly (above) and generate lazily: a generator function would defer the errors.
    return generate()
