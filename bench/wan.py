"""Multi-site training over a slow WAN: atoll's strategies and codecs against DDP and torchft's DiLoCo.

    .venv/bin/python bench/wan.py                          # the full grid: ~90 min on 2 quiet cores
    .venv/bin/python bench/wan.py --resume                 # continue an interrupted grid where it stopped
    .venv/bin/python bench/wan.py --scenario intellect-1   # the second published scenario (another R)
    .venv/bin/python bench/wan.py --quick                  # one tiny record per kind (~5 min), to /tmp

Every run trains on the Shakespeare corpus on two sites, with per-site data streams and the same
token budget: `--rounds` outer rounds (at least 16) of H = `--inner-steps` inner steps of
`--batch` sequences of `--seq-len` tokens, on the `--preset` model. The scenario fixes the ratio
R = (seconds to send the model once at the scenario's exchange width) / (seconds of compute per
inner step); the scenario records that width, `exchange_bytes_per_param` (2 for the DiLoCoX-like
bf16 exchange, 1 for INTELLECT-1's int8 all-reduce), and the lab's link is scaled so that the lab
model *at that width* takes R inner steps to send. atoll's `none` codec sends fp32 (twice the
bf16 scenario's bytes); its int8/int4 codecs send about 1 and 0.5 bytes per parameter. With root,
sites run in network namespaces behind tbf-shaped veths (lab mode "netns"); otherwise the
transport emulates the link ("emulated").

`ddp` exchanges the whole gradient every step: at this R it would take hours, so its loss comes
from a run with the WAN switched off, and its bytes and exchange time from a short probe on the
real link, both scaled from the fp32 gradient the probe sends to the scenario's width (the
gradient a real deployment would all-reduce); its wall-clock is the run's compute time plus the
steps times that exchange time (marked extrapolated). Every "x fewer bytes" is against it.

Seeds: the whole grid runs with the first of `--seeds`; then, with each further seed, DDP, the
atoll run that met the most targets (the best), both like-for-like pairs and the torchft peers
run again. The table shows each row's mean and its spread (half the range) over its seeds; every
record carries `seed` and `rounds`.

The like-for-like pairs: torchft's plain DiLoCo against atoll's `diloco` (fp32), and torchft's
streaming DiLoCo against atoll's `streaming` with the same fragments, tau (overlap steps), H and
codec (fp32: torchft quantizes only on CUDA); bench/torchft_peer.py runs torchft.

How the default grid is sized for about 90 minutes on 2 cores: 16 rounds of H = 32 are 512
inner steps of 2 x 128 tokens on the demo preset (~5M parameters); an fp32 exchange at R = 53
costs 2R = 106 inner steps, an int8 one ~28, int4 ~15, topk and lowrank ~2; the fp32 pairs are
most of the grid's time. Measured on 2 quiet cores (2026-12-07): 0.162 s per inner step, the 14
runs of the first seed (codecs none, int8, int4, topk) and the 6 repeats took 87 minutes; the
lowrank runs (rank 4 in fp32, rank 8 in bf16: 6 runs and 2 repeats) were added later with
`--resume` (~13 minutes). `--plan-only` prints the prediction for the machine at hand.
Why topk and lowrank are in the grid: at H = 32 a round exchanges once per 32 steps, so a codec
saves 32 x 2 / (its bytes per parameter) against bf16 DDP: int4 (0.56 B) 120x, topk at 1%
(~0.08 B) ~800x, lowrank at rank 4 (~0.087 B on the demo model) ~740x; only the sparse and
low-rank codecs meet the 500x target at 16 rounds of a grid this size.

Writes OUT/wan.json, wan.md, wan_runs.json (every record with its curves: `--resume` reads it)
and the loss plots (OUT defaults to bench/results; `--quick` defaults to /tmp/atoll-wan-quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from wan_report import check_targets, write_results  # noqa: E402

from atoll.config import RunConfig, load_config  # noqa: E402
from atoll.data import prepare_demo_data  # noqa: E402
from atoll.lab.emulate import DEFAULT_SCENARIO, SCENARIOS, get_scenario  # noqa: E402
from atoll.lab.netns import lab_available  # noqa: E402
from atoll.report.metrics import read_metrics  # noqa: E402

RESULTS = REPO / "bench" / "results"
QUICK_OUT = Path(tempfile.gettempdir()) / "atoll-wan-quick"
CONFIG = REPO / "examples" / "configs" / "demo.yaml"
ATOLL = [sys.executable, "-m", "atoll.cli"]
SITES = ("east", "west")
MIN_ROUNDS = 16
# Bytes per parameter each codec puts on the WAN (int8/int4: plus a scale per 64-element block).
# topk: 1% of the entries, a 4-byte value and a 2- or 4-byte index each; lowrank: rank 4's
# factors on the demo model (codec_specs.lowrank_bytes over its shapes: 455,680 B for 5.25M).
CODEC_WIDTH = {
    "none": 4.0,
    "int8": 1.0 + 4 / 64,
    "int4": 0.5 + 4 / 64,
    "topk": 0.01 * 8,
    "lowrank": 0.087,
    "lowrank8-bf16": 0.086,
}
# A grid codec that is a codec with options: its name in the records -> the sync settings it runs.
CODEC_VARIANTS = {"lowrank8-bf16": {"codec": "lowrank", "rank": 8, "value_dtype": "bf16"}}


def codec_flags(codec: str) -> list[str]:
    """The `--sync.*` flags of a grid codec (a plain codec name, or one of `CODEC_VARIANTS`)."""
    return [f"--sync.{k}={v}" for k, v in CODEC_VARIANTS.get(codec, {"codec": codec}).items()]


def write_topology(path: Path, *, mbps: float, latency_ms: float) -> None:
    topo = {
        "name": "bench-two-sites",
        "sites": [{"name": s, "devices": [{"kind": "cpu", "count": 1, "per_node": 1}]} for s in SITES],
        "links": [{"site": s, "uplink_mbps": round(mbps, 3), "latency_ms": latency_ms} for s in SITES],
        "lighthouse": {"site": SITES[0]},
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))


def run_atoll(args: list[str], *, lab: bool) -> None:
    verb = ["lab", "run"] if lab else ["train"]
    env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]))
    proc = subprocess.run([*ATOLL, *verb, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run failed: atoll {' '.join(verb + args)}")


def site_records(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {s: read_metrics(run_dir / "sites" / s) for s in SITES}


def summarize(run_dir: Path) -> dict[str, Any]:
    """Validation loss at the end, wall-clock, WAN bytes, per-site utilization and curves."""
    recs = site_records(run_dir)
    out: dict[str, Any] = {"per_site": {}}
    vals, walls, sent, utils = [], [], 0, []
    curves = {}
    for site, rows in recs.items():
        train = [r for r in rows if "loss" in r]
        last = train[-1]
        val = [r["val_loss"] for r in rows if "val_loss" in r]
        vals.append(val[-1])
        walls.append(last.get("wall_seconds", 0.0))
        sent += int(last.get("wan_bytes_sent", 0))
        utils.append(last.get("compute_utilization", 0.0))
        out["per_site"][site] = {
            "val_loss": val[-1],
            "wall_s": last.get("wall_seconds"),
            "compute_utilization": last.get("compute_utilization"),
            "wan_bytes_sent": last.get("wan_bytes_sent"),
            "steps": last["step"],
        }
        curves[site] = [(r.get("wall_seconds", 0.0), r["tokens_seen"], r["loss"]) for r in train]
    out.update(
        val_loss=statistics.mean(vals),
        wall_s=max(walls),
        wan_bytes=sent,
        compute_utilization=statistics.mean(utils),
        tokens=sum(r[-1][1] for r in curves.values()),
        curves=curves,
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (bench/planner.py reads a result's settings back with it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scenario",
        default=DEFAULT_SCENARIO,
        choices=sorted(SCENARIOS),
        help="named scenario fixing the ratio R and the exchange width (atoll.lab.emulate.SCENARIOS)",
    )
    ap.add_argument("--rounds", type=int, default=MIN_ROUNDS, help=f"outer rounds per run (at least {MIN_ROUNDS})")
    ap.add_argument("--steps", type=int, default=None, help="inner steps per site (default: rounds x H)")
    ap.add_argument("--inner-steps", type=int, default=32, help="H for the DiLoCo family (divisible by --fragments)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per inner step per site")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--preset", default="demo", help="model preset (atoll.model presets)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="run seeds (the grid runs with the first)")
    ap.add_argument("--strategies", nargs="+", default=["ddp", "diloco", "streaming", "delayed"])
    ap.add_argument("--codecs", nargs="+", default=["none", "int8", "int4", "topk", "lowrank", "lowrank8-bf16"])
    ap.add_argument("--no-torchft", action="store_true", help="skip torchft's DiLoCo and streaming DiLoCo")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=["delayed-none"],
        metavar="STRATEGY-CODEC",
        help="leave out these combinations (default: delayed-none, an fp32 row no pair needs)",
    )
    ap.add_argument("--fragments", type=int, default=4, help="streaming: fragments (atoll and torchft alike)")
    ap.add_argument(
        "--overlap-steps", type=int, default=2, help="streaming: tau, inner steps a fragment's exchange overlaps"
    )
    ap.add_argument("--latency-ms", type=float, default=15.0)
    ap.add_argument("--probe-steps", type=int, default=2, help="ddp steps timed on the real link")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    ap.add_argument("--resume", action="store_true", help="keep OUT/wan_runs.json's records and run only the rest")
    ap.add_argument(
        "--plan-only", action="store_true", help="calibrate, print the link and the predicted duration, and stop"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny model, 2 rounds of 4 steps, one seed, one record per kind (~5 min), written to /tmp",
    )
    return ap


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Apply --quick and the defaults that depend on other options; check the settings."""
    if args.quick:
        args.preset, args.rounds, args.inner_steps, args.batch, args.seq_len = "tiny", 2, 4, 2, 64
        args.fragments, args.overlap_steps, args.seeds, args.probe_steps = 2, 1, args.seeds[:1], 1
        args.strategies, args.codecs, args.skip = ["ddp", "diloco", "streaming", "delayed"], ["none", "int8"], []
        args.steps = None
        if args.out is None:
            args.out = QUICK_OUT
    elif args.rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds {args.rounds}: at least {MIN_ROUNDS} outer rounds per run (or --quick)")
    if args.out is None:
        args.out = RESULTS
    if args.steps is None:
        args.steps = args.rounds * args.inner_steps
    if args.steps < args.rounds * args.inner_steps:
        raise SystemExit(f"--steps {args.steps} is fewer than --rounds x --inner-steps")
    if args.inner_steps % args.fragments or args.overlap_steps >= args.inner_steps // args.fragments:
        raise SystemExit(
            "torchft's streaming DiLoCo needs --inner-steps divisible by --fragments and --overlap-steps below "
            "inner-steps / fragments: change them"
        )
    return args


