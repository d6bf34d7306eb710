"""The `atoll` command. The only module that exits, prints errors or configures logging.

A user's mistake (`AtollError`) is one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from atoll import __version__
from atoll.errors import AtollError

log = logging.getLogger("atoll")

COMMAND_MODULES: list[str] = ["atoll.data.commands", "atoll.lab.commands", "atoll.planner.commands", "atoll.planner.calibrate", "atoll.finetune.commands", "atoll.eval.commands", "atoll.serve.commands"]
EXIT_USER_ERROR = 2


def _setup_logging(*, rank: int = 0, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False, markup=False)
    fmt = "%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("atoll").setLevel(level)
    logging.getLogger("torchft").setLevel(logging.ERROR)  # per-quorum chatter and CUDA-only warnings


def _fail(message: str) -> int:
    print(f"atoll: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _guarded(fn: Callable[[argparse.Namespace, list[str]], int]) -> Callable[[argparse.Namespace, list[str]], int]:
    def run(args: argparse.Namespace, extra: list[str]) -> int:
        try:
            return fn(args, extra)
        except AtollError as exc:
            return _fail(str(exc))
        except KeyboardInterrupt:
            print("atoll: interrupted; the last complete checkpoint is kept", file=sys.stderr)
            return 130

    return run


# ---------------------------------------------------------------- train


def _want_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and os.environ.get("ATOLL_NO_PROGRESS", "") in ("", "0")


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.config import RunConfig, load_config
    from atoll.train.setup import prepare_run

    if args.plan is not None:
        from atoll.planner.apply import describe, plan_overrides
        from atoll.planner.plan import load_plan

        plan_args, ignored = plan_overrides(load_plan(args.plan))
        extra = [*plan_args, *extra]  # the command line still wins over the plan
        if ignored:
            log.warning("%s", describe(ignored))
    cfg = load_config(RunConfig, args.config, extra)
    if args.topology is not None:
        return _train_sites(cfg, args, extra)
    prepare_run(cfg, resume=args.resume)
    if args.nproc > 1:
        from atoll.parallel.launch import launch_local

        child_args = [str(args.config), *extra, *_child_flags(args)]
        log.info("launching %d local ranks", args.nproc)
        code = launch_local(child_args, nproc=args.nproc)
        if code == 0:
            _print_summary_from_disk(cfg.run.path)
        return code
    result = _train_here(cfg, args)
    _print_summary(result)
    return 0


def _child_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    if args.resume:
        flags.append("--resume")
    if args.stop_after is not None:
        flags += ["--stop-after", str(args.stop_after)]
    if not _want_progress(args):
        flags.append("--no-progress")
    return flags


def _train_sites(cfg: object, args: argparse.Namespace, extra: list[str], *, host: object | None = None, wan_mode: str | None = None) -> int:
    """Several sites on this machine: loopback with the WAN emulated, or the lab's namespaces."""
    from atoll.config import RunConfig
    from atoll.config.topology import load_topology
    from atoll.sync.launch import LoopbackHost, launch_sites
    from atoll.train.setup import prepare_run, site_config

    assert isinstance(cfg, RunConfig)
    topology = load_topology(args.topology)
    if len(topology.sites) < 2:
        raise AtollError(f"topology {args.topology} has one site: train it without --topology")
    if cfg.parallel.shard != "ddp":
        raise AtollError("multi-site training uses parallel.shard=ddp inside each site (FSDP2 sites are not supported yet)")
    for name in cfg.sync.site_inner_steps:
        if name not in [s.name for s in topology.sites]:
            raise AtollError(f"sync.site_inner_steps names {name!r}, which is not a site of {args.topology}")
    for site in topology.sites:
        prepare_run(site_config(cfg, site.name), resume=args.resume)
    mode = wan_mode or args.wan
    if mode == "emulated":
        log.info("WAN emulated in the transport (bandwidth and latency from %s)", args.topology)
    from atoll.report.sites import SiteWatch
    from atoll.train.trainer import site_steps

    watch = None
    if _want_progress(args):
        dirs = {s.name: site_config(cfg, s.name).run.path for s in topology.sites}
        totals = {s.name: site_steps(cfg, s.name) for s in topology.sites}
        watch = SiteWatch(dirs, total_steps=totals)
    flags = [f for f in _child_flags(args) if f != "--no-progress"] + ["--no-progress"]
    code = launch_sites(
        [str(args.config), *extra, *flags],
        watch=watch,
        module=getattr(args, "worker", None) or "atoll.train",
        topology=topology,
        topology_path=args.topology,
        ranks_per_site=args.ranks_per_site,
        wan_mode=mode,
        host=host or LoopbackHost(),  # type: ignore[arg-type]
        min_sites=cfg.sync.min_sites,
    )
    if code == 0:
        for site in topology.sites:
            _print_summary_from_disk(site_config(cfg, site.name).run.path)
    return code


