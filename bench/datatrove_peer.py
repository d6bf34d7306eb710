"""Hugging Face datatrove (0.10.1) on the data benchmark's corpus: the peer of bench/data.py.

Runs in its own environment (datatrove pins versions atoll does not use, and its Gopher filters
need spaCy): `make peer-env` creates `.venv-peer`, and `bench/data.py --peer datatrove` calls

    .venv-peer/bin/python bench/datatrove_peer.py --input DIR --tokenizer tokenizer.json --workers 2 --work DIR

which prints one JSON object: a record per stage (`stage`, `mb_per_s`, `seconds`, `docs_in`,
`docs_out`) in bench/data.py's format. Each stage reads the same input (JSON Lines files of
`{"id", "text"}`) with datatrove's own reader and writer, on a `LocalPipelineExecutor` with
`--workers` processes, as a datatrove user would run it; the executor's start-up is included.

- quality filters: GopherQualityFilter + GopherRepetitionFilter + C4QualityFilter, defaults;
- near dedup: MinhashDedupSignature -> Buckets -> Cluster -> Filter, default MinhashConfig
  (5-grams, 14 buckets x 8 hashes); the signature step is also reported on its own;
- exact dedup: ExactDedupSignature -> ExactFindDedups -> ExactDedupFilter on the text;
- tokenize: DocumentTokenizer with the same tokenizer.json and EOS as atoll's stage.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def count_docs(folder: Path) -> int:
    """Documents in a folder of datatrove's JSON Lines output (gzip by default)."""
    n = 0
    for path in sorted(folder.rglob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            n += sum(1 for line in f if line.strip())
    return n


def input_size(folder: Path) -> tuple[float, int]:
    """MB of UTF-8 text and number of documents in the input files."""
    size, docs = 0, 0
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                size += len(json.loads(line)["text"].encode("utf-8"))
                docs += 1
    return size / 1e6, docs


def record(stage: str, size_mb: float, seconds: float, docs_in: int, docs_out: int, **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "mb_per_s": round(size_mb / seconds, 3),
        "seconds": round(seconds, 3),
        "docs_in": docs_in,
        "docs_out": docs_out,
        **extra,
    }


def timed(executors: list[Any]) -> list[float]:
    """Run executors one after the other; seconds of each."""
    out = []
    for ex in executors:
        t0 = time.perf_counter()
        ex.run()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, required=True, help="folder of .jsonl files ({id, text} per line)")
    ap.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json for the tokenize stage")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    args = ap.parse_args()

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
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    files = len(list(args.input.glob("*.jsonl")))
    if files == 0:
        raise SystemExit(f"no .jsonl file in {args.input}")
    size, docs = input_size(args.input)
    w, tasks = args.workers, files

    def executor(name: str, pipeline: list[Any], n_tasks: int = tasks) -> LocalPipelineExecutor:
        return LocalPipelineExecutor(
            pipeline=pipeline, tasks=n_tasks, workers=min(w, n_tasks), logging_dir=str(args.work / "logs" / name)
        )

    def reader() -> JsonlReader:
        return JsonlReader(str(args.input))

    stages = []
    out = args.work / "filtered"
    [secs] = timed(
        [
            executor(
                "filters",
                [reader(), GopherQualityFilter(), GopherRepetitionFilter(), C4QualityFilter(), JsonlWriter(str(out))],
            )
        ]
    )
    stages.append(
        record("quality filters (datatrove Gopher quality + repetition, C4)", size, secs, docs, count_docs(out))
    )

    cfg = MinhashConfig()
    m = args.work / "minhash"
    near = [
        executor("mh-sigs", [reader(), MinhashDedupSignature(output_folder=str(m / "sigs"), config=cfg)]),
        executor(
            "mh-buckets",
            [MinhashDedupBuckets(input_folder=str(m / "sigs"), output_folder=str(m / "buckets"), config=cfg)],
            cfg.num_buckets,
        ),
        executor(
            "mh-cluster",
            [MinhashDedupCluster(input_folder=str(m / "buckets"), output_folder=str(m / "remove"), config=cfg)],
            1,
        ),
        executor(
            "mh-filter", [reader(), MinhashDedupFilter(input_folder=str(m / "remove")), JsonlWriter(str(m / "out"))]
        ),
    ]
    secs = timed(near)
    stages.append(
        record(
            "near dedup (datatrove MinHash, 4 steps)",
            size,
            sum(secs),
            docs,
            count_docs(m / "out"),
            signature_seconds=round(secs[0], 3),
            step_seconds=[round(s, 3) for s in secs],
        )
    )

    ecfg = ExactDedupConfig(content_getter=lambda doc: doc.text)
    e = args.work / "exact"
    exact = [
        executor(
            "ex-sigs", [reader(), ExactDedupSignature(output_folder=str(e / "sigs"), config=ecfg, finder_workers=1)]
        ),
        executor(
            "ex-find", [ExactFindDedups(data_folder=str(e / "sigs"), output_folder=str(e / "dups"), config=ecfg)], 1
        ),
        executor(
            "ex-filter",
            [reader(), ExactDedupFilter(data_folder=str(e / "dups"), config=ecfg), JsonlWriter(str(e / "out"))],
        ),
    ]
    secs = timed(exact)
    stages.append(
        record(
            "exact dedup (datatrove, 3 steps)",
            size,
            sum(secs),
            docs,
            count_docs(e / "out"),
            step_seconds=[round(s, 3) for s in secs],
        )
    )

    t = args.work / "tokens"
    [secs] = timed(
        [
            executor(
                "tokenize",
                [
                    reader(),
                    DocumentTokenizer(
                        output_folder=str(t),
                        tokenizer_name_or_path=str(args.tokenizer),
                        eos_token="<|endoftext|>",
                        shuffle_documents=False,
                    ),
                ],
            )
        ]
    )
    tokens = sum(p.stat().st_size for p in t.rglob("*.ds")) // 2
    stages.append(record("tokenize (datatrove DocumentTokenizer)", size, secs, docs, docs, tokens=tokens))

    json.dump(
        {
            "system": "datatrove",
            "input_mb": round(size, 3),
            "documents": docs,
            "workers": w,
            "tasks": tasks,
            "stages": stages,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
