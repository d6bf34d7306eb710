"""Packing: split documents, place them on sites, cut each (split, site) stream into shards.

Each document's split comes from a hash of its source and id (so adding documents never
moves existing ones across splits), and its site from the placement: by source, by language,
by a hash in proportion to shares, or every site reads everything. A stream is the documents
of one (split, group) in the corpus' order, each followed by its end-of-text token, cut into
shards of `pack.shard_tokens` by `atoll.data.shard_writer.ShardWriter`. Training windows of
seq_len + 1 tokens are taken from a shard's stream (`atoll.data.loader`), so packing is
concatenation with document boundaries marked.

Resume: every written shard is recorded in `work/pack/shards.jsonl`; a re-run with the same
fingerprint re-derives the streams (cheap) but skips writing and hashing recorded shards.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atoll.data.config import DataConfig
from atoll.data.manifest import MANIFEST_FILE, SPLITS, TOKENIZER_FILE, Manifest, SplitInfo
from atoll.data.progress import StageProgress
from atoll.data.readers import Unit
from atoll.data.shard_writer import ALL, ShardRecord, ShardWriter, merge_mixes
from atoll.data.stages import PIPELINE_VERSION, fingerprint, load_unit_meta, write_json_atomic
from atoll.errors import AtollError


@dataclass
class _Doc:
    unit: str
    index: int  # position among the unit's tokenized documents
    source: str
    lang: str
    split: str
    group: str
    draw: float


def _assign(cfg: DataConfig, docs: list[_Doc]) -> None:
    """Give each document its group (site) and make sure every group with two or more
    documents has one in validation (the one whose split draw is smallest)."""
    placement = cfg.placement
    site_of: dict[str, str] = {}
    if placement.mode in ("by_source", "by_language"):
        site_of = {name: site for site, names in placement.assign.items() for name in names}
    shares = list(placement.shares.items())
    total_share = sum(w for _, w in shares)
    for d in docs:
        if placement.mode == "all":
            d.group = ALL
        elif placement.mode == "by_source":
            d.group = site_of[d.source]
        elif placement.mode == "by_language":
            if d.lang not in site_of:
                raise AtollError(
                    f"document {d.source}/{d.index} has language {d.lang!r}, which placement.assign gives to no site"
                )
            d.group = site_of[d.lang]
        else:
            acc = 0.0
            d.group = shares[-1][0]
            for site, weight in shares:
                acc += weight / total_share
                if d.draw < acc:
                    d.group = site
                    break
    by_group: dict[str, list[_Doc]] = {}
    for d in docs:
        by_group.setdefault(d.group, []).append(d)
    for members in by_group.values():
        if len(members) >= 2 and not any(d.split == "validation" for d in members):
            min(members, key=lambda d: d.draw).split = "validation"
        if all(d.split == "validation" for d in members):
            max(members, key=lambda d: d.draw).split = "train"


def pack_shards(
    cfg: DataConfig,
    *,
    units: list[Unit],
    work: Path,
    dedup: dict[str, Any],
    token_stats: dict[str, dict[str, Any]],
    tokenizer_path: Path,
    tokenizer_sha: str,
    vocab_size: int,
    dtype: np.dtype,
    progress: StageProgress,
    fault: Callable[[str, int], None] | None,
    draws: Callable[[str, str, int], tuple[float, float]],
) -> tuple[Manifest, dict[str, Any]]:
    """Write the shards of every (split, site) stream into `cfg.output` and return the
    manifest (not yet written) and {written, skipped, seconds} shard counts."""
    started = time.perf_counter()
    out = cfg.output
    state_dir = work / "pack"
    state_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(
        PIPELINE_VERSION,
        [token_stats[u.name]["fingerprint"] for u in units],
        cfg.pack.model_dump(mode="json"),
        cfg.placement.model_dump(mode="json"),
        cfg.split.model_dump(mode="json"),
        cfg.seed,
    )
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # an interrupted pack never looks complete
    records_path = state_dir / "shards.jsonl"
    state_path = state_dir / "state.json"
    done: dict[str, dict[str, Any]] = {}
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    if state.get("fingerprint") == fp and records_path.is_file():
        for line in records_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["file"]] = rec
    else:
        for split in SPLITS:
            for old in out.glob(f"{split}_*.bin"):
                old.unlink()
        records_path.unlink(missing_ok=True)
        write_json_atomic(state_path, {"fingerprint": fp})
    shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)

    clean_dir, tok_dir = work / "clean", work / "tokenize"
    docs: list[_Doc] = []
    for u in units:
        meta = load_unit_meta(clean_dir, u.name)
        ids, langs = meta["ids"], meta["langs"]
        with np.load(tok_dir / f"{u.name}.npz") as z:
            rows = z["rows"]
        for index, row in enumerate(rows.tolist()):
            u_split, u_draw = draws(u.source, ids[row], cfg.seed)
            split = "validation" if u_split < cfg.split.validation_fraction else "train"
            docs.append(_Doc(u.name, index, u.source, langs[row], split, ALL, u_draw))
    _assign(cfg, docs)

    records = records_path.open("a", encoding="utf-8")
    writers: dict[tuple[str, str], ShardWriter] = {}
    written_total = 0

    def record(rec: ShardRecord) -> None:
        nonlocal written_total
        records.write(json.dumps(rec) + "\n")
        records.flush()
        written_total += 1
        if fault is not None:
            fault("pack", written_total)

    def writer(split: str, group: str) -> ShardWriter:
        key = (split, group)
        if key not in writers:
            writers[key] = ShardWriter(
                out, split, group=group, dtype=dtype, shard_tokens=cfg.pack.shard_tokens, done=done, record=record
            )
        return writers[key]

    progress.start("pack", total=len(units))
    try:
        cursor = 0
        for u in units:
            with np.load(tok_dir / f"{u.name}.npz") as z:
                tokens, lengths = z["tokens"], z["lengths"]
            ends = np.cumsum(lengths)
            for index in range(len(lengths)):
                d = docs[cursor]
                cursor += 1
                assert d.unit == u.name and d.index == index
                writer(d.split, d.group).add(
                    tokens[ends[index] - lengths[index] : ends[index]], source=d.source, lang=d.lang
                )
            progress.advance()
        for w in writers.values():
            w.flush()
    finally:
        records.close()
        progress.finish()

    groups = sorted(
        {g for _, g in writers},
        key=lambda g: (cfg.placement.site_names().index(g) if g in cfg.placement.site_names() else -1, g),
    )
    splits: dict[str, SplitInfo] = {}
    for split in SPLITS:
        parts = [writers[(split, g)] for g in groups if (split, g) in writers]
        infos = [w.split_info() for w in parts]
        splits[split] = SplitInfo(
            num_documents=sum(i.num_documents for i in infos),
            num_tokens=sum(i.num_tokens for i in infos),
            shards=tuple(s for i in infos for s in i.shards),
            sources=merge_mixes([i.sources for i in infos]),
            languages=merge_mixes([i.languages for i in infos]),
        )
    sites: dict[str, dict[str, tuple[str, ...]]] = {}
    for site in cfg.placement.site_names():
        group = ALL if cfg.placement.mode == "all" else site
        sites[site] = {
            split: tuple(s.file for s in writers[(split, group)].shards) if (split, group) in writers else ()
            for split in SPLITS
        }
    manifest = Manifest(
        dtype=dtype.name,
        seq_len=cfg.pack.seq_len,
        vocab_size=vocab_size,
        tokenizer_sha256=tokenizer_sha,
        splits=splits,
        sources=dict(sorted(Counter(d.source for d in docs).items())),
        placement=cfg.placement.mode,
        sites=sites,
    )
    return manifest, {
        "written": sum(w.written for w in writers.values()),
        "skipped": sum(w.skipped for w in writers.values()),
        "seconds": time.perf_counter() - started,
    }
