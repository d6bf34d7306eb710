"""Hugging Face datatrove (0.10.1) end to end on the data benchmark's files: the peer of bench/data.py.

Runs in its own environment (datatrove pins versions atoll does not use, and its Gopher filters
need spaCy): `make peer-env` creates `.venv-peer`, and `bench/data.py --peer datatrove` runs

    .venv-peer/bin/python bench/datatrove_peer.py --input DIR --tokenizer tokenizer.json --workers 2 --work DIR

as a fresh process and times it from start to exit. It prints one JSON object: the documents
each stage kept, why the filters removed the others, and each executor's seconds.

The stages are atoll's (`atoll data prepare`), written as a datatrove user writes a FineWeb-style
recipe: six `LocalPipelineExecutor`s, `--workers` processes each, one task per input file,
intermediate JSON Lines uncompressed (datatrove's default gzip would only slow it down):

1. read -> clean (Unicode NFC, as atoll's default; datatrove's PIIFormatter masks e-mail and IP
   addresses) -> C4 -> Gopher quality -> Gopher repetition, with atoll's thresholds -> write ->
   exact-dedup signatures (a hash of the text);
2. find exact duplicates (one task);
3. read -> drop exact duplicates -> write -> MinHash signatures: atoll's 3-word shingles, 126
   hashes in 21 bands of 6 (the S-curve's midpoint (1/21)^(1/6) = 0.60, atoll's threshold);
4. MinHash buckets (one task per band); 5. clusters (one task);
6. read -> drop near duplicates -> DocumentTokenizer with the same tokenizer.json and EOS as
   atoll, documents in input order.

Not equivalent, and why: no language filter (datatrove's LanguageFilter needs a fastText model
downloaded from the internet, which this machine cannot reach; atoll's is a script + stop-word
rule with no model); datatrove's Gopher rules count words with spaCy's tokenizer, where
punctuation marks are words (its alpha-word ratio then counts them against a document), atoll
counts runs of letters and digits; atoll's repetition rules ignore lines under 20 characters
(speaker names in verse), datatrove's cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

ATOLL_DUP_NGRAMS = ((5, 0.35), (6, 0.34), (7, 0.33), (8, 0.32), (9, 0.31), (10, 0.30))


def input_size(folder: Path) -> tuple[float, int, int]:
    """MB of UTF-8 text, documents and files in the input."""
    size = docs = files = 0
    for path in sorted(folder.glob("*.jsonl")):
        files += 1
        with open(path, encoding="utf-8") as f:
            for line in f:
                size += len(json.loads(line)["text"].encode("utf-8"))
                docs += 1
    return size / 1e6, docs, files


def stats_of(logs: Path) -> list[dict[str, Any]]:
    """The per-step statistics an executor writes (logging_dir/stats.json)."""
    return json.loads((logs / "stats.json").read_text())


def step_stats(stats: list[dict[str, Any]], name_part: str) -> dict[str, Any]:
    for step in stats:
        if name_part in step["name"]:
            return step["stats"]
    raise KeyError(f"no step named like {name_part!r} in {[s['name'] for s in stats]}")


def total(entry: Any) -> int:
    """A stats value: a plain count or {"total": n, ...}."""
    if isinstance(entry, dict):
        return int(entry.get("total", entry.get("n", 0)))
    return int(entry)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, required=True, help="folder of .jsonl files ({id, text} per line)")
    ap.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json for the tokenize stage")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    args = ap.parse_args()

    import datatrove
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.formatters.base import BaseFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    class UnicodeNFC(BaseFormatter):
        """atoll's default normalization (clean.normalize: NFC), as a datatrove formatter."""

        name = "unicode NFC"

        def format(self, text: str) -> str:
            return unicodedata.normalize("NFC", text)

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    size, docs, files = input_size(args.input)
    if files == 0:
        raise SystemExit(f"no .jsonl file in {args.input}")
    w, tasks = args.workers, files
    logs = args.work / "logs"

    def executor(name: str, pipeline: list[Any], n_tasks: int = tasks) -> LocalPipelineExecutor:
        return LocalPipelineExecutor(
            pipeline=pipeline, tasks=n_tasks, workers=min(w, n_tasks), logging_dir=str(logs / name)
        )

    def writer(folder: Path) -> JsonlWriter:
        return JsonlWriter(str(folder), compression=None)

    filtered, unique, tokens = args.work / "filtered", args.work / "unique", args.work / "tokens"
    ecfg = ExactDedupConfig(content_getter=lambda doc: doc.text)
    mcfg = MinhashConfig(n_grams=3, num_buckets=21, hashes_per_bucket=6)
    exact_dir, mh = args.work / "exact", args.work / "minhash"
    steps = {
        "clean+filter+exact sigs": executor(
            "filter",
            [
                JsonlReader(str(args.input)),
                UnicodeNFC(),
                PIIFormatter(),
                C4QualityFilter(
                    split_paragraph=True,
                    remove_citations=False,
                    filter_no_terminal_punct=False,
                    min_num_sentences=-1,
                    min_words_per_line=-1,
                    max_word_length=-1,
                    filter_lorem_ipsum=True,
                    filter_javascript=True,
                    filter_curly_bracket=False,
                    filter_policy=True,
                ),
                GopherQualityFilter(
                    min_doc_words=50,
                    max_doc_words=100_000,
                    min_avg_word_length=3,
                    max_avg_word_length=10,
                    max_symbol_word_ratio=0.1,
                    max_bullet_lines_ratio=0.9,
                    max_ellipsis_lines_ratio=0.3,
                    max_non_alpha_words_ratio=0.8,
                    min_stop_words=2,
                ),
                GopherRepetitionFilter(
                    dup_line_frac=0.3,
                    dup_para_frac=0.3,
                    dup_line_char_frac=0.3,
                    dup_para_char_frac=0.3,
                    top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
                    dup_n_grams=ATOLL_DUP_NGRAMS,
                ),
                writer(filtered),
                ExactDedupSignature(output_folder=str(exact_dir / "sigs"), config=ecfg, finder_workers=1),
            ],
        ),
        "exact find": executor(
            "exact-find",
            [ExactFindDedups(data_folder=str(exact_dir / "sigs"), output_folder=str(exact_dir / "dups"), config=ecfg)],
            1,
        ),
        "exact filter+minhash sigs": executor(
            "exact-filter",
            [
                JsonlReader(str(filtered)),
                ExactDedupFilter(data_folder=str(exact_dir / "dups"), config=ecfg),
                writer(unique),
                MinhashDedupSignature(output_folder=str(mh / "sigs"), config=mcfg),
            ],
        ),
        "minhash buckets": executor(
            "mh-buckets",
            [MinhashDedupBuckets(input_folder=str(mh / "sigs"), output_folder=str(mh / "buckets"), config=mcfg)],
            mcfg.num_buckets,
        ),
        "minhash cluster": executor(
            "mh-cluster",
            [MinhashDedupCluster(input_folder=str(mh / "buckets"), output_folder=str(mh / "remove"), config=mcfg)],
            1,
        ),
        "near filter+tokenize": executor(
            "tokenize",
            [
                JsonlReader(str(unique)),
                MinhashDedupFilter(input_folder=str(mh / "remove")),
                DocumentTokenizer(
                    output_folder=str(tokens),
                    tokenizer_name_or_path=str(args.tokenizer),
                    eos_token="<|endoftext|>",
                    shuffle_documents=False,
                ),
            ],
        ),
    }
    seconds = {}
    for name, ex in steps.items():
        start = time.perf_counter()
        ex.run()
        seconds[name] = round(time.perf_counter() - start, 3)

    # Counts from the executors' own statistics (nothing is re-read).
    filt = stats_of(logs / "filter")
    removed: dict[str, int] = {}
    for step in filt:
        if "FILTER" not in step["name"]:
            continue
        for key, value in step["stats"].items():
            if key.startswith("dropped_"):
                label = f"{step['name'].split('-', 1)[-1].strip()}: {key.removeprefix('dropped_')}"
                removed[label] = removed.get(label, 0) + total(value)
    kept_by_filters = total(step_stats(filt, "WRITER")["total"])
    unique_docs = total(step_stats(stats_of(logs / "exact-filter"), "WRITER")["total"])
    tok_stats = step_stats(stats_of(logs / "tokenize"), "TOKENIZER")["tokens"]
    docs_out, n_tokens = int(tok_stats["n"]), int(tok_stats["total"])
    json.dump(
        {
            "system": "datatrove",
            "version": datatrove.__version__ if hasattr(datatrove, "__version__") else "0.10.1",
            "input_mb": round(size, 3),
            "docs_in": docs,
            "kept_by_filters": kept_by_filters,
            "removed_by_filter": dict(sorted(removed.items(), key=lambda kv: -kv[1])),
            "exact_duplicates": kept_by_filters - unique_docs,
            "near_duplicates": unique_docs - docs_out,
            "docs_out": docs_out,
            "tokens": n_tokens,
            "workers": w,
            "tasks": tasks,
            "step_seconds": seconds,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