def _train_here(cfg: object, args: argparse.Namespace) -> object:
    from atoll.report.progress import NullProgress, RichProgress
    from atoll.train.trainer import run_training

    progress = RichProgress() if _want_progress(args) and int(os.environ.get("RANK", "0")) == 0 else NullProgress()
    return run_training(cfg, resume=args.resume, stop_after=args.stop_after, progress=progress)  # type: ignore[arg-type]


def _print_summary(result: object) -> None:
    from atoll.train.trainer import TrainResult

    assert isinstance(result, TrainResult)
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


def _print_summary_from_disk(run_dir: Path) -> None:
    from atoll.report.metrics import read_metrics

    records = read_metrics(run_dir)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    last = max((r["step"] for r in records), default=0)
    msg = f"run {run_dir} reached step {last}"
    if val:
        msg += f"; validation loss {val[-1]:.4f}"
    Console().print(msg)


def worker_main(argv: Sequence[str] | None = None) -> None:
    """Entry of one rank (`python -m atoll.train`), as torchrun or `atoll train --nproc` start it."""
    parser = argparse.ArgumentParser(prog="python -m atoll.train", description="One rank of an atoll training run.")
    _add_train_args(parser, with_nproc=False)
    args, extra = parser.parse_known_args(argv)
    _setup_logging(rank=int(os.environ.get("RANK", "0")), verbose=args.verbose)

    @_guarded
    def run(a: argparse.Namespace, e: list[str]) -> int:
        from atoll.config import RunConfig, load_config

        cfg = load_config(RunConfig, a.config, e)
        result = _train_here(cfg, a)
        if int(os.environ.get("RANK", "0")) == 0 and "ATOLL_LAUNCHED" not in os.environ:
            _print_summary(result)
        return 0

    sys.exit(run(args, extra))


def _add_train_args(p: argparse.ArgumentParser, *, with_nproc: bool) -> None:
    p.add_argument("config", type=Path, help="run config YAML (see examples/configs/)")
    if with_nproc:
        p.add_argument("--nproc", type=int, default=1, help="local ranks to start (like torchrun --nproc-per-node)")
        p.add_argument("--plan", type=Path, default=None, help="take sync, batch and step settings from `atoll plan`'s plan.yaml (what cannot be honored is listed)")
        p.add_argument("--topology", type=Path, default=None, help="train several sites of this topology on this machine (see examples/topologies/)")
        p.add_argument("--ranks-per-site", type=int, default=1, help="with --topology: local ranks per site")
        p.add_argument("--wan", choices=["emulated", "none"], default="emulated", help="with --topology: emulate the links' bandwidth and latency in the transport, or not at all")
        p.add_argument("--worker", default=None, metavar="MODULE", help="with --topology: run this module on every rank instead of atoll.train (e.g. bench.torchft_peer, a baseline)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest complete checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="checkpoint and stop after STEP (to split a run across allocations)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also: ATOLL_NO_PROGRESS=1)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


# ---------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.export import export_run, sample_with_transformers

    if extra:
        return _fail(f"unexpected arguments {' '.join(extra)}")
    out = export_run(args.run_dir, args.out_dir, arch=args.arch, step=args.step)
    Console().print(f"exported {args.run_dir} to {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    if args.sample is not None:
        text = sample_with_transformers(out, args.sample, max_new_tokens=args.max_new_tokens, seed=args.seed)
        Console().print(f"[bold]transformers sample[/]: {text}", markup=True, highlight=False)
    return 0


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atoll",
        description="Train one language model across a computing power network.",
        epilog="Config overrides: any --section.key=value after the config file (e.g. --train.steps=100).",
    )
    parser.add_argument("--version", action="version", version=f"atoll {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("train", help="pre-train a model on one site (N local ranks or under torchrun)")
    _add_train_args(p, with_nproc=True)
    p.set_defaults(func=_cmd_train, allow_overrides=True)

    p = sub.add_parser("export", help="write a run's weights as a Hugging Face directory")
    p.add_argument("run_dir", type=Path, help="run directory written by `atoll train`")
    p.add_argument("out_dir", type=Path, help="output directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--arch", choices=["auto", "llama", "qwen2"], default="auto", help="Hugging Face architecture (auto: qwen2 when q/k/v have bias)")
    p.add_argument("--step", type=int, default=None, help="export this checkpoint step (default: the latest)")
    p.add_argument("--sample", metavar="PROMPT", default=None, help="after export, load it with transformers and continue PROMPT")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_export, allow_overrides=False)

    # Verbs owned by other packages: each module's register(sub) adds its own sub-parsers with
    # set_defaults(func=handler(args, extra) -> exit code, allow_overrides=bool).
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "allow_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(verbose=getattr(args, "verbose", False))
    sys.exit(_guarded(args.func)(args, extra))


if __name__ == "__main__":
    main()
