"""Heterogeneous compute: sites and ranks of different speeds, balanced by atoll or not.

    .venv/bin/python bench/hetero.py            # the grid (about 40 minutes on 2 quiet cores)
    .venv/bin/python bench/hetero.py --resume   # skip the records already written

Case `sites`: 3 sites at speeds 1, 0.5 and 0.25 (topology slowdowns 1, 2, 4: compute, then
sleep), over an emulated WAN on loopback, the same token budget (rounds x 3 x H steps of the same
global batch), once per strategy of `--strategies`: `diloco` (each site waits for the exchange at
the end of every round: the exchange and the whole-step granularity of the split are idle time)
and `delayed` (the exchange runs under the next round's compute, as the WAN benchmark's overlap).
Policies: `equal` (every site runs H per round: sync.balance never),
`atoll` (no hand-set counts: sync.balance auto balances the rounds), `homogeneous` (3 sites at
speed 1: the reference for the loss), and `split` (3 sites at speed 1 running the atoll run's last
per-site step counts by hand: the loss of atoll's split of the work without the speeds, which says
whether a loss gap comes from the split or from anything else).

Case `ranks`: one site, 2 ranks at speeds 1 and 0.5 (parallel.rank_slowdowns), the same steps.
Policies: `equal` (equal shares: parallel.balance_ranks false), `atoll` (shares by measured
speed), `homogeneous` (2 ranks at speed 1, equal shares).

Efficiency is HETHUB's: tokens/s of the run over the sum of what its parts do alone, each part's
alone-throughput measured inside the same run (a site: its tokens over its compute seconds,
sleep included, from its first exchange on; a rank: its samples over its own compute seconds), so
the other jobs sharing the machine weigh on both alike. A rank's throughput in a run of its own is
recorded too (`solo_run_tokens_per_s`, `efficiency_vs_solo_runs`): on 2 shared cores two ranks
slow each other down, so that figure measures the machine more than the balance.
`predicted_efficiency` is the planner's own (`atoll.planner.hetero.predict_efficiency`, the
function behind `atoll plan`'s "predicted efficiency"), given the speeds the run measured and the
per-round (sites) or per-step (ranks) overhead measured on the homogeneous run (calibration, as
`atoll calibrate` would), or the link model's exchange time for the homogeneous run itself.

Writes bench/results/hetero.json (after each run), hetero.md and hetero_timeline.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atoll.planner.hetero import SitePace, predict_efficiency, rank_step, site_round_counts  # noqa: E402
from atoll.report.metrics import read_metrics  # noqa: E402
from atoll.sync.link_model import WanLink, allgather_seconds  # noqa: E402

RESULTS = REPO / "bench" / "results"
OUT_JSON, OUT_MD, OUT_PNG = RESULTS / "hetero.json", RESULTS / "hetero.md", RESULTS / "hetero_timeline.png"
ATOLL = [sys.executable, "-m", "atoll.cli"]
SITES = ("fast", "mid", "slow")
MBPS, LATENCY_MS = 1000.0, 2.0
CASES: dict[str, dict[str, list[float]]] = {
    # homogeneous first: the planner's prediction is calibrated on its per-round (per-step) overhead
    "sites": {
        "homogeneous": [1.0, 1.0, 1.0],
        "equal": [1.0, 2.0, 4.0],
        "atoll": [1.0, 2.0, 4.0],
        "split": [1.0, 1.0, 1.0],  # after atoll: its split, alike sites
    },
    "ranks": {"homogeneous": [1.0, 1.0], "equal": [1.0, 2.0], "atoll": [1.0, 2.0]},
}


def base_config(work: Path, name: str, args: argparse.Namespace, *, steps: int, batch: int = 0) -> dict[str, Any]:
    return {
        "run": {"name": name, "dir": str(work / "runs"), "seed": 0},
        "model": {"preset": "tiny"},
        "data": {"dir": str(work / "data"), "prepare": "demo", "seq_len": args.seq_len},
        "train": {
            "steps": steps,
            "global_batch": batch or args.global_batch,
            "micro_batch": batch or args.global_batch,
            "lr": 3e-3,
            "warmup_steps": 4,
            "log_every": 1,
            "eval_every": 0,
            "eval_batches": 4,
            "checkpoint_every": 0,
        },
        "parallel": {"device": "cpu", "threads": 1},
    }


def write_yaml(path: Path, value: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(value, sort_keys=False), encoding="utf-8")
    return path


def run(cmd: list[str], run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (--resume skips whole records)
    env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=str(REPO / "src"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run failed: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def final_val(rows: list[dict[str, Any]]) -> float:
    return float([r["val_loss"] for r in rows if "val_loss" in r][-1])


def sites_run(
    work: Path,
    policy: str,
    speeds: list[float],
    args: argparse.Namespace,
    *,
    calibration: float | None,
    strategy: str = "diloco",
    split: dict[str, int] | None = None,
    again: bool = True,
) -> dict[str, Any]:
    name = f"sites-{policy}" if strategy == "diloco" else f"sites-{strategy}-{policy}"
    cfg = base_config(work, name, args, steps=args.rounds * args.inner_steps)
    cfg["sync"] = {
        "strategy": strategy,
        "inner_steps": args.inner_steps,
        "balance": "never" if policy in ("equal", "split") else "auto",
    }
    if split:
        cfg["sync"]["site_inner_steps"] = split
    topology = {
        "name": name,
        "sites": [
            {"name": s, "devices": [{"kind": "cpu", "count": 1, "per_node": 1, "slowdown": x}]}
            for s, x in zip(SITES, speeds)
        ],
        "links": [{"site": s, "uplink_mbps": MBPS, "latency_ms": LATENCY_MS} for s in SITES],
        "lighthouse": {"site": SITES[0]},
    }
    cfg_path = write_yaml(work / name / "config.yaml", cfg)
    topo_path = write_yaml(work / name / "topology.yaml", topology)
    cmd = [*ATOLL, "train", str(cfg_path), "--topology", str(topo_path), "--wan", "emulated"]
    if again:
        run(cmd, work / "runs" / name)
    rows = {s: read_metrics(work / "runs" / name / "sites" / s) for s in SITES}
    # The steady state starts where every site has met: the end of round 1 under diloco (each
    # waits there for the exchange), of round 2 under delayed (round 1's exchange is applied
    # there; before it a fast site runs on without waiting for the others to start).
    met = 1 if strategy == "delayed" else 0
    per_site, tokens, solo, step_seconds, exchange = {}, 0, 0.0, [], []
    trains = {s: [r for r in rs if "loss" in r] for s, rs in rows.items()}
    finals = {s: [r for r in rs if "sync_rounds" in r][-1] for s, rs in rows.items()}
    ends = {s: list(itertools.accumulate(int(r[1]) for r in f["sync_rounds"])) for s, f in finals.items()}
    # One window on the machine's clock for all sites: from when the last of them reached the
    # meeting point (every site has started; process start-up skew is not balancing's doing) to
    # when the last of them ended its last round. Per-site windows would miss that under delayed
    # a fast site runs up to a round ahead of a slow one.
    by_step = {s: {r["step"]: r for r in train} for s, train in trains.items()}
    t0 = max(by_step[s][ends[s][met]]["time"] for s in SITES)
    t1 = max(by_step[s][ends[s][-1]]["time"] for s in SITES)
    window_tokens = 0
    for s in SITES:
        train, final, site_ends = trains[s], finals[s], ends[s]
        before = [r for r in train if r["time"] <= t0][-1]
        last = by_step[s][site_ends[-1]]
        site_tokens = last["tokens_seen"] - before["tokens_seen"]
        site_compute = last["compute_seconds"] - before["compute_seconds"]
        tokens += train[-1]["tokens_seen"]
        window_tokens += site_tokens
        solo += site_tokens / site_compute
        step_seconds.append(site_compute / (last["step"] - before["step"]))
        exchange.append(last["wan_seconds"] / max(last["wan_exchanges"], 1))
        per_site[s] = {
            "steps": train[-1]["step"],
            "rounds": [r[1] for r in final["sync_rounds"]],
            "solo_tokens_per_s": site_tokens / site_compute,
            "sync_wait_seconds": last["sync_wait_seconds"],
            "timeline": timeline(train, final["sync_rounds"]),
        }
    wall = t1 - t0
    links = [WanLink.from_mbps(s, up_mbps=MBPS, down_mbps=MBPS, latency_ms=LATENCY_MS) for s in SITES]
    payload = 4 * num_params(work / "runs" / name / "sites" / SITES[0])
    # A round's overhead beyond its slowest site's compute: the exchange, and what the lab adds.
    lines = [site["timeline"][1:] for site in per_site.values()]
    overhead = statistics.median(
        max(r[2] - r[0] for r in rounds) - max(r[1] - r[0] for r in rounds) for rounds in zip(*lines)
    )
    # The planner's prediction (`predict_efficiency`, what `atoll plan` prints) for these measured
    # speeds: each site's H as the run split the round (balance auto leaves alike sites at H), the
    # same batch everywhere.
    counts = (
        list(split.values())
        if split
        else site_round_counts(
            step_seconds, inner_steps=args.inner_steps, policy="balanced" if policy == "atoll" else "equal"
        )
    )
    paces = [
        SitePace(s, h, t, args.global_batch, args.global_batch / t) for s, h, t in zip(SITES, counts, step_seconds)
    ]
    predicted = predict_efficiency(
        paces, exchange_seconds=calibration if calibration is not None else allgather_seconds(payload, links)
    )
    return {
        "tokens": tokens,
        "tokens_per_s": window_tokens / wall,
        "solo_sum_tokens_per_s": solo,
        "window": f"the machine's clock from the last site's end of round {met + 1} to the last site's end",
        "val_loss": statistics.mean(final_val(rs) for rs in rows.values()),
        "predicted_efficiency": predicted.efficiency,
        "predicted_factors": {"rounds": predicted.rounds, "exchange": predicted.exchange},
        "predicted_site_inner_steps": counts,
        "wall_s": wall,
        "measured_exchange_s": statistics.median(exchange),
        "overhead_s": overhead,
        "link_model_exchange_s": allgather_seconds(payload, links),
        "per_site": per_site,
        "command": shlex.join(["atoll", *cmd[3:]]),
    }


def timeline(train: list[dict[str, Any]], rounds: list[list[float]]) -> list[list[float]]:
    """[start, compute end, round end] of each round, in the site's wall seconds."""
    wall = {r["step"]: r["wall_seconds"] for r in train}
    out, start, step = [], 0.0, 0
    for _, steps, seconds in rounds:
        step += int(steps)
        end = wall.get(step, start + seconds)
        out.append([round(start, 3), round(start + seconds, 3), round(end, 3)])
        start = end
    return out


