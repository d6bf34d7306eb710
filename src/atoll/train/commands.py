"""`atoll train` and its worker entry, ``python -m atoll.train`` (registered through atoll.cli).

    atoll train CONFIG.yaml [--nproc N | --topology T [--ranks-per-site R] [--restart-sites N]]
                [--plan PLAN.yaml] [--resume] [--stop-after STEP] [--section.key=value ...]

`atoll train` runs here (one rank), launches local ranks (`--nproc`), or launches every site of a
topology on this machine (`--topology`: `atoll lighthouse` and one `atoll site` per site, as
separate processes, the commands a deployment runs in each data center); each launched rank runs
`worker_main`. `atoll lab run` reuses `train_sites` with the lab's namespaces as the host.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console

from atoll.console import fail, guarded, launched_rank, setup_logging, want_progress
from atoll.errors import AtollError, RunFailure

if TYPE_CHECKING:
    from atoll.config import RunConfig
    from atoll.planner.plan import Plan
    from atoll.sync.launch import SiteHost
    from atoll.train.trainer import TrainResult

log = logging.getLogger("atoll")

WORKER_MODULE = "atoll.train"


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.config import RunConfig, load_config
    from atoll.train.setup import prepare_run

    if args.plan is not None:
        from atoll.planner.apply import describe, plan_overrides
        from atoll.planner.plan import load_plan

        plan = load_plan(args.plan)
        # With a topology, layouts that differ between sites go to each site's `parallel:`.
        plan_args, ignored = plan_overrides(plan, per_site=args.topology is not None)
        extra = [*plan_args, *extra]  # the command line still wins over the plan
        if ignored:
            log.warning("%s", describe(ignored))
    cfg = load_config(RunConfig, args.config, extra)
    if args.topology is not None:
        if args.plan is not None:
            args.topology = _planned_topology(args.topology, plan, plan_path=args.plan, run_root=cfg.run.path)
        return train_sites(cfg, args, extra)
    prepare_run(cfg, resume=args.resume, world_size=args.nproc)
    if args.nproc > 1:
        from atoll.parallel.launch import launch_local

        child_args = [str(args.config), *extra, *_child_flags(args)]
        log.info("launching %d local ranks", args.nproc)
        code = launch_local(child_args, nproc=args.nproc, module=WORKER_MODULE)
        if code == 0:
            print_summary_from_disk(cfg.run.path)
        return code
    result = _train_here(cfg, args)
    _print_summary(result)
    return 0


def _planned_topology(topology_path: Path, plan: Plan, *, plan_path: Path, run_root: Path) -> Path:
    """The topology to launch with: `topology_path` itself, or, when the plan gives sites
    different layouts, a copy with each site's layout in its `parallel:` entry, written to
    RUN/topology.yaml (the file the run report reads)."""
    from atoll.config.topology import load_topology
    from atoll.planner.apply import site_layouts, with_site_layouts
    from atoll.report.rundata import TOPOLOGY_FILE

    layouts = site_layouts(plan)
    if not layouts:
        return topology_path
    topology = with_site_layouts(load_topology(topology_path), layouts, plan_path=plan_path)
    out = run_root / TOPOLOGY_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(topology.model_dump(mode="json", exclude_defaults=True), sort_keys=False))
    log.info("sites take the plan's layouts: %s (topology %s)", layouts, out)
    return out


def _child_flags(args: argparse.Namespace) -> list[str]:
    """The flags of `args` that every launched rank gets too."""
    flags = []
    if args.resume:
        flags.append("--resume")
    if args.stop_after is not None:
        flags += ["--stop-after", str(args.stop_after)]
    if not want_progress(args):
        flags.append("--no-progress")
    return flags


def train_sites(
    cfg: RunConfig,
    args: argparse.Namespace,
    extra: list[str],
    *,
    host: SiteHost | None = None,
    wan_mode: str | None = None,
) -> int:
    """Train every site of ``args.topology`` on this machine; blocks; returns the exit code.

    Starts `atoll lighthouse` and one `atoll site` process per site (`atoll.sync.launch`); a site
    that dies is reported and, ``args.restart_sites`` times at most, restarted from its checkpoint,
    while the others go on. The sites run on loopback with the WAN emulated in the transport (`host` None), or inside
    the lab's namespaces (`host` a `atoll.lab.netns.Lab`). `args` are `atoll train`'s or
    `atoll lab run`'s parsed flags, `extra` the config overrides every rank gets; `wan_mode`
    overrides ``args.wan``. Raises `AtollError` for a topology or config that cannot run this way.
    """
    from atoll.config.topology import check_sites, load_topology
    from atoll.report.sites import SiteWatch
    from atoll.sync.launch import LoopbackHost, launch_sites
    from atoll.train.loop import site_steps
    from atoll.train.setup import prepare_run, site_config

    topology = load_topology(args.topology)
    if len(topology.sites) < 2:
        raise AtollError(f"topology {args.topology} has one site: train it without --topology")
    check_sites(topology, sync=cfg.sync, parallel=cfg.parallel, topology_path=args.topology)
    for site in topology.sites:
        prepare_run(site_config(cfg, site.name), resume=args.resume, world_size=args.ranks_per_site)
    mode = wan_mode or args.wan
    if mode == "emulated":
        log.info("WAN emulated in the transport (bandwidth and latency from %s)", args.topology)
    watch = None
    dirs = {s.name: site_config(cfg, s.name).run.path for s in topology.sites}
    if want_progress(args):
        totals = {s.name: site_steps(cfg.train.steps, cfg.sync, s.name) for s in topology.sites}
        watch = SiteWatch(dirs, total_steps=totals)
    # The launcher draws the sites' progress itself (`watch`); the ranks draw none.
    flags = [f for f in _child_flags(args) if f != "--no-progress"] + ["--no-progress"]
    code = launch_sites(
        [str(args.config), *extra, *flags],
        watch=watch,
        module=getattr(args, "worker", None) or WORKER_MODULE,
        topology=topology,
        topology_path=args.topology,
        ranks_per_site=args.ranks_per_site,
        wan_mode=mode,
        host=host or LoopbackHost(),
        min_sites=cfg.sync.min_sites,
        site_dirs=dirs,
        restarts=args.restart_sites,
    )
    for site in topology.sites:  # the sites that got anywhere, also when one was lost
        if (dirs[site.name] / "metrics.jsonl").is_file():
            print_summary_from_disk(dirs[site.name])
    _write_report(cfg.run.path, topology_path=args.topology, plan=getattr(args, "plan", None))
    if code == 0:
        from atoll.rundir.load import check_site_digests

        try:  # every site ended: they must hold one model (a site cut off may have finished alone)
            check_site_digests(cfg.run.path, require_all=False)
        except AtollError as exc:
            return fail(str(exc), code=RunFailure.exit_code)
    return code


def _write_report(run_root: Path, *, topology_path: Path, plan: Path | None) -> None:
    """Keep the topology (and plan) beside the sites and write RUN/report.html; a report that
    cannot be written is a warning, never a failed run."""
    from atoll.report.commands import write_run_report
    from atoll.report.rundata import PLAN_FILE, TOPOLOGY_FILE

    try:
        if Path(topology_path).resolve() != (run_root / TOPOLOGY_FILE).resolve():
            shutil.copyfile(topology_path, run_root / TOPOLOGY_FILE)
        if plan is not None:
            shutil.copyfile(plan, run_root / PLAN_FILE)
        page = write_run_report(run_root)
    except (AtollError, OSError) as exc:
        log.warning("no run report: %s", exc)
        return
    log.info("report: %s (open it in a browser)", page)


def _train_here(cfg: RunConfig, args: argparse.Namespace) -> TrainResult:
    from atoll.report.progress import NullProgress, ProgressSink, RichProgress
    from atoll.train.trainer import run_training

    progress: ProgressSink = RichProgress() if want_progress(args) and launched_rank() == 0 else NullProgress()
    return run_training(cfg, resume=args.resume, stop_after=args.stop_after, progress=progress)


def _print_summary(result: TrainResult) -> None:
    console = Console()
    state = "stopped at" if result.stopped_early else "finished at"
    parts = [f"run {result.run_dir} {state} step {result.step}"]
    if result.val_loss is not None:
        parts.append(f"validation loss {result.val_loss:.4f}")
    if result.tokens_per_s:
        parts.append(f"{result.tokens_per_s:,.0f} tokens/s (median)")
    console.print("; ".join(parts))
    if not result.stopped_early:
        console.print(f"next: atoll export {result.run_dir} {result.run_dir}/hf")


def print_summary_from_disk(run_dir: Path) -> None:
    """What a launcher prints once its ranks are done: the run's last step and validation loss."""
    from atoll.report.metrics import read_metrics

    records = read_metrics(run_dir)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    last = max((r["step"] for r in records), default=0)
    msg = f"run {run_dir} reached step {last}"
    if val:
        msg += f"; validation loss {val[-1]:.4f}"
    Console().print(msg)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One rank of a training run (`python -m atoll.train`), as torchrun or the launchers start it.

    Parses `argv` (default: the process's arguments), sets up logging with this rank's prefix,
    trains, and returns the exit code for ``__main__`` to exit with.
    """
    parser = argparse.ArgumentParser(prog="python -m atoll.train", description="One rank of an atoll training run.")
    _add_train_args(parser, with_nproc=False)
    args, extra = parser.parse_known_args(argv)
    setup_logging(rank=launched_rank(), verbose=args.verbose)
    return guarded(_run_worker)(args, extra)


def _run_worker(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.config import RunConfig, load_config

    # The launching command already warned about ignored keys: one warning, not one per rank.
    warn = launched_rank() == 0 and "ATOLL_LAUNCHED" not in os.environ
    cfg = load_config(RunConfig, args.config, extra, warn_ignored=warn)
    result = _train_here(cfg, args)
    if launched_rank() == 0 and "ATOLL_LAUNCHED" not in os.environ:  # else the launcher reports the outcome
        _print_summary(result)
    return 0


def _add_train_args(p: argparse.ArgumentParser, *, with_nproc: bool) -> None:
    """The flags of `atoll train` (`with_nproc`) or of one launched rank (without the launch flags)."""
    p.add_argument("config", type=Path, help="run config YAML (see examples/configs/)")
    if with_nproc:
        p.add_argument("--nproc", type=int, default=1, help="local ranks to start (like torchrun --nproc-per-node)")
        p.add_argument(
            "--plan",
            type=Path,
            default=None,
            help="take sync, batch and step settings from `atoll plan`'s plan.yaml (what cannot be honored is listed)",
        )
        p.add_argument(
            "--topology",
            type=Path,
            default=None,
            help="train several sites of this topology on this machine (see examples/topologies/)",
        )
        p.add_argument("--ranks-per-site", type=int, default=1, help="with --topology: local ranks per site")
        add_restart_flag(p, default=0)
        p.add_argument(
            "--wan",
            choices=["emulated", "none"],
            default="emulated",
            help="with --topology: emulate the links' bandwidth and latency in the transport, or not at all",
        )
        p.add_argument(
            "--worker",
            default=None,
            metavar="MODULE",
            help="with --topology: run this module on every rank instead of atoll.train"
            " (e.g. bench.torchft_peer, a baseline)",
        )
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest complete checkpoint")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and stop after STEP (to split a run across allocations)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also: ATOLL_NO_PROGRESS=1)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_restart_flag(p: argparse.ArgumentParser, *, default: int) -> None:
    """``--restart-sites N`` of the multi-site launchers (`atoll train --topology`, `atoll lab run`)."""
    p.add_argument(
        "--restart-sites",
        type=int,
        default=default,
        metavar="N",
        help=f"restart a site that dies up to N times, from its latest checkpoint (default {default})",
    )


def register(sub: Any) -> None:
    """Add `atoll train` to the CLI's sub-parsers `sub`."""
    p = sub.add_parser("train", help="pre-train a model on one site (N local ranks or under torchrun)")
    _add_train_args(p, with_nproc=True)
    p.set_defaults(func=_cmd_train, allow_overrides=True)
