"""`atoll data prepare`: raw text to verified, site-placed token shards, resumably.

Stages, each recorded under the work directory with a fingerprint of everything it depends on
(its settings and its inputs' fingerprints), so a re-run redoes only what changed or did not
finish:

1. clean     (per unit, parallel) read, clean, identify language, filter, MinHash-sign
2. dedup     (one process) exact and near-duplicate removal in the corpus' global order
3. tokenizer (one process) train a byte-level BPE on a sample of the train split, or copy one
4. tokenize  (per unit, parallel) encode kept documents, end-of-text after each
5. pack      (one process) split, place on sites, cut shards; each shard recorded once written
6. manifest  written last and atomically, with report.json and report.md beside it

Output never depends on the number of workers: units are merged in their planned order.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import xxhash

from atoll.data.config import DataConfig
from atoll.data.dedup import deduplicate
from atoll.data.manifest import TOKENIZER_FILE, Manifest, numpy_dtype, token_dtype, write_manifest
from atoll.data.pack import pack_shards
from atoll.data.progress import NullStageProgress, StageProgress
from atoll.data.readers import Unit, plan_units
from atoll.data.report import build_report, write_report
from atoll.data.stages import (
    PIPELINE_VERSION,
    CleanTask,
    TokenizeTask,
    clean_unit,
    fingerprint,
    load_unit_arrays,
    load_unit_meta,
    load_unit_texts,
    read_done,
    tokenize_unit,
    write_json_atomic,
)
from atoll.data.tokenizer import file_sha256, load_tokenizer, train_bpe
from atoll.errors import AtollError

logger = logging.getLogger(__name__)

FaultHook = Callable[[str, int], None]
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class StageRun:
    """What one stage did in this invocation."""

    units_done: int = 0
    units_skipped: int = 0
    seconds: float = 0.0


@dataclass
class PrepareResult:
    """The outcome of `prepare`: the manifest, the report (as written to report.json) and
    what each stage did in this invocation (resumed work shows as skipped units)."""

    manifest: Manifest
    report: dict[str, Any]
    stages: dict[str, StageRun] = field(default_factory=dict)


def _init_worker() -> None:
    # One core per worker: the tokenizers library would otherwise start a thread per core in
    # every worker process.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class Executor:
    """Runs unit tasks in this process (workers=1) or in a pool of spawned processes.

    Spawn, not fork: the parent may hold threads (tokenizers, progress bars) that a forked
    child would inherit in an undefined state. The pool is created on first use and lives
    until `close`.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def map_unordered(self, fn: Callable[[T], R], tasks: Sequence[T]) -> Iterator[R]:
        if self.workers == 1 or len(tasks) <= 1:
            for task in tasks:
                yield fn(task)
            return
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_init_worker)
        yield from self._pool.imap_unordered(fn, tasks)

    def close(self, *, abort: bool = False) -> None:
        if self._pool is None:
            return
        if abort:
            self._pool.terminate()
        else:
            self._pool.close()
        self._pool.join()
        self._pool = None


def _check_error_rate(stats: list[dict[str, Any]], cfg: DataConfig, *, final: bool) -> None:
    errors = sum(s["errors"] for s in stats)
    total = errors + sum(s["records"] for s in stats)
    if not errors or total < max(1, cfg.errors.min_records):
        return
    rate = errors / total
    if rate > cfg.errors.max_rate:
        samples = [x for s in stats for x in s["error_samples"]][:3]
        raise AtollError(
            f"bad input: {errors} of {total} records ({rate:.1%}) could not be read, above "
            f"errors.max_rate {cfg.errors.max_rate:g} (e.g. {'; '.join(samples)}); fix or remove "
            "those inputs, or raise errors.max_rate; completed work is kept and a re-run resumes"
            + ("" if final else " (stopped early)")
        )


