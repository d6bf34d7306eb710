"""Outer-optimizer sweep at the WAN benchmark's settings: validation loss at equal tokens vs DDP.

    .venv/bin/python bench/outer_sweep.py                 # the sweep (resumable: --resume)
    .venv/bin/python bench/outer_sweep.py --only ddp diloco-n0.7-0.9 --seeds 0 1

Every run trains the WAN benchmark's model and data (`bench/wan.py`'s defaults: the demo preset,
16 rounds of H = 32 inner steps of 2 x 128 tokens per site, two sites) with the WAN switched off
(`--wan none`): the loss of the DiLoCo family does not depend on the link, since every strategy
applies an exchange at a fixed step (diloco at once, streaming tau steps later, delayed one round
later), so the sweep runs at compute speed and its losses are those of the WAN grid. Each config
is a name and the `sync.*` settings it overrides on top of `examples/configs/demo.yaml`;
`ddp` is the reference. Results: `bench/results/outer_sweep.{json,md}`, one record per (config,
seed), written as each run ends.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from wan import RESULTS, Bench, build_parser, resolve, run_atoll, summarize, write_topology  # noqa: E402

# name -> the overrides it runs with (a bare key is a sync.* setting, a dotted one is given as is);
# n<lr>-<m>: Nesterov outer SGD; avg<lr>: averaging (no momentum) at outer lr <lr> (1 when absent).
_AVG = {"outer_momentum": 0.0, "nesterov": False}
CONFIGS: dict[str, dict[str, Any]] = {
    "ddp": {"strategy": "ddp", "codec": "none"},
    "ddp-lr1e-3": {"strategy": "ddp", "codec": "none", "train.lr": 0.001},
    "ddp-lr3e-3": {"strategy": "ddp", "codec": "none", "train.lr": 0.003},
    "diloco-avg": {"strategy": "diloco", "outer_lr": 1.0, **_AVG},
    "diloco-avg0.6": {"strategy": "diloco", "outer_lr": 0.6, **_AVG},
    "diloco-avg0.8": {"strategy": "diloco", "outer_lr": 0.8, **_AVG},
    "diloco-avg1.3": {"strategy": "diloco", "outer_lr": 1.3, **_AVG},
    "diloco-avg-lr1e-3": {"strategy": "diloco", "outer_lr": 1.0, **_AVG, "train.lr": 0.001},
    "diloco-avg0.8-lr1e-3": {"strategy": "diloco", "outer_lr": 0.8, **_AVG, "train.lr": 0.001},
    "diloco-avg-lr3e-3": {"strategy": "diloco", "outer_lr": 1.0, **_AVG, "train.lr": 0.003},
    "diloco-n0.7-0.9": {"strategy": "diloco", "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True},
    "diloco-n0.5-0.9": {"strategy": "diloco", "outer_lr": 0.5, "outer_momentum": 0.9, "nesterov": True},
    "diloco-n1.0-0.5": {"strategy": "diloco", "outer_lr": 1.0, "outer_momentum": 0.5, "nesterov": True},
    "diloco-n0.8-0.7": {"strategy": "diloco", "outer_lr": 0.8, "outer_momentum": 0.7, "nesterov": True},
    "diloco-n0.4-0.8": {"strategy": "diloco", "outer_lr": 0.4, "outer_momentum": 0.8, "nesterov": True},
    "streaming-topk-avg": {
        "strategy": "streaming",
        "codec": "topk",
        "fragments": 4,
        "overlap_steps": 2,
        "outer_lr": 1.0,
        **_AVG,
    },
    # Low-rank deltas (DiLoCoX's compression): rank 4 sends 46x less than fp32 on the demo model.
    "diloco-lowrank4-avg0.6": {"strategy": "diloco", "codec": "lowrank", "rank": 4, "outer_lr": 0.6, **_AVG},
    "diloco-lowrank2-avg0.6": {"strategy": "diloco", "codec": "lowrank", "rank": 2, "outer_lr": 0.6, **_AVG},
    "diloco-lowrank8-avg0.6": {"strategy": "diloco", "codec": "lowrank", "rank": 8, "outer_lr": 0.6, **_AVG},
    # rank 8 with bf16 factors: the bytes of rank 4 in fp32 (744x against the bf16 DDP at H = 32).
    "diloco-lowrank8-bf16-avg0.6": {
        "strategy": "diloco",
        "codec": "lowrank",
        "rank": 8,
        "value_dtype": "bf16",
        "outer_lr": 0.6,
        **_AVG,
    },
    "diloco-lowrank8-bf16-avg1.0": {
        "strategy": "diloco",
        "codec": "lowrank",
        "rank": 8,
        "value_dtype": "bf16",
        "outer_lr": 1.0,
        **_AVG,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=None, help="run these configs only (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME:KEY=VALUE,...", help="extra configs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--resume", action="store_true", help="keep the records already in OUT/outer_sweep.json")
    args = ap.parse_args()
    configs = dict(CONFIGS)
    for spec in args.set:
        name, _, kvs = spec.partition(":")
        configs[name] = {k: yaml_value(v) for k, v in (kv.split("=", 1) for kv in kvs.split(","))}
    names = args.only or list(configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {sorted(configs)} (add one with --set)")
    out = args.out / "outer_sweep.json"
    records: list[dict[str, Any]] = []
    if args.resume and out.exists():
        records = json.loads(out.read_text())["records"]
    wan_args = resolve(build_parser().parse_args(["--no-torchft"]))
    with tempfile.TemporaryDirectory(prefix="atoll-outer-sweep-") as tmp_s:
        tmp = Path(tmp_s)
        bench = Bench(wan_args, tmp)
        flat = tmp / "flat.yaml"
        write_topology(flat, mbps=10_000, latency_ms=0)
        for seed in args.seeds:
            for name in names:
                if any(r["config"] == name and r["seed"] == seed for r in records):
                    continue
                sync = configs[name]
                run = f"{name}-s{seed}"
                cmd = [*bench.common(seed), "--topology", str(flat), "--wan", "none", f"--run.name={run}"]
                # a bare key is a sync.* setting; a dotted one (train.lr) is given as it is
                cmd += [
                    f"--{k if '.' in k else 'sync.' + k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in sync.items()
                ]
                t0 = time.perf_counter()
                run_atoll(cmd, lab=False)
                s = summarize(tmp / run)
                rec = {
                    "config": name,
                    "seed": seed,
                    "sync": sync,
                    "rounds": wan_args.rounds,
                    "inner_steps": wan_args.inner_steps,
                    "tokens": s["tokens"],
                    "val_loss": s["val_loss"],
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "command": "atoll train " + " ".join(cmd[:1] + cmd[3:]),
                }
                records.append(rec)
                write(records, args.out, wan_args)
                print(f"{name:24s} seed {seed}: val {rec['val_loss']:.4f} ({rec['wall_s']:.0f} s)", flush=True)
    write(records, args.out, wan_args)


def yaml_value(v: str) -> Any:
    import yaml

    return yaml.safe_load(v)


def _lr(record: dict[str, Any]) -> Any:
    """The inner learning rate a record overrides (None: the config's)."""
    return record["sync"].get("train.lr")


def write(records: list[dict[str, Any]], out_dir: Path, wan_args: argparse.Namespace) -> None:
    """OUT/outer_sweep.{json,md}: every record, and each config's mean against DDP at the same
    inner learning rate (like for like: a config that changes train.lr meets a DDP run with it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["config"], []).append(r)
    ddp = {
        _lr(runs[0]): statistics.mean(r["val_loss"] for r in runs)
        for runs in by.values()
        if runs[0]["sync"].get("strategy") == "ddp"
    }
    rows = []
    for name, runs in by.items():
        mean = statistics.mean(r["val_loss"] for r in runs)
        base = ddp.get(_lr(runs[0]))
        rows.append(
            {
                "config": name,
                "sync": runs[0]["sync"],
                "seeds": len(runs),
                "val_loss": mean,
                "ddp_val_loss": base,
                "vs_ddp": None if base is None else mean / base - 1,
            }
        )
    rows.sort(key=lambda r: (r["vs_ddp"] is None, r["vs_ddp"] or 0.0))
    settings = {k: getattr(wan_args, k) for k in ("rounds", "inner_steps", "steps", "batch", "seq_len", "preset")}
    (out_dir / "outer_sweep.json").write_text(
        json.dumps({"settings": settings, "summary": rows, "records": records}, indent=1) + "\n"
    )
    lines = [
        "# Outer-optimizer sweep (validation loss at equal tokens, `--wan none`)",
        "",
        f"Settings: {settings}; two sites. Command: `python bench/outer_sweep.py` (configs in the script, others",
        "with `--set`); each run's command in outer_sweep.json. Each row against DDP at the same inner lr.",
        "",
        "| config | sync and train overrides | seeds | val loss (mean) | DDP | vs DDP |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        gap = "" if r["vs_ddp"] is None else f"{r['vs_ddp']:+.2%}"
        base = "" if r["ddp_val_loss"] is None else f"{r['ddp_val_loss']:.4f}"
        sync = ", ".join(f"{k}={v}" for k, v in r["sync"].items())
        lines.append(f"| {r['config']} | {sync} | {r['seeds']} | {r['val_loss']:.4f} | {base} | {gap} |")
    (out_dir / "outer_sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