def num_params(run_dir: Path) -> int:
    from atoll.rundir.layout import read_model_json

    return read_model_json(run_dir).num_params()


def solo_run(work: Path, slowdown: float, args: argparse.Namespace) -> float:
    """Tokens/s of one rank of this slowdown training the ranks case's global batch alone."""
    name = f"solo-{slowdown:g}"
    cfg = base_config(work, name, args, steps=args.solo_steps, batch=args.rank_batch)
    cfg["parallel"].update(rank_slowdowns=[slowdown])
    cmd = [*ATOLL, "train", str(write_yaml(work / name / "config.yaml", cfg))]
    run(cmd, work / "runs" / name)
    train = [r for r in read_metrics(work / "runs" / name) if "loss" in r]
    step_s = statistics.median(r["step_seconds"] for r in train[2:])
    return args.rank_batch * args.seq_len / step_s


def ranks_run(
    work: Path, policy: str, speeds: list[float], args: argparse.Namespace, *, calibration: float | None
) -> dict[str, Any]:
    name = f"ranks-{policy}"
    cfg = base_config(work, name, args, steps=args.rank_steps, batch=args.rank_batch)
    cfg["parallel"].update(rank_slowdowns=speeds, balance_ranks=policy == "atoll", rebalance_every=args.rebalance_every)
    cfg_path = write_yaml(work / name / "config.yaml", cfg)
    cmd = [*ATOLL, "train", str(cfg_path), "--nproc", "2"]
    run(cmd, work / "runs" / name)
    rows = read_metrics(work / "runs" / name)
    train = [r for r in rows if "loss" in r]
    last = train[-1]
    measured = [r["rank_samples_per_s"] for r in train if "rank_samples_per_s" in r]
    rate = [statistics.median(m[i] for m in measured) for i in range(2)]  # samples/s of each rank's compute
    skip = args.rebalance_every + 1  # the first split follows the catalog; measure after the first re-split
    step_s = statistics.median(r["step_seconds"] for r in train[skip:])
    tokens_per_step = args.rank_batch * args.seq_len
    shares = [r["rank_shares"] for r in train if "rank_shares" in r][-1]
    slowest = max(n / x for n, x in zip(shares, rate))  # the step's compute: its slowest rank's
    overhead = max(0.0, step_s - slowest)  # all-reduce, clip, optimizer step
    alone = [solo_tokens_per_s(work, x, args) for x in speeds]
    step_model, solo_model, _ = rank_step(
        [1.0 / x for x in rate],  # seconds per sample of each rank's compute
        batch=args.rank_batch,
        micro_batch=1,  # on the CPU a rank's one (partial) micro-batch costs its samples, not a full one
        policy="balanced" if policy == "atoll" else "equal",
        reduce_seconds=calibration or 0.0,
    )
    return {
        "tokens": last["tokens_seen"],
        "tokens_per_s": tokens_per_step / step_s,
        "solo_sum_tokens_per_s": sum(rate) * args.seq_len,
        "solo_run_tokens_per_s": alone,
        "efficiency_vs_solo_runs": tokens_per_step / step_s / sum(alone),
        "overhead_s": overhead,
        "val_loss": final_val(rows),
        # The planner's prediction: the runtime's shares of the batch for these measured speeds,
        # the step's calibrated overhead (`rank_step` into `predict_efficiency`).
        "predicted_efficiency": predict_efficiency(
            [SitePace("site", 1, step_model, args.rank_batch, solo_model)]
        ).efficiency,
        "wall_s": last["wall_seconds"],
        "rank_shares": shares,
        # The best efficiency whole samples allow at these speeds (no overhead): the ideal step
        # (the batch over the summed rates) over the step of the run's split.
        "split_bound": args.rank_batch / sum(rate) / slowest,
        "rank_samples_per_s": rate,
        "command": shlex.join(["atoll", *cmd[3:]]),
    }


