"""The one shard writer: cuts a token stream into `<split>[_<site>]_NNNNN.bin` files.

Both ways of making a data directory write their shards here: `atoll data prepare`
(`atoll.data.pack`, one writer per (split, site) stream) and the small in-memory path
(`atoll.data.corpus.prepare_corpus`, the tests' fixture). So every data directory has the same
file names, byte layout (raw little-endian ids of the manifest's dtype) and per-shard records,
and `atoll.data.loader` reads them all the same way.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from atoll.data.manifest import Mix, ShardInfo, SplitInfo

ALL = ""  # the group of a stream every site reads: its files carry no site in their name

ShardRecord = dict[str, Any]  # {"file", "sha256", "num_tokens"} of a shard written to disk


class ShardWriter:
    """Cuts one (split, group) stream of documents into shards of at most `shard_tokens` tokens.

    Documents are appended whole with `add` (each already ending with its end-of-text token);
    a shard is written when it is full and by `flush` at the end. Each file is written to a
    temporary name and renamed, so a shard on disk is always complete. For a resumed
    preparation, `done` maps file names to the records of shards an earlier run wrote: a shard
    whose file is still there with the recorded size is kept instead of rewritten and rehashed.
    `record` is called with the record of every shard actually written (the resume log).
    Single-threaded; not safe to share between threads.
    """

    def __init__(
        self,
        out: Path,
        split: str,
        *,
        group: str = ALL,
        dtype: np.dtype,
        shard_tokens: int,
        done: dict[str, ShardRecord] | None = None,
        record: Callable[[ShardRecord], None] | None = None,
    ) -> None:
        self.split = split
        self.group = group
        self.shards: list[ShardInfo] = []
        self.written = 0  # shards written in this run
        self.skipped = 0  # shards kept from an earlier run
        self._out = out
        self._dtype = dtype
        self._done = done or {}
        self._record = record
        self._buf = np.empty(shard_tokens, dtype=dtype)
        self._fill = 0
        self._docs: Counter[str] = Counter()  # documents whose end-of-text is in the buffer, by source
        self._sources: dict[str, Counter[str]] = {}
        self._languages: dict[str, Counter[str]] = {}

    def add(self, ids: np.ndarray, *, source: str, lang: str | None = None) -> None:
        """Append one document's ids; `lang` None leaves the split's language mix empty."""
        mixes = [(source, self._sources)] + ([(lang, self._languages)] if lang is not None else [])
        for name, mix in mixes:
            entry = mix.setdefault(name, Counter())
            entry["documents"] += 1
            entry["tokens"] += len(ids)
        pos = 0
        while pos < len(ids):
            take = min(len(self._buf) - self._fill, len(ids) - pos)
            self._buf[self._fill : self._fill + take] = ids[pos : pos + take]
            self._fill += take
            pos += take
            if pos == len(ids):
                self._docs[source] += 1  # its end-of-text token landed in this shard
            if self._fill == len(self._buf):
                self.flush()

    def flush(self) -> None:
        """Write the buffered tokens as the next shard (nothing when the buffer is empty)."""
        if not self._fill:
            return
        middle = f"_{self.group}" if self.group != ALL else ""
        name = f"{self.split}{middle}_{len(self.shards):05d}.bin"
        path = self._out / name
        prior = self._done.get(name)
        size = self._fill * self._dtype.itemsize
        docs = {"num_documents": sum(self._docs.values()), "sources": dict(sorted(self._docs.items()))}
        if prior is not None and prior["num_tokens"] == self._fill and path.is_file() and path.stat().st_size == size:
            info = ShardInfo(file=name, sha256=prior["sha256"], num_tokens=self._fill, **docs)
            self.skipped += 1
        else:
            data = self._buf[: self._fill].tobytes()
            tmp = path.with_name(name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            info = ShardInfo(file=name, sha256=hashlib.sha256(data).hexdigest(), num_tokens=self._fill, **docs)
            if self._record is not None:
                self._record({"file": name, "sha256": info.sha256, "num_tokens": info.num_tokens})
            self.written += 1
        self.shards.append(info)
        self._fill = 0
        self._docs = Counter()

    def split_info(self) -> SplitInfo:
        """This stream's totals, shards and mixes; call after the last `flush`."""
        return SplitInfo(
            num_documents=sum(s.num_documents for s in self.shards),
            num_tokens=sum(s.num_tokens for s in self.shards),
            shards=tuple(self.shards),
            sources=merge_mixes([self._sources]),
            languages=merge_mixes([self._languages]),
        )


def merge_mixes(mixes: list[dict[str, Any]]) -> Mix:
    """Sum {name: {"documents": n, "tokens": n}} mixes, names sorted."""
    total: dict[str, Counter[str]] = {}
    for mix in mixes:
        for name, counts in mix.items():
            total.setdefault(name, Counter()).update(counts)
    return {k: dict(v) for k, v in sorted(total.items())}