class _Run:
    """One invocation of the pipeline: paths, executor, progress and bookkeeping."""

    def __init__(self, cfg: DataConfig, progress: StageProgress, fault: FaultHook | None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.fault = fault
        self.work = cfg.work_path
        self.out = cfg.output
        self.executor = Executor(cfg.workers)
        self.stages: dict[str, StageRun] = {}
        self.timing: dict[str, float] = {}

    def stage_dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run_units(
        self,
        stage: str,
        fn: Callable[[Any], dict[str, Any]],
        tasks: list[Any],
        done: list[dict[str, Any]],
        *,
        on_result: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run `tasks` (the units not yet done), calling the fault hook after each completes."""
        run = self.stages.setdefault(stage, StageRun())
        run.units_skipped = len(done)
        self.progress.start(stage, total=len(tasks) + len(done), completed=len(done))
        started = time.perf_counter()
        results = list(done)
        try:
            for stats in self.executor.map_unordered(fn, tasks):
                results.append(stats)
                run.units_done += 1
                self.progress.advance()
                if on_result is not None:
                    on_result(results)
                if self.fault is not None:
                    self.fault(stage, run.units_done)
        except BaseException:
            self.executor.close(abort=True)
            raise
        finally:
            self.progress.finish()
        run.seconds = time.perf_counter() - started
        self.timing[stage] = run.seconds
        return results

    # ------------------------------------------------------------ stages

    def clean(self, units: list[Unit]) -> dict[str, dict[str, Any]]:
        cfg = self.cfg
        out = self.stage_dir("clean")
        specs = {s.name: s for s in cfg.sources}
        near = cfg.dedup.near
        settings = [
            PIPELINE_VERSION,
            cfg.clean.model_dump(mode="json"),
            cfg.filters.model_dump(mode="json"),
            near.model_dump(mode="json"),
        ]
        tasks, done = [], []
        for unit in units:
            fp = fingerprint(settings, unit.fingerprint(specs[unit.source]))
            stats = read_done(out / f"{unit.name}.json", fp)
            if stats is not None:
                done.append(stats)
            else:
                tasks.append(
                    CleanTask(
                        unit=unit,
                        spec=specs[unit.source],
                        clean=cfg.clean,
                        filters=cfg.filters,
                        near=near,
                        out_dir=str(out),
                        fingerprint=fp,
                    )
                )
        logged = 0

        def on_result(results: list[dict[str, Any]]) -> None:
            nonlocal logged
            latest = results[-1]
            for sample in latest["error_samples"]:
                if logged < 10:
                    logger.warning("source %s: %s (skipped)", latest["source"], sample)
                    logged += 1
            _check_error_rate(results, cfg, final=False)

        results = self.run_units("clean", clean_unit, tasks, done, on_result=on_result)
        _check_error_rate(results, cfg, final=True)
        by_name = {s["unit"]: s for s in results}
        return {u.name: by_name[u.name] for u in units}

    def dedup(self, units: list[Unit], clean_stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        out = self.stage_dir("dedup")
        clean_dir = self.work / "clean"
        fp = fingerprint(
            PIPELINE_VERSION, cfg.dedup.model_dump(mode="json"), [clean_stats[u.name]["fingerprint"] for u in units]
        )
        result = read_done(out / "result.json", fp)
        run = self.stages.setdefault("dedup", StageRun())
        if result is not None:
            run.units_skipped = len(units)
            return result
        self.progress.start("dedup", total=len(units))
        started = time.perf_counter()
        offsets: list[tuple[str, int]] = []  # global position -> (unit, row)

        def items() -> Iterator[tuple[bytes, np.ndarray | None]]:
            for unit in units:
                hashes, sigs = load_unit_arrays(clean_dir, unit.name)
                near = cfg.dedup.near.enabled
                for row in range(len(hashes)):
                    offsets.append((unit.name, row))
                    yield hashes[row].tobytes(), (sigs[row] if near else None)
                self.progress.advance()

        outcome = deduplicate(items(), exact=cfg.dedup.exact, near=cfg.dedup.near)
        removed: dict[str, list[int]] = {u.name: [] for u in units}
        for pos in sorted(outcome.removed):
            unit_name, row = offsets[pos]
            removed[unit_name].append(row)
        examples = self._dedup_examples(outcome, offsets, clean_dir)
        kinds = list(outcome.removed.values())
        result = {
            "fingerprint": fp,
            "documents": len(offsets),
            "exact": kinds.count("exact"),
            "near": kinds.count("near"),
            "removed": removed,
            "examples": examples,
            "seconds": time.perf_counter() - started,
        }
        write_json_atomic(out / "result.json", result)
        self.progress.finish()
        run.units_done = len(units)
        run.seconds = self.timing["dedup"] = time.perf_counter() - started
        return result

    def _dedup_examples(self, outcome: Any, offsets: list[tuple[str, int]], clean_dir: Path) -> list[dict[str, Any]]:
        limit = self.cfg.dedup.max_examples
        # Near duplicates first: they are the interesting ones to look at.
        chosen = sorted(outcome.removed, key=lambda p: (outcome.removed[p] != "near", p))[:limit]
        loaded: dict[str, tuple[list[str], list[str]]] = {}

        def doc(pos: int) -> dict[str, str]:
            unit_name, row = offsets[pos]
            if unit_name not in loaded:
                loaded[unit_name] = (load_unit_meta(clean_dir, unit_name)["ids"], load_unit_texts(clean_dir, unit_name))
            ids, texts = loaded[unit_name]
            return {"id": ids[row], "unit": unit_name, "start": " ".join(texts[row][:120].split())}

        return [
            {
                "kind": outcome.removed[p],
                "similarity": round(outcome.similarity[p], 3),
                "removed": doc(p),
                "kept": doc(outcome.matches[p]),
            }
            for p in chosen
        ]

    def tokenizer(
        self, units: list[Unit], clean_stats: dict[str, dict[str, Any]], dedup: dict[str, Any]
    ) -> tuple[Path, str, int]:
        """(path, sha256, manifest vocab size) of the tokenizer the shards are encoded with.

        A given tokenizer is copied and its own vocabulary size recorded. Otherwise a BPE is
        trained on the train split's kept documents, or on a deterministic sample of them of
        about `tokenizer.train_max_mb` (chosen by a hash of each document's id); the manifest
        records the configured vocab_size (the model's embedding size), which a small corpus
        may not fill."""
        cfg = self.cfg
        out = self.stage_dir("tokenizer")
        path = out / TOKENIZER_FILE
        run = self.stages.setdefault("tokenizer", StageRun())
        started = time.perf_counter()
        if cfg.tokenizer.path is not None:
            tokenizer = load_tokenizer(cfg.tokenizer.path)
            given_sha = file_sha256(cfg.tokenizer.path)
            if not path.is_file() or file_sha256(path) != given_sha:
                shutil.copyfile(cfg.tokenizer.path, path)
            run.units_done = 1
            return path, given_sha, tokenizer.get_vocab_size()
        fp = fingerprint(
            PIPELINE_VERSION,
            cfg.tokenizer.model_dump(mode="json"),
            cfg.split.model_dump(mode="json"),
            cfg.seed,
            dedup["fingerprint"],
        )
        done = read_done(out / "done.json", fp)
        if done is not None and path.is_file() and file_sha256(path) == done["sha256"]:
            run.units_skipped = 1
            return path, done["sha256"], cfg.tokenizer.vocab_size
        self.progress.start("tokenizer", total=1)
        clean_dir = self.work / "clean"
        budget = int(cfg.tokenizer.train_max_mb * 1e6)
        total = sum(clean_stats[u.name]["bytes_out"] for u in units)
        keep_share = 1.0 if total <= budget else budget / total

        def texts() -> Iterator[str]:
            for u in units:
                ids = load_unit_meta(clean_dir, u.name)["ids"]
                removed = set(dedup["removed"][u.name])
                source = u.source
                for row, (doc_id, text) in enumerate(zip(ids, load_unit_texts(clean_dir, u.name), strict=True)):
                    if row in removed:
                        continue
                    u_split, u_sample = doc_draws(source, doc_id, self.cfg.seed)
                    if u_split < cfg.split.validation_fraction or u_sample >= keep_share:
                        continue
                    yield text

        tokenizer = train_bpe(texts(), vocab_size=cfg.tokenizer.vocab_size)
        tokenizer.save(str(path))
        sha = file_sha256(path)
        write_json_atomic(out / "done.json", {"fingerprint": fp, "sha256": sha})
        self.progress.advance()
        self.progress.finish()
        run.units_done = 1
        run.seconds = self.timing["tokenizer"] = time.perf_counter() - started
        return path, sha, cfg.tokenizer.vocab_size

    def tokenize(
        self,
        units: list[Unit],
        clean_stats: dict[str, dict[str, Any]],
        dedup: dict[str, Any],
        tokenizer_path: Path,
        tokenizer_sha: str,
        dtype: str,
    ) -> dict[str, dict[str, Any]]:
        out = self.stage_dir("tokenize")
        tasks, done = [], []
        for unit in units:
            fp = fingerprint(
                PIPELINE_VERSION, tokenizer_sha, dedup["fingerprint"], clean_stats[unit.name]["fingerprint"], dtype
            )
            stats = read_done(out / f"{unit.name}.json", fp)
            if stats is not None:
                done.append(stats)
            else:
                tasks.append(
                    TokenizeTask(
                        unit_name=unit.name,
                        clean_dir=str(self.work / "clean"),
                        removed_rows=tuple(dedup["removed"][unit.name]),
                        tokenizer_path=str(tokenizer_path),
                        dtype=dtype,
                        out_dir=str(out),
                        fingerprint=fp,
                    )
                )
        results = self.run_units("tokenize", tokenize_unit, tasks, done)
        by_name = {s["unit"]: s for s in results}
        return {u.name: by_name[u.name] for u in units}


def doc_draws(source: str, doc_id: str, seed: int) -> tuple[float, float]:
    """Two independent uniform draws in [0, 1) for a document, from its source and id alone:
    the first decides its split, the second its tokenizer-sample and share placement."""
    key = f"{source}\x00{doc_id}".encode()
    scale = float(1 << 64)
    return xxhash.xxh64_intdigest(key, seed=seed) / scale, xxhash.xxh64_intdigest(key, seed=seed + 1) / scale


def prepare(cfg: DataConfig, *, progress: StageProgress | None = None, fault: FaultHook | None = None) -> PrepareResult:
    """Run (or resume) the whole pipeline for `cfg`; return the manifest and report.

    Blocking; starts `cfg.workers` processes. Work already done with the same settings and
    inputs is reused (a finished directory is re-validated in seconds). `fault(stage, n)` is
    called after the n-th unit a stage completes in this run (tests inject interruptions
    with it). Raises `AtollError` for bad settings, missing inputs, or too much bad input;
    whatever completed before is kept for the next run.
    """
    run = _Run(cfg, progress or NullStageProgress(), fault)
    cfg.output.mkdir(parents=True, exist_ok=True)
    run.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        units = plan_units(cfg)
        logger.info("planned %d units from %d sources", len(units), len(cfg.sources))
        clean_stats = run.clean(units)
        dedup = run.dedup(units, clean_stats)
        tok_path, tok_sha, vocab_size = run.tokenizer(units, clean_stats, dedup)
        dtype = token_dtype(vocab_size)
        token_stats = run.tokenize(units, clean_stats, dedup, tok_path, tok_sha, dtype)
        manifest, pack_stats = pack_shards(
            cfg,
            units=units,
            work=run.work,
            dedup=dedup,
            token_stats=token_stats,
            tokenizer_path=tok_path,
            tokenizer_sha=tok_sha,
            vocab_size=vocab_size,
            dtype=numpy_dtype(dtype),
            progress=run.progress,
            fault=fault,
            draws=doc_draws,
        )
    finally:
        run.executor.close()
    run.stages["pack"] = StageRun(
        units_done=pack_stats["written"], units_skipped=pack_stats["skipped"], seconds=pack_stats["seconds"]
    )
    run.timing["pack"] = pack_stats["seconds"]
    report = build_report(
        cfg,
        units=units,
        clean_stats=clean_stats,
        dedup=dedup,
        token_stats=token_stats,
        manifest=manifest,
        timing=run.timing,
        total_seconds=time.perf_counter() - started,
    )
    write_report(cfg.output, report)
    write_manifest(cfg.output, manifest)
    logger.info(
        "prepared %s: %s", cfg.output, ", ".join(f"{n} {s.num_tokens:,} tokens" for n, s in manifest.splits.items())
    )
    return PrepareResult(manifest=manifest, report=report, stages=run.stages)
