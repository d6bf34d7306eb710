"""Throughput of the demo model at 1 and 2 ranks, and its model-FLOP utilization (MFU).

    .venv/bin/python bench/throughput.py [--steps 40] [--ranks 1 2]

Each configuration is a real `atoll train` run (the CLI, the trainer, DDP on gloo) on the demo
corpus, with the same global batch. Tokens/s is the median over steps after a warm-up. MFU is
model FLOPs per second (6N + 12·L·H·Q·T per token, see atoll.planner.cost) divided by this
machine's fp32 matmul peak, measured here with all cores on square matmuls.
Writes bench/results/throughput.json (a list of records) and throughput.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atoll.config import RunConfig, load_config  # noqa: E402
from atoll.hardware.measure import matmul_peak_flops  # noqa: E402
from atoll.model import get_preset  # noqa: E402
from atoll.planner.cost import training_flops_per_token  # noqa: E402
from atoll.report.metrics import read_metrics  # noqa: E402

RESULTS = REPO / "bench" / "results"
CONFIG = REPO / "examples" / "configs" / "demo.yaml"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run_config(ranks: int, *, steps: int, warmup: int, workdir: Path) -> dict[str, object]:
    args = [
        "train",
        str(CONFIG),
        "--nproc",
        str(ranks),
        "--no-progress",
        f"--run.dir={workdir}",
        f"--run.name=r{ranks}",
        f"--train.steps={steps}",
        "--train.warmup_steps=2",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--train.checkpoint_every=0",
        "--train.micro_batch=8" if ranks == 1 else "--train.micro_batch=4",
    ]
    cmd = [str(REPO / ".venv" / "bin" / "atoll"), *args]
    env = dict(os.environ, ATOLL_NO_PROGRESS="1")
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    records = [r for r in read_metrics(workdir / f"r{ranks}") if "tokens_per_s" in r]
    speeds = [r["tokens_per_s"] for r in records if r["step"] > warmup]
    return {
        "tokens_per_s": statistics.median(speeds),
        "steps_measured": len(speeds),
        "command": "atoll " + shlex.join(args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    cfg: RunConfig = load_config(RunConfig, CONFIG)
    cores = os.cpu_count() or 1
    peak = matmul_peak_flops(threads=cores)
    mcfg = get_preset(cfg.model.preset or "demo")
    flops_per_token = training_flops_per_token(mcfg, seq_len=cfg.data.seq_len)
    device = f"{cpu_name()} ({cores} cores, fp32)"
    date = dt.date.today().isoformat()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            res = run_config(ranks, steps=args.steps, warmup=args.warmup, workdir=Path(tmp))
            tps = float(res["tokens_per_s"])  # type: ignore[arg-type]
            records.append(
                {
                    "model": cfg.model.preset,
                    "params": mcfg.num_params(),
                    "ranks": ranks,
                    "tokens_per_s": round(tps, 1),
                    "mfu": round(tps * flops_per_token / peak, 4),
                    "model_flops_per_token": flops_per_token,
                    "peak_flops": round(peak),
                    "global_batch": cfg.train.global_batch,
                    "seq_len": cfg.data.seq_len,
                    "steps_measured": res["steps_measured"],
                    "device": device,
                    "date": date,
                    "command": f"{res['command']}  (via: .venv/bin/python bench/throughput.py --steps {args.steps})",
                }
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(records, indent=1) + "\n")
    lines = [
        "# Throughput of the demo model",
        "",
        f"{date}, {device}; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (all cores, 1024² matmul).",
        f"Model FLOPs per token: {flops_per_token / 1e6:.1f} M (6N + 12·L·H·Q·T, N incl. the output head).",
        "",
        "| model | ranks | tokens/s | MFU |",
        "|---|---|---|---|",
        *[f"| {r['model']} | {r['ranks']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} |" for r in records],
        "",
        f"Produced by `.venv/bin/python bench/throughput.py --steps {args.steps}`.",
    ]
    (RESULTS / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