def grid(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(system, strategy, codec) of every run with the first seed, in order."""
    if args.quick:  # one record per kind: ddp, each atoll strategy (both pairs' atoll side), each torchft peer
        runs = [("atoll", "ddp", "none"), ("atoll", "diloco", "none"), ("atoll", "streaming", "none")]
        runs.append(("atoll", "delayed", "int8"))
    else:
        runs = []
        for strategy in args.strategies:
            for codec in ["none"] if strategy == "ddp" else args.codecs:
                if f"{strategy}-{codec}" not in args.skip:
                    runs.append(("atoll", strategy, codec))
    if not args.no_torchft:
        runs += [("torchft", "diloco", "none"), ("torchft", "streaming", "none")]
    return runs


def repeats(args: argparse.Namespace, records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """What runs again with each further seed: ddp, the best atoll run, both pairs, the peers."""
    out = [("atoll", "ddp", "none")] if "ddp" in args.strategies else []
    best = check_targets([r for r in records if r["seed"] == args.seeds[0]])
    if best:
        strategy, codec = best["best"].split()
        out.append(("atoll", strategy, codec))
    if not args.no_torchft:
        out += [("atoll", "diloco", "none"), ("atoll", "streaming", "none")]
        out += [("torchft", "diloco", "none"), ("torchft", "streaming", "none")]
    return list(dict.fromkeys(out))


def predicted_seconds(kind: tuple[str, str, str], args: argparse.Namespace, ratio: float, width: float) -> float:
    """Step-times a run should take (compute plus the exchanges it waits for), for planning only."""
    _, strategy, codec = kind
    if strategy == "ddp":
        return args.steps * 1.1 + 40
    exchange = ratio * CODEC_WIDTH[codec] / width  # inner steps one exchange of the whole model takes
    comm = args.rounds * exchange
    if strategy == "diloco":
        return args.steps + comm
    return max(args.steps, comm) + exchange  # overlapped: the longer of the two, plus the last flush


class Bench:
    """One benchmark invocation: the calibrated link, the records so far, running one more."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        cfg: RunConfig = load_config(RunConfig, CONFIG)
        self.data_dir = tmp / "data"
        prepare_demo_data(self.data_dir, vocab_size=cfg.data.vocab_size, seq_len=args.seq_len, seed=0)
        lab_ok, self.lab_reason = lab_available()
        self.lab = lab_ok
        self.mode = "netns" if lab_ok else "emulated"
        self.scenario = get_scenario(args.scenario)
        self.records: list[dict[str, Any]] = []
        self.calibration: dict[str, Any] = {}

    def common(self, seed: int) -> list[str]:
        a = self.args
        return [
            str(CONFIG),
            "--no-progress",
            f"--run.dir={self.tmp}",
            f"--run.seed={seed}",
            f"--model.preset={a.preset}",
            f"--data.dir={self.data_dir}",
            "--data.prepare=none",
            f"--data.seq_len={a.seq_len}",
            f"--train.steps={a.steps}",
            f"--train.warmup_steps={max(1, a.steps // 20)}",
            f"--train.log_every={max(1, min(5, a.inner_steps // 2))}",
            "--train.eval_every=0",
            "--train.checkpoint_every=0",
            f"--train.global_batch={a.batch}",
            f"--train.micro_batch={a.batch}",
            f"--sync.inner_steps={a.inner_steps}",
        ]

    def calibrate(self) -> None:
        """Compute seconds per inner step with two sites sharing this machine, and the link that
        gives the lab model, at the scenario's exchange width, the scenario's R."""
        from atoll.model import ModelConfig

        a, tmp = self.args, self.tmp
        flat = tmp / "flat.yaml"
        write_topology(flat, mbps=10_000, latency_ms=0)
        steps = min(a.steps, 40)
        run_atoll(
            [
                *self.common(a.seeds[0]),
                "--topology",
                str(flat),
                "--wan",
                "none",
                "--run.name=calib",
                f"--train.steps={steps}",
                "--sync.strategy=diloco",
                f"--sync.inner_steps={max(1, steps // 2)}",
            ],
            lab=False,
        )
        last = [r for r in site_records(tmp / "calib")[SITES[0]] if "compute_seconds" in r][-1]
        step_s = last["compute_seconds"] / last["step"]
        fields = json.loads((tmp / "calib" / "sites" / SITES[0] / "model.json").read_text())
        params = ModelConfig(**fields).num_params()
        width = self.scenario.bytes_per_param
        model_bytes = width * params
        mbps = self.scenario.lab_mbps(model_bytes, step_s)
        ratio = (model_bytes * 8 / (mbps * 1e6)) / step_s
        self.calibration = {
            "step_s": step_s,
            "params": params,
            "exchange_bytes_per_param": width,
            "mbps": mbps,
            "ratio": ratio,
        }

    def topology(self) -> Path:
        topo = self.tmp / "topology.yaml"
        if not topo.exists():
            write_topology(topo, mbps=self.calibration["mbps"], latency_ms=self.args.latency_ms)
        return topo

    def save(self, *, partial: bool) -> None:
        write_results(
            self.records,
            scenario=self.scenario,
            calibration=self.calibration,
            mode=self.mode,
            lab_reason=self.lab_reason,
            args=self.args,
            out=self.args.out,
            settings=settings(self.args),
            partial=partial,
        )

    def done(self, kind: tuple[str, str, str], seed: int) -> bool:
        return any((r["system"], r["strategy"], r["codec"], r["seed"]) == (*kind, seed) for r in self.records)

    def run(self, kind: tuple[str, str, str], seed: int) -> None:
        system, strategy, codec = kind
        a, cal = self.args, self.calibration
        name = f"{system}-{strategy}-{codec}-s{seed}"
        base = [*self.common(seed), "--topology", str(self.topology()), f"--run.name={name}"]
        base += [f"--sync.strategy={strategy}", *codec_flags(codec)]
        if strategy == "streaming":  # the same fragments and tau for atoll and torchft
            base += [f"--sync.fragments={a.fragments}", f"--sync.overlap_steps={a.overlap_steps}"]
        extra: dict[str, Any] = {}
        if system == "torchft":
            base += ["--worker", "bench.torchft_peer"]
        if strategy == "ddp":
            # Loss and compute time without the WAN; bytes and exchange time from a probe on the
            # link, scaled from the probe's fp32 gradient to the scenario's width.
            run_atoll([*base, "--wan", "none"], lab=False)
            probe = f"{name}-probe"
            probe_cmd = [*self.common(seed), "--topology", str(self.topology()), f"--run.name={probe}"]
            probe_cmd += ["--sync.strategy=ddp", "--sync.codec=none", f"--train.steps={a.probe_steps}"]
            run_atoll([*probe_cmd, "--train.warmup_steps=1"], lab=self.lab)
            p = [r for r in site_records(self.tmp / probe)[SITES[0]] if "wan_seconds" in r][-1]
            scale = cal["exchange_bytes_per_param"] / 4.0
            per_step = p["wan_seconds"] / max(1, p["wan_exchanges"]) * scale
            fp32_bytes = p["wan_bytes_sent"] / max(1, p["wan_exchanges"]) * a.steps * len(SITES)
            extra = {
                "wall_extrapolated": True,
                "exchange_s_per_step": per_step,
                "wan_bytes_fp32_measured": fp32_bytes,
            }
        else:
            run_atoll(base, lab=self.lab)
        s = summarize(self.tmp / name)
        rec = {
            "system": system,
            "strategy": strategy,
            "codec": codec,
            "seed": seed,
            "rounds": a.rounds,
            "inner_steps": a.inner_steps,
            "tokens": s["tokens"],
            "val_loss": s["val_loss"],
            "wall_s": s["wall_s"],
            "wan_bytes": s["wan_bytes"],
            "compute_utilization": s["compute_utilization"],
            "per_site": s["per_site"],
            "command": "atoll " + shlex.join(base),
            "curves": s["curves"],
            **extra,
        }
        if strategy == "ddp":
            compute = max(v["wall_s"] for v in s["per_site"].values())
            rec["wall_s"] = compute + extra["exchange_s_per_step"] * a.steps
            rec["wan_bytes"] = extra["wan_bytes_fp32_measured"] * cal["exchange_bytes_per_param"] / 4.0
            rec["compute_utilization"] = compute / rec["wall_s"]
            per_token = extra["exchange_s_per_step"] / (a.batch * a.seq_len)
            for curve in rec["curves"].values():
                for i, (w, tok, loss) in enumerate(curve):
                    curve[i] = (w + per_token * tok, tok, loss)
        self.records.append(rec)
        self.save(partial=True)  # after every run: a later failure (or Ctrl-C) keeps what was measured
        print(
            f"{system:8s} {strategy:9s} {codec:5s} seed {seed}: val {rec['val_loss']:.4f} wall {rec['wall_s']:.0f}s "
            f"WAN {rec['wan_bytes'] / 1e6:.1f} MB util {rec['compute_utilization']:.0%}",
            flush=True,
        )


def main() -> None:
    args = resolve(build_parser().parse_args())
    saved = args.out / "wan_runs.json"
    with tempfile.TemporaryDirectory(prefix="atoll-bench-wan-") as tmp_s:
        bench = Bench(args, Path(tmp_s))
        if args.resume and saved.exists():
            state = json.loads(saved.read_text())
            if state["settings"] != settings(args):
                raise SystemExit(
                    f"--resume: {saved} was written with other settings ({state['settings']}); "
                    "run without --resume or with the same options"
                )
            bench.records, bench.calibration = state["records"], state["calibration"]
            print(f"resumed {len(bench.records)} record(s) from {saved}", flush=True)
        else:
            bench.calibrate()
        cal = bench.calibration
        first = grid(args)
        plan = len(first) + (len(args.seeds) - 1) * 6
        est = sum(predicted_seconds(k, args, cal["ratio"], cal["exchange_bytes_per_param"]) for k in first)
        est *= cal["step_s"] * plan / max(1, len(first))
        print(
            f"calibrated: {cal['step_s']:.3f} s per inner step, {cal['params'] / 1e6:.2f}M parameters at "
            f"{cal['exchange_bytes_per_param']:g} B each -> {cal['mbps']:.3f} Mbit/s for R = {cal['ratio']:.1f} "
            f"({bench.mode}); about {plan} runs, predicted {est / 60:.0f} min",
            flush=True,
        )
        if args.plan_only:
            return
        for kind in first:
            if not bench.done(kind, args.seeds[0]):
                bench.run(kind, args.seeds[0])
        for seed in args.seeds[1:]:
            for kind in repeats(args, bench.records):
                if not bench.done(kind, seed):
                    bench.run(kind, seed)
        bench.save(partial=False)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a record depends on: --resume refuses a results file written with other settings."""
    keys = ("scenario", "rounds", "steps", "inner_steps", "batch", "seq_len", "preset", "fragments", "overlap_steps")
    return {k: getattr(args, k) for k in (*keys, "latency_ms")}


if __name__ == "__main__":
    main()
