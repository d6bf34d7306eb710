"""`atoll plan` and `atoll calibrate`: the planner's command line (registered through atoll.cli).

    atoll plan --topology examples/topologies/two-cluster-1gbps.yaml --model qwen1.5-107b --tokens 100B
    atoll calibrate --model demo --out hardware.yaml

`plan` prints the top plans and the reasons for the recommended one, simulates it (a timeline PNG
and the time-to-train distribution), and writes plan.yaml for `atoll train --plan`. `calibrate`
measures this machine (`atoll.planner.calibrate`) and writes a hardware YAML for `--hardware`.
Building the parser imports no torch: the planner needs none, and `calibrate` loads it when run.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from atoll.errors import AtollError

log = logging.getLogger(__name__)

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_tokens(text: str) -> float:
    """``1T``, ``100B``, ``2.5e11`` or ``500M`` as a number of tokens; raises `AtollError`."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGTkmbgt]?)\s*", text)
    if not m:
        raise AtollError(f"--tokens {text!r} is not a number of tokens; write e.g. 1T, 100B, 500M or 2.5e11")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value <= 0:
        raise AtollError(f"--tokens must be positive, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``plan`` and ``calibrate`` verbs to the `atoll` command's sub-parsers."""
    _register_plan(sub)
    _register_calibrate(sub)


def _register_plan(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "plan",
        help="plan a multi-site training run: layouts, sync strategy, H, codec, time to train",
        description="Search per-site layouts and the cross-site sync for a model and a token budget, "
        "predict step time, MFU, WAN traffic and days to train, simulate the plan, and write plan.yaml.",
    )
    p.add_argument("--topology", type=Path, required=True, help="topology YAML (see examples/topologies/)")
    p.add_argument(
        "--model", required=True, help="model preset (llama3-8b, qwen1.5-107b, gpt-1t, ...) or model YAML file"
    )
    p.add_argument("--tokens", required=True, help="tokens to train on: 1T, 100B, 500M or a number")
    p.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="sequences per step over all sites (default: from the model size)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(model max, 4096))")
    p.add_argument(
        "--objective",
        choices=["time", "cost"],
        default="time",
        help="rank plans by time to train or by device-hour cost",
    )
    p.add_argument(
        "--risk",
        choices=["low", "medium", "high"],
        default="medium",
        help="loss-risk budget bounding H and compression (docs/decisions.md lists the sources)",
    )
    p.add_argument(
        "--strategy", default=None, help="only these strategies, comma-separated (ddp,diloco,streaming,delayed)"
    )
    p.add_argument(
        "--all-sites", action="store_true", help="only plans that use every site (default: sites may be left out)"
    )
    p.add_argument(
        "--hardware",
        type=Path,
        action="append",
        default=[],
        help="hardware YAML adding or overriding devices (repeatable)",
    )
    p.add_argument("--out", type=Path, default=Path("plan.yaml"), help="where to write the plan (default: plan.yaml)")
    p.add_argument("--top", type=int, default=5, help="plans to list")
    p.add_argument("--explain", action="store_true", help="show the arithmetic behind the recommended plan")
    p.add_argument(
        "--no-simulate", action="store_true", help="skip the simulator (timeline and time-to-train distribution)"
    )
    p.add_argument("--timeline", type=Path, default=None, help="timeline PNG (default: next to --out, *.timeline.png)")
    p.add_argument("--jitter", type=float, default=0.03, help="simulator: coefficient of variation of step times")
    p.add_argument("--stragglers", type=float, default=0.005, help="simulator: probability a step is 3x slower")
    p.add_argument("--no-failures", action="store_true", help="simulator: no device failures")
    p.add_argument("--trials", type=int, default=20, help="simulator: runs for the time-to-train distribution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=handle_plan, allow_overrides=False)


def handle_plan(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the planner for parsed arguments; returns the exit code. Raises `AtollError` for bad input."""
    from atoll.config.topology import load_topology
    from atoll.hardware import use_hardware_file
    from atoll.planner.plan import plan_from_candidate, write_plan
    from atoll.planner.search import PlanRequest, plan
    from atoll.planner.shape import resolve_model
    from atoll.planner.wan import STRATEGIES

    if extra:
        raise AtollError(f"unexpected arguments: {' '.join(extra)}")
    for path in args.hardware:
        use_hardware_file(path)
    topology = load_topology(args.topology)
    shape = resolve_model(args.model)
    tokens = parse_tokens(args.tokens)
    for name in ("global_batch", "seq_len", "top", "trials"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AtollError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    strategies = STRATEGIES
    if args.strategy:
        strategies = tuple(s.strip() for s in args.strategy.split(","))  # type: ignore[assignment]
        bad = [s for s in strategies if s not in STRATEGIES]
        if bad:
            raise AtollError(f"--strategy {','.join(bad)} unknown; choose among {','.join(STRATEGIES)}")
    req = PlanRequest(
        tokens=tokens,
        global_batch=args.global_batch,
        seq_len=args.seq_len,
        objective=args.objective,
        risk=args.risk,
        strategies=strategies,
        top=args.top,
        all_sites=args.all_sites,
    )
    result = plan(topology, shape, req)
    console = Console()
    _print_header(console, result, args)
    _print_table(console, result)
    console.print(result.recommended.efficiency.describe(), highlight=False)
    console.print("[bold]why this plan[/]")
    for line in result.recommended.reasons:
        console.print(f"  • {line}", highlight=False)
    if args.explain:
        from atoll.planner.explain import explain

        for title, lines in explain(result.recommended, shape, req):
            console.print(f"[bold]{title}[/]")
            for line in lines:
                console.print(f"  {line}", highlight=False, markup=False)
    plan_obj = plan_from_candidate(
        result.recommended,
        model=shape.name,
        model_params=shape.num_params(),
        topology=str(args.topology),
        tokens=tokens,
    )
    if not args.no_simulate:
        _simulate(console, result, args)
    write_plan(plan_obj, args.out)
    console.print(f"wrote {args.out} (use: atoll train --plan {args.out})", highlight=False)
    return 0


def _print_header(console: Console, result: object, args: argparse.Namespace) -> None:
    from atoll.planner.search import PlanResult

    assert isinstance(result, PlanResult)
    c = result.recommended
    devices = sum(sp.estimate.devices_total for sp in c.sites)
    console.print(
        f"[bold]{result.shape.name}[/] ({result.shape.num_params() / 1e9:,.2f}B parameters), "
        f"{result.request.tokens:.3g} tokens "
        f"on {args.topology} ({devices} devices in the recommended plan); batch {c.global_batch} x {c.seq_len} tokens",
        highlight=False,
    )


def _print_table(console: Console, result: object) -> None:
    from atoll.planner.search import PlanResult

    assert isinstance(result, PlanResult)
    table = Table(title="plans (1 = recommended)")
    for col in ("#", "sites", "sync", "step s", "WAN GB/sync", "WAN s/sync", "util", "MFU", "days", "cost $"):
        table.add_column(col, justify="left" if col in ("sites", "sync", "MFU") else "right")
    for i, c in enumerate(result.candidates):
        table.add_row(
            str(i + 1),
            "+".join(sp.name for sp in c.sites),
            c.sync.describe(),
            f"{c.compute_step_s:.3g}",
            f"{c.wan_bytes_per_sync / 1e9:,.2f}",
            f"{c.sync_s:,.0f}",
            f"{c.utilization:.1%}",
            ", ".join(f"{k} {v:.0%}" for k, v in c.mfu_by_kind().items()),
            f"{c.days:,.1f}",
            f"{c.cost_usd:,.0f}",
        )
    console.print(table)
    rec = result.recommended
    sites = Table(title="recommended plan, per site")
    for col in ("site", "devices", "layout", "batch", "H", "step s", "MFU", "memory GB/device"):
        sites.add_column(col, justify="left" if col in ("site", "devices", "layout") else "right")
    mfu = rec.mfu_by_kind()
    for sp, site_h in zip(rec.sites, rec.site_inner_steps):
        est = sp.estimate
        sites.add_row(
            sp.name,
            " + ".join(f"{g.count} {g.device.kind}" for g in est.groups),
            est.layout.describe(),
            str(est.batch),
            str(site_h),
            f"{est.seconds:.3g}",
            ", ".join(f"{mfu[g.device.kind]:.0%}" for g in est.groups),
            ", ".join(f"{m.total / 1e9:.1f} of {m.capacity / 1e9:.0f}" for m in est.memory),
        )
    console.print(sites)


def _simulate(console: Console, result: object, args: argparse.Namespace) -> None:
    from atoll.planner.playback import play
    from atoll.planner.search import PlanResult
    from atoll.planner.simulate import Disturbances
    from atoll.planner.timeline import draw_timeline

    assert isinstance(result, PlanResult)
    c = result.recommended
    dist = Disturbances(
        jitter=args.jitter,
        straggler_prob=args.stragglers,
        failures=not args.no_failures,
        recovery_s=result.request.recovery_s,
        seed=args.seed,
    )
    pb = play(
        c,
        result.shape,
        disturbances=dist,
        trials=args.trials,
        checkpoint_interval_s=result.request.checkpoint_interval_s,
    )
    h = pb.horizon
    console.print(
        f"[bold]simulated[/] ({args.trials} runs, jitter {args.jitter:.0%}, stragglers {args.stragglers:.1%}, "
        f"failures {'off' if args.no_failures else 'on'}): days to train p10 {h.days_p10:,.1f} / "
        f"p50 {h.days_p50:,.1f} / "
        f"p90 {h.days_p90:,.1f}; compute utilization {h.utilization:.1%}; {h.failures:,.1f} failures per run",
        highlight=False,
    )
    path = args.timeline or args.out.with_suffix(".timeline.png")
    draw_timeline(
        pb.window,
        [s.name for s in pb.sites],
        path,
        title=f"{result.shape.name}: {c.sync.describe()} (first {pb.window.steps} steps, simulated)",
    )
    console.print(
        f"timeline: {path} (utilization over these steps {pb.window.utilization(pb.sites):.1%})", highlight=False
    )


# ---------------------------------------------------------------- calibrate


def _register_calibrate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "calibrate",
        help="measure this machine for the planner (peak, step time, efficiency) and write a hardware YAML",
        description="Measure the CPU's matmul peak, time training steps of a model, fit the efficiency that makes the "
        "planner predict that step, and write a hardware file for `atoll plan --hardware`.",
    )
    p.add_argument("--model", default="demo", help="model preset to time (default: demo)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps (median), after 2 untimed")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--kind", default="cpu", help="device kind to write (default: cpu, overriding the catalog's)")
    p.add_argument(
        "--out", type=Path, default=Path("hardware.yaml"), help="hardware YAML to write (default: hardware.yaml)"
    )
    p.set_defaults(func=handle_calibrate, allow_overrides=False)


def handle_calibrate(args: argparse.Namespace, extra: list[str]) -> int:
    """Measure this machine and write the hardware YAML; returns the exit code. Raises `AtollError` for bad input."""
    import yaml

    from atoll.planner.calibrate import calibrate_cpu

    if extra:
        raise AtollError(f"unexpected arguments {' '.join(extra)}")
    for name in ("seq_len", "micro_batch", "steps", "threads"):
        if getattr(args, name) < 1:
            raise AtollError(f"--{name.replace('_', '-')} must be at least 1")
    cal = calibrate_cpu(
        model=args.model,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        steps=args.steps,
        threads=args.threads,
        kind=args.kind,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump(cal.hardware_yaml(), sort_keys=False), encoding="utf-8")
    console = Console()
    console.print(
        f"matmul peak {cal.peak_flops / 1e9:,.1f} GFLOP/s ({cal.threads} threads); "
        f"{cal.model} step ({cal.micro_batch} x {cal.seq_len} tokens) "
        f"{cal.step_s:.3f} s measured, {cal.catalog_step_s:.3f} s predicted with the catalog's efficiencies; "
        f"fitted efficiency {cal.efficiency:.3f}",
        highlight=False,
    )
    console.print(
        f"wrote {args.out} (use: atoll plan --hardware {args.out} ..., or ATOLL_HARDWARE={args.out})", highlight=False
    )
    return 0
