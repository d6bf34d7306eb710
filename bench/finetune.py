"""The demo chain, general -> networking (LoRA) -> netlink (LoRA), and its evaluation.

    .venv/bin/python bench/finetune.py [--threads N] [--max-tokens 30000]

Runs the commands of `make finetune-demo` through the real CLI (atoll train, atoll finetune,
atoll eval), skipping a stage whose run already finished, then scores every stage on three
held-out sets: general English (the validation split of the Shakespeare demo corpus), networking
and netlink (the documents each fine-tuning stage held out; `atoll eval` checks by hash that no
stage of the chain trained on any of them). The domain corpora come from Debian's linux-doc-6.1.
The chain's LoRA stages replay 30% of their parent's training rows (`data.replay` in the
examples); the same chain runs again without replay (`--data.replay.share=0`, same seeds and
settings otherwise) into runs/chain/*-noreplay. Writes bench/results/finetune.json (`stages`:
the chain with replay, `baseline_no_replay`: without, same fields; `forgetting`: the ratios
issue 14 sets targets for; the `command`), finetune.md and finetune.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atoll.eval.report import markdown_table  # noqa: E402
from atoll.train.checkpoint import latest_checkpoint  # noqa: E402

RESULTS = REPO / "bench" / "results"
EXAMPLES = REPO / "examples" / "finetune"
RUNS = REPO / "runs" / "chain"
LINUX_DOC = Path("/usr/share/doc/linux-doc-6.1/Documentation/networking")
STAGES = [
    ("general", ["train", "examples/finetune/general.yaml"]),
    ("networking", ["finetune", "examples/finetune/networking.yaml"]),
    ("netlink", ["finetune", "examples/finetune/netlink.yaml"]),
]
# The same chain without replay: the general stage is shared; nothing else differs.
NO_REPLAY = ["--data.replay.share=0"]
BASELINE_STAGES = [
    (
        "networking-noreplay",
        ["finetune", "examples/finetune/networking.yaml", "--run.name=networking-noreplay", *NO_REPLAY],
    ),
    (
        "netlink-noreplay",
        [
            "finetune",
            "examples/finetune/netlink.yaml",
            "--run.name=netlink-noreplay",
            "--finetune.parent=runs/chain/networking-noreplay",
            *NO_REPLAY,
        ],
    ),
]
# Issue 14: after the chain, general perplexity within 1.25x of the general stage, and at least
# 80% of the netlink log-perplexity gain the chain makes without replay.
MAX_GENERAL_RATIO = 1.25
MIN_GAIN_RATIO = 0.8


def training_seconds(stage: str) -> float | None:
    """The stage's own record of its training time (last `wall_seconds` in metrics.jsonl), so a
    stage run before this script (or beside another) still has its time in the results."""
    path = RUNS / stage / "metrics.jsonl"
    if not path.is_file():
        return None
    found = [json.loads(line).get("wall_seconds") for line in path.read_text().splitlines() if line.strip()]
    times = [t for t in found if t is not None]
    return round(times[-1], 1) if times else None


def forgetting(stages: list[dict], baseline: list[dict]) -> dict[str, float | bool]:
    """The ratios of issue 14 from the first and last stage of each chain."""
    first, last, last_base = stages[0], stages[-1], baseline[-1]
    gain = math.log(first["ppl"]["netlink"]) - math.log(last["ppl"]["netlink"])
    gain_base = math.log(first["ppl"]["netlink"]) - math.log(last_base["ppl"]["netlink"])
    general_ratio = last["ppl"]["general"] / first["ppl"]["general"]
    out: dict[str, float | bool] = {
        "general_ppl_ratio": round(general_ratio, 4),
        "general_ppl_ratio_no_replay": round(last_base["ppl"]["general"] / first["ppl"]["general"], 4),
        "netlink_log_ppl_gain": round(gain, 4),
        "netlink_log_ppl_gain_no_replay": round(gain_base, 4),
        "netlink_gain_ratio": round(gain / gain_base, 4),
    }
    out["meets_targets"] = general_ratio <= MAX_GENERAL_RATIO and gain / gain_base >= MIN_GAIN_RATIO
    return out


def atoll_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "atoll.cli", *args]


def finished(stage: str) -> bool:
    run = RUNS / stage
    lineage = run / "lineage.json"
    if lineage.is_file():
        return bool(json.loads(lineage.read_text())["status"] == "finished")
    ckpt = latest_checkpoint(run)
    return ckpt is not None and ckpt.step >= 300


def run(args: list[str]) -> float:
    print("$ atoll " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=str(REPO / "src"))
    t0 = time.perf_counter()
    subprocess.run(atoll_cmd(args), check=True, cwd=REPO, env=env)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per process (0: atoll's default; 1 on a busy shared machine)",
    )
    parser.add_argument("--max-tokens", type=int, default=30_000, help="tokens scored per held-out set")
    args = parser.parse_args()
    if not LINUX_DOC.is_dir():
        sys.exit(f"{LINUX_DOC} is missing: install Debian's linux-doc-6.1 (apt-get install -y linux-doc-6.1)")
    threads = [f"--parallel.threads={args.threads}"] if args.threads else []
    commands, seconds = [], {}
    for stage, cmd in [*STAGES, *BASELINE_STAGES]:
        full = [*cmd, *threads]
        commands.append("atoll " + " ".join(cmd))
        if finished(stage):
            print(f"stage {stage}: already finished in {RUNS / stage}", flush=True)
            continue
        seconds[stage] = run(full)
    out_json, out_png = RESULTS / "finetune.json", RESULTS / "finetune.png"
    eval_args = ["eval", *(str(RUNS.relative_to(REPO) / s) for s, _ in [*STAGES, *BASELINE_STAGES])]
    eval_args += [
        "--data",
        "general=runs/data/demo",
        "--data",
        "networking=runs/chain/networking",
        "--data",
        "netlink=runs/chain/netlink",
    ]
    eval_args += [
        "--max-tokens",
        str(args.max_tokens),
        "--json",
        str(out_json.relative_to(REPO)),
        "--plot",
        str(out_png.relative_to(REPO)),
    ]
    if args.threads:
        eval_args += ["--threads", str(args.threads)]
    seconds["eval"] = run(eval_args)
    commands.append("atoll " + " ".join(shlex.quote(a) for a in eval_args))
    results = json.loads(out_json.read_text())
    by_name = {rec["stage"]: rec for rec in results["stages"]}
    results["stages"] = [by_name[s] for s, _ in STAGES]
    results["baseline_no_replay"] = [by_name[STAGES[0][0]], *(by_name[s] for s, _ in BASELINE_STAGES)]
    results["forgetting"] = forgetting(results["stages"], results["baseline_no_replay"])
    results["eval_command"] = results["command"]
    results["command"] = "python bench/finetune.py " + " ".join(sys.argv[1:])
    results["commands"] = commands
    results["wall_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    results["training_seconds"] = {s: training_seconds(s) for s, _ in [*STAGES, *BASELINE_STAGES]}
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    md = [
        "# Demo chain: general -> networking (LoRA) -> netlink (LoRA)",
        "",
        f"`{results['command']}`; each stage's command:",
        "",
    ]
    md += [f"    {c}" for c in commands]
    md += [
        "",
        "Perplexity on held-out sets (lower is better); "
        "every set was checked by hash against the training documents of every stage.",
        "",
        "With replay (`data.replay.share: 0.3` in each LoRA stage, the recommended chain):",
        "",
        markdown_table(results),
        "Without replay (`--data.replay.share=0`, same seeds and settings otherwise):",
        "",
        markdown_table({**results, "stages": results["baseline_no_replay"]}),
        "Forgetting (issue 14 targets: general ratio <= 1.25, netlink gain ratio >= 0.8):",
        "",
        *(f"- {k}: {v}" for k, v in results["forgetting"].items()),
        "",
    ]
    (RESULTS / "finetune.md").write_text("\n".join(md))
    print(markdown_table(results))
    print(json.dumps(results["forgetting"], indent=1))


if __name__ == "__main__":
    main()