SOLO: dict[str, float] = {}  # slowdown -> tokens/s alone (kept in hetero.json, reused on --resume)


def solo_tokens_per_s(work: Path, slowdown: float, args: argparse.Namespace) -> float:
    key = f"{slowdown:g}"
    if key not in SOLO:
        SOLO[key] = solo_run(work, slowdown, args)
    return SOLO[key]


def load_records() -> list[dict[str, Any]]:
    if OUT_JSON.exists():
        SOLO.update(json.loads(OUT_JSON.read_text()).get("solo_tokens_per_s", {}))
    return json.loads(OUT_JSON.read_text())["records"] if OUT_JSON.exists() else []  # noqa: SIM108


def save(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "work")}
    lab_mode = (
        f"emulated: every site and rank is a process on this machine (2 shared cores); a slower chip "
        f"is emulated by sleeping (slowdown - 1) x its compute after each step; the WAN is emulated in "
        f"the transport on loopback ({MBPS:g} Mbit/s, {LATENCY_MS:g} ms per hop)"
    )
    out = {"lab_mode": lab_mode, "settings": settings, "solo_tokens_per_s": SOLO, "records": records}
    OUT_JSON.write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resume", action="store_true", help="skip records already in hetero.json")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-hetero")
    ap.add_argument("--inner-steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rank-steps", type=int, default=60)
    ap.add_argument("--rebalance-every", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=8)
    # 256 tokens per sequence (and 32 or more sequences per step in the ranks case): a step's compute
    # then dominates its all-reduce and optimizer as on accelerators. At 64 x 16 the two-rank
    # homogeneous run itself reached only 0.73 of its ranks' solo sum (quiet cores, 2026-12-07):
    # the benchmark measured the lab's per-step overhead, not the balance.
    ap.add_argument("--seq-len", type=int, default=256)
    # 64 sequences: ranks split in whole samples, and at 32 the best split of speeds 1 : 0.5 (22 : 10
    # at the measured rates) already capped the efficiency at 0.981 before any overhead.
    ap.add_argument("--rank-batch", type=int, default=64, help="global batch of the ranks case")
    ap.add_argument("--solo-steps", type=int, default=24, help="steps of each rank's run alone")
    ap.add_argument("--cases", default="sites,ranks")
    ap.add_argument("--strategies", default="diloco,delayed", help="the sites case's sync strategies")
    ap.add_argument(
        "--redo", action="append", default=[], metavar="LABEL/POLICY",
        help="with --resume: run a record again (e.g. 'ranks/atoll', 'sites (delayed)/atoll'); the earlier "
        "runs' figures stay in the new record's `earlier_runs`",
    )  # fmt: skip
    ap.add_argument(
        "--rescore", action="append", default=[], metavar="LABEL/POLICY",
        help="with --resume: compute a sites record again from its run directory without running it",
    )  # fmt: skip
    args = ap.parse_args()
    records = load_records() if args.resume else []
    earlier: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}  # what a new record keeps
    rescore: set[tuple[str, str | None, str]] = set()  # scored again from the run directory, not run again
    for r in [r for r in records if f"{label(r)}/{r['policy']}" in (*args.redo, *args.rescore)]:
        records.remove(r)
        key = (r["case"], strategy_of(r), r["policy"])
        earlier[key] = list(r.get("earlier_runs", []))
        if f"{label(r)}/{r['policy']}" in args.rescore:
            rescore.add(key)
        else:  # run again: this run's figures join the earlier ones
            earlier[key].append({k: r[k] for k in ("efficiency", "predicted_efficiency", "val_loss", "tokens_per_s")})
    done = {(r["case"], strategy_of(r), r["policy"]) for r in records}
    for case in args.cases.split(","):
        for strategy in args.strategies.split(",") if case == "sites" else [None]:
            for policy, speeds in CASES[case].items():
                if (case, strategy, policy) in done or (policy == "split" and strategy != "diloco"):
                    continue  # the split's loss check needs one strategy
                print(f"{case} / {strategy or '-'} / {policy} ...", flush=True)
                key = (case, strategy, policy)
                record = run_policy(records, case, strategy, policy, speeds, args, again=key not in rescore)
                if earlier.get(key):
                    record["earlier_runs"] = earlier[key]
                records.append(record)
                save(records, args)  # each record as soon as its run finishes
    save(records, args)
    write_markdown(records)
    plot_timeline(records)


