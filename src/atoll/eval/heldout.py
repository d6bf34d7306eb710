"""Held-out sets, and the check that a stage never trained on them.

A held-out set is named on the command line as ``NAME=PATH``, where PATH is
- a prepared data directory (manifest.json): its validation split;
- a fine-tuning run: the documents it held out (``RUN/data/heldout.jsonl``);
- a JSON Lines file with ``text`` or ``prompt``/``response`` per line;
- a text file or a directory of text files (.txt/.md/.rst, .gz).

A document's identity is the sha256 of its text with whitespace collapsed (`content_hash`).
The training documents of every stage in a chain are known by those hashes: fine-tuning runs
store them (``RUN/data/hashes.json``); a pre-training run's are recomputed from its data
directory's train shards (documents are separated by the end-of-text token, and atoll's
tokenizers decode losslessly). A Hugging Face root's training data is unknown, and said so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atoll.data import EOS_TOKEN, Manifest, load_tokenizer
from atoll.data.manifest import MANIFEST_FILE, numpy_dtype
from atoll.errors import AtollError
from atoll.finetune.config import FinetuneDataSection
from atoll.finetune.data import HELDOUT_JSONL, Example, content_hash, read_examples, read_hashes, read_heldout
from atoll.rundir.layout import DATA_DIR, read_run_config
from atoll.rundir.lineage import Stage, classify_stage, parent_of

log = logging.getLogger(__name__)

# Decoding a pre-training corpus to hash its documents is linear in its size; beyond this the
# check is skipped with a warning rather than taking hours.
MAX_HASHED_TOKENS = 200_000_000


@dataclass
class HeldoutSet:
    name: str
    source: str
    examples: list[Example]

    def hashes(self) -> set[str]:
        return {content_hash(ex.content) for ex in self.examples}


def parse_data_arg(arg: str) -> tuple[str, Path]:
    """``NAME=PATH`` (or just PATH, named after its last component)."""
    name, sep, path = arg.partition("=")
    if not sep:
        return Path(arg).name.split(".")[0] or arg, Path(arg)
    if not name or not path:
        raise AtollError(f"--data {arg!r}: write NAME=PATH (e.g. --data networking=runs/chain/networking)")
    return name, Path(path)


def shard_documents(data_dir: Path, split: str) -> list[str]:
    """The documents of a prepared data directory's split, decoded from its shards."""
    manifest = Manifest.load(data_dir)
    if split not in manifest.splits:
        raise AtollError(f"{data_dir} has no {split!r} split")
    shards = manifest.splits[split].shards
    dtype = numpy_dtype(manifest.dtype)
    ids = (
        np.concatenate([np.fromfile(manifest.shard_path(data_dir, s), dtype=dtype) for s in shards])
        if shards
        else np.empty(0, dtype=dtype)
    )
    tokenizer = load_tokenizer(data_dir / manifest.tokenizer_file)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    bounds = np.flatnonzero(ids == eos).tolist()
    if not bounds or bounds[-1] != len(ids) - 1:
        bounds.append(len(ids))
    docs, start = [], 0
    for end in bounds:
        if end > start:
            docs.append(tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False))
        start = end + 1
    return docs


def load_heldout(name: str, path: Path) -> HeldoutSet:
    """The held-out set at `path` (see the module docstring). Raises AtollError."""
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        docs = shard_documents(path, "validation")
        return HeldoutSet(
            name, f"{path} (validation split)", [Example(id=f"validation:{i}", text=d) for i, d in enumerate(docs)]
        )
    if path.is_dir() and (path / DATA_DIR / HELDOUT_JSONL).is_file():
        return HeldoutSet(name, f"{path} (held out by the stage)", read_heldout(path / DATA_DIR / HELDOUT_JSONL))
    if path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")):
        return HeldoutSet(name, str(path), read_heldout(path))
    if path.exists():
        examples, _ = read_examples([path], FinetuneDataSection(paths=[path]))
        return HeldoutSet(name, str(path), examples)
    raise AtollError(f"--data {name}={path}: no such file or directory")


@dataclass
class TrainingHashes:
    """The document hashes a stage and its ancestors trained on, and what could not be checked."""

    hashes: set[str] = field(default_factory=set)
    checked: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


_PRETRAIN_CACHE: dict[tuple[str, float], set[str]] = {}


def _pretrain_hashes(data_dir: Path) -> set[str] | None:
    manifest_path = data_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    key = (str(manifest_path.resolve()), manifest_path.stat().st_mtime)
    if key not in _PRETRAIN_CACHE:
        manifest = Manifest.load(data_dir)
        if manifest.splits["train"].num_tokens > MAX_HASHED_TOKENS:
            return None
        _PRETRAIN_CACHE[key] = {content_hash(d) for d in shard_documents(data_dir, "train")}
    return _PRETRAIN_CACHE[key]


def training_hashes(path: Path) -> TrainingHashes:
    """Hashes of every document the stage at `path` and its ancestors were trained on."""
    out = TrainingHashes()
    stage: Stage | None = classify_stage(path)
    while stage is not None:
        if stage.kind in ("lora", "full"):
            out.hashes |= read_hashes(stage.path / DATA_DIR, "train")
            out.checked.append(str(stage.path))
        elif stage.kind == "pretrain":
            data_dir = Path(read_run_config(stage.path).get("data", {}).get("dir", ""))
            found = _pretrain_hashes(data_dir)
            if found is None:
                out.unknown.append(f"{stage.path} (data {data_dir} missing or too large to hash)")
            else:
                out.hashes |= found
                out.checked.append(f"{stage.path} ({data_dir})")
        else:
            out.unknown.append(f"{stage.path} (a Hugging Face model: its training data is unknown)")
        stage = parent_of(stage)
    return out


def overlap(heldout: HeldoutSet, trained: TrainingHashes) -> int:
    """How many documents of `heldout` a stage was trained on."""
    return len(heldout.hashes() & trained.hashes)
