"""The data report: what went in, what each filter removed, duplicates, what came out.

`build_report` assembles it from the stages' statistics (a JSON-serializable dict, written to
`report.json` beside the manifest); `report_tables` turns it into titled rows that the CLI
prints with rich and `render_markdown` writes as `report.md`. A data directory without
report.json (prepared by the demo path) still gets the output part, from its manifest.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from atoll.data.config import DataConfig
from atoll.data.manifest import Manifest
from atoll.data.readers import Unit
from atoll.data.stages import write_json_atomic

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
Table = tuple[str, list[str], list[list[str]]]  # title, header, rows


def _mb(num_bytes: int) -> float:
    return round(num_bytes / 1e6, 3)


def output_section(manifest: Manifest) -> dict[str, Any]:
    """Tokens, documents and shards per split and per site, from a manifest alone."""
    splits = {
        name: {"documents": s.num_documents, "tokens": s.num_tokens, "shards": len(s.shards)}
        for name, s in manifest.splits.items()
    }
    sites: dict[str, dict[str, int]] = {}
    for site in manifest.sites:
        sites[site] = {name: sum(s.num_tokens for s in manifest.site_shards(name, site)) for name in manifest.splits}
    sources = {}
    for name, split in manifest.splits.items():
        for src, mix in split.sources.items():
            sources.setdefault(src, {})[name] = mix.get("tokens", 0)
    languages = {}
    for name, split in manifest.splits.items():
        for lang, mix in split.languages.items():
            languages.setdefault(lang, {})[name] = mix.get("tokens", 0)
    return {
        "splits": splits,
        "sites": sites,
        "sources": sources,
        "languages": languages,
        "placement": manifest.placement,
        "vocab_size": manifest.vocab_size,
        "dtype": manifest.dtype,
    }


def build_report(
    cfg: DataConfig,
    *,
    units: list[Unit],
    clean_stats: dict[str, dict[str, Any]],
    dedup: dict[str, Any],
    token_stats: dict[str, dict[str, Any]],
    manifest: Manifest,
    timing: dict[str, float],
    total_seconds: float,
) -> dict[str, Any]:
    """The report of a finished preparation (see the module docstring)."""
    by_source: dict[str, Counter[str]] = {s.name: Counter() for s in cfg.sources}
    removed: dict[str, Counter[str]] = {}
    lines: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    cpu: Counter[str] = Counter()
    samples: list[str] = []
    for u in units:
        st = clean_stats[u.name]
        src = by_source[u.source]
        src["documents"] += st["records"]
        src["bytes"] += st["bytes_in"]
        src["errors"] += st["errors"]
        src["kept"] += st["docs_out"]
        src["bytes_kept"] += st["bytes_out"]
        for reason, (docs, size) in st["removed"].items():
            removed.setdefault(reason, Counter()).update({"documents": docs, "bytes": size})
        lines.update(st["lines_removed"])
        pii.update(st["pii"])
        languages.update(st["languages"])
        for k, v in st["seconds"].items():
            cpu[f"clean.{k}"] += v
        samples.extend(f"{u.source}: {x}" for x in st["error_samples"])
    for st in token_stats.values():
        for k, v in st["seconds"].items():
            cpu[f"tokenize.{k}"] += v
    dedup_removed_docs = dedup["exact"] + dedup["near"]
    return {
        "output_dir": str(cfg.output),
        "inputs": {
            "documents": sum(c["documents"] for c in by_source.values()),
            "mb": _mb(sum(c["bytes"] for c in by_source.values())),
            "errors": sum(c["errors"] for c in by_source.values()),
            "error_samples": samples[:10],
            "by_source": {
                name: {
                    "documents": c["documents"],
                    "mb": _mb(c["bytes"]),
                    "errors": c["errors"],
                    "kept_after_filters": c["kept"],
                }
                for name, c in by_source.items()
            },
        },
        "cleaning": {
            "pii_replaced": dict(sorted(pii.items())),
            "lines_removed": dict(sorted(lines.items())),
            "languages_seen": dict(languages.most_common()),
        },
        "filters": {
            reason: {"documents": c["documents"], "mb": _mb(c["bytes"])}
            for reason, c in sorted(removed.items(), key=lambda kv: -kv[1]["documents"])
        },
        "dedup": {
            "documents_in": dedup["documents"],
            "exact": dedup["exact"],
            "near": dedup["near"],
            "kept": dedup["documents"] - dedup_removed_docs,
            "threshold": cfg.dedup.near.threshold,
            "examples": dedup["examples"],
        },
        "output": output_section(manifest),
        "timing": {
            "stages_seconds": {k: round(v, 3) for k, v in timing.items()},
            "cpu_seconds": {k: round(v, 3) for k, v in sorted(cpu.items())},
            "total_seconds": round(total_seconds, 3),
            "workers": cfg.workers,
        },
    }


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Write report.json and report.md into `out_dir`."""
    write_json_atomic(out_dir / REPORT_JSON, report)
    (out_dir / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")


def load_report(data_dir: Path) -> dict[str, Any]:
    """The report of a data directory: report.json when present, else the output part
    rebuilt from the manifest. Raises `AtollError` (via `Manifest.load`) without either."""
    path = data_dir / REPORT_JSON
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"output_dir": str(data_dir), "output": output_section(Manifest.load(data_dir))}