def strategy_of(record: dict[str, Any]) -> str | None:
    """The sync strategy of a record: the sites case's (diloco in records older than the field)."""
    return record.get("strategy", "diloco") if record["case"] == "sites" else None


def run_policy(
    records: list[dict[str, Any]],
    case: str,
    strategy: str | None,
    policy: str,
    speeds: list[float],
    args: argparse.Namespace,
    *,
    again: bool = True,
) -> dict[str, Any]:
    same = [r for r in records if r["case"] == case and strategy_of(r) == strategy]
    reference = [r for r in same if r["policy"] == "homogeneous"]
    calibration = reference[0]["overhead_s"] if reference else None
    extra: dict[str, Any] = {"strategy": strategy, "again": again} if strategy else {}
    if policy == "split":
        balanced = [r for r in same if r["policy"] == "atoll"]
        if not balanced:
            raise SystemExit("the split policy runs atoll's split: run the atoll policy first")
        extra["split"] = {s: v["rounds"][-1] for s, v in balanced[0]["per_site"].items()}
    runner = sites_run if case == "sites" else ranks_run
    result = runner(args.work, policy, speeds, args, calibration=calibration, **extra)
    return {
        "case": case,
        **({"strategy": strategy} if strategy else {}),
        "policy": policy,
        "speeds": [1.0 / x for x in speeds],
        **result,
        "efficiency": result["tokens_per_s"] / result["solo_sum_tokens_per_s"],
    }


def in_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records by case, strategy and policy as CASES lists them (the order they ran may differ)."""
    cases = list(CASES)
    return sorted(
        records,
        key=lambda r: (cases.index(r["case"]), strategy_of(r) != "diloco", list(CASES[r["case"]]).index(r["policy"])),
    )


def write_markdown(records: list[dict[str, Any]]) -> None:
    records = in_order(records)
    lab_mode = json.loads(OUT_JSON.read_text())["lab_mode"]
    lines = [
        "# Heterogeneous compute (bench/hetero.py)",
        "",
        f"Lab mode: {lab_mode}.",
        "",
        "| case | policy | speeds | tokens | tokens/s | solo sum tokens/s | efficiency | predicted | val loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        speeds = ", ".join(f"{s:g}" for s in r["speeds"])
        lines.append(
            f"| {label(r)} | {r['policy']} | {speeds} | {r['tokens']} | {r['tokens_per_s']:.0f} | "
            f"{r['solo_sum_tokens_per_s']:.0f} | {r['efficiency']:.3f} | {r['predicted_efficiency']:.3f} | "
            f"{r['val_loss']:.4f} |"
        )
    lines += ["", "## Targets", ""]
    for case in dict.fromkeys(label(r) for r in records):
        by = {r["policy"]: r for r in records if label(r) == case}
        if "atoll" not in by:
            continue
        a = by["atoll"]
        runs = [a["efficiency"], *(e["efficiency"] for e in a.get("earlier_runs", []))]
        every = f" (median of {len(runs)} runs: {', '.join(f'{x:.3f}' for x in runs)})" if len(runs) > 1 else ""
        lines.append(f"- {case}: atoll efficiency {statistics.median(runs):.3f}{every} (target >= 0.97)")
        if "homogeneous" in by:
            gap = a["val_loss"] / by["homogeneous"]["val_loss"] - 1
            lines.append(f"- {case}: val loss vs homogeneous at equal tokens {gap:+.2%} (target within 1%)")
            rel = a["efficiency"] / by["homogeneous"]["efficiency"]
            lines.append(f"- {case}: atoll efficiency relative to homogeneous's {rel:.3f}")
        if "split" in by and "homogeneous" in by:
            gap = by["split"]["val_loss"] / by["homogeneous"]["val_loss"] - 1
            same = a["val_loss"] / by["split"]["val_loss"] - 1
            lines.append(
                f"- {case}: atoll's split on alike sites (`split`) vs homogeneous {gap:+.2%}; atoll vs that "
                f"split {same:+.2%} (the loss follows the split of the work, not the speeds)"
            )
        if "split_bound" in a:
            bound = a["split_bound"]
            lines.append(f"- {case}: the best whole-sample split of atoll's measured speeds allows {bound:.3f}")
        for p, r in by.items():
            err = r["predicted_efficiency"] / r["efficiency"] - 1
            lines.append(f"- {case}/{p}: predicted efficiency off by {err:+.1%} (target within 5%)")
    lines += ["", "Commands:", ""] + [f"- {label(r)}/{r['policy']}: `{r['command']}`" for r in records]
    OUT_MD.write_text("\n".join(lines) + "\n")


def label(record: dict[str, Any]) -> str:
    """The case as the tables name it: `sites (diloco)`, `sites (delayed)`, `ranks`."""
    strategy = strategy_of(record)
    return f"{record['case']} ({strategy})" if strategy else record["case"]


def plot_timeline(records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [r for r in in_order(records) if r["case"] == "sites"]
    if not sites:
        return
    fig, axes = plt.subplots(len(sites), 1, figsize=(10, 2.2 * len(sites)), squeeze=False)
    for ax, r in zip(axes[:, 0], sites):
        for row, site in enumerate(r["per_site"].values()):
            for start, compute_end, end in site["timeline"]:
                ax.barh(row, compute_end - start, left=start, color="tab:blue", height=0.6)
                ax.barh(row, max(end - compute_end, 0), left=compute_end, color="tab:orange", height=0.6)
        ax.set_yticks(range(len(r["per_site"])), list(r["per_site"]))
        ax.set_title(f"{label(r)} / {r['policy']}: efficiency {r['efficiency']:.3f}", fontsize=9)
    axes[-1, 0].set_xlabel("seconds since the site's first step (blue: compute, orange: waiting and exchange)")
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=110)


if __name__ == "__main__":
    main()