def report_tables(report: dict[str, Any]) -> list[Table]:
    """The report as titled tables of strings, in reading order."""
    tables: list[Table] = []
    inputs = report.get("inputs")
    if inputs:
        rows = [
            [name, f"{c['documents']:,}", f"{c['mb']:.2f}", f"{c['errors']:,}", f"{c['kept_after_filters']:,}"]
            for name, c in inputs["by_source"].items()
        ]
        rows.append(["total", f"{inputs['documents']:,}", f"{inputs['mb']:.2f}", f"{inputs['errors']:,}", ""])
        tables.append(("Input", ["source", "documents", "MB", "unreadable", "kept by filters"], rows))
    filters = report.get("filters")
    if filters is not None:
        rows = [[reason, f"{c['documents']:,}", f"{c['mb']:.2f}"] for reason, c in filters.items()] or [
            ["(none)", "0", "0"]
        ]
        tables.append(("Removed by filters", ["filter", "documents", "MB"], rows))
    cleaning = report.get("cleaning")
    if cleaning:
        rows = [[f"PII {k}", f"{v:,}"] for k, v in cleaning["pii_replaced"].items()]
        rows += [[f"line rule {k}", f"{v:,}"] for k, v in cleaning["lines_removed"].items()]
        rows += [[f"language {k}", f"{v:,}"] for k, v in cleaning["languages_seen"].items()]
        tables.append(("Cleaning (replacements, lines dropped, documents by language)", ["what", "count"], rows))
    dedup = report.get("dedup")
    if dedup:
        rows = [
            ["documents in", f"{dedup['documents_in']:,}"],
            ["exact duplicates", f"{dedup['exact']:,}"],
            [f"near duplicates (Jaccard >= {dedup['threshold']})", f"{dedup['near']:,}"],
            ["kept", f"{dedup['kept']:,}"],
        ]
        tables.append(("Deduplication", ["", "documents"], rows))
        if dedup["examples"]:
            rows = [
                [e["kind"], f"{e['similarity']:.2f}", e["removed"]["id"], e["kept"]["id"]] for e in dedup["examples"]
            ]
            tables.append(("Duplicate examples", ["kind", "similarity", "removed", "kept (earlier)"], rows))
    out = report["output"]
    rows = [[name, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['shards']:,}"] for name, s in out["splits"].items()]
    tables.append(
        (f"Output (vocab {out['vocab_size']:,}, {out['dtype']})", ["split", "documents", "tokens", "shards"], rows)
    )
    if out["sites"]:
        names = list(out["splits"])
        rows = [[site, *[f"{tokens.get(n, 0):,}" for n in names]] for site, tokens in out["sites"].items()]
        tables.append((f"Tokens per site (placement {out['placement']})", ["site", *names], rows))
    if out["sources"]:
        names = list(out["splits"])
        rows = [[src, *[f"{tokens.get(n, 0):,}" for n in names]] for src, tokens in out["sources"].items()]
        tables.append(("Tokens per source", ["source", *names], rows))
    timing = report.get("timing")
    if timing:
        rows = [[k, f"{v:.2f}"] for k, v in timing["stages_seconds"].items()] + [
            ["total", f"{timing['total_seconds']:.2f}"]
        ]
        tables.append(
            (
                f"Wall time this run, seconds ({timing['workers']} workers; resumed stages take ~0)",
                ["stage", "seconds"],
                rows,
            )
        )
    return tables


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown document (tables, then error samples)."""
    parts = [f"# Data report: {report.get('output_dir', '')}", ""]
    for title, header, rows in report_tables(report):
        parts += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        parts += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        parts.append("")
    samples = report.get("inputs", {}).get("error_samples")
    if samples:
        parts += ["## Unreadable input (samples)", ""] + [f"- {s}" for s in samples] + [""]
    return "\n".join(parts)
