"""`atoll finetune`, `atoll lineage` and `atoll merge` (registered through atoll.cli), and the
worker entry ``python -m atoll.finetune``.

    atoll finetune FINETUNE.yaml [--nproc N | --topology T [--restart-sites N]] [--resume] [--section.key=value ...]
    atoll lineage RUN [--json]
    atoll merge RUN OUT [--arch auto|llama|qwen2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from atoll.console import guarded, launched_rank, setup_logging, want_progress
from atoll.errors import AtollError

log = logging.getLogger("atoll.finetune")


def _child_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--no-progress"]
    if args.resume:
        flags.append("--resume")
    if args.stop_after is not None:
        flags += ["--stop-after", str(args.stop_after)]
    return flags


def _cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.config import load_config
    from atoll.finetune.config import FinetuneConfig
    from atoll.finetune.setup import prepare_finetune

    cfg = load_config(FinetuneConfig, args.config, extra)
    prepare_finetune(cfg, resume=args.resume)
    child_args = [str(args.config), *extra, *_child_flags(args)]
    if args.topology is not None:
        code = _finetune_sites(cfg, args, child_args)
    elif args.nproc > 1:
        from atoll.parallel.launch import launch_local

        log.info("launching %d local ranks", args.nproc)
        code = launch_local(child_args, nproc=args.nproc, module="atoll.finetune")
    else:
        from atoll.finetune.trainer import run_finetune
        from atoll.report.progress import NullProgress, RichProgress

        progress = RichProgress() if want_progress(args) else NullProgress()
        run_finetune(cfg, resume=args.resume, stop_after=args.stop_after, progress=progress)
        code = 0
    if code == 0:
        _print_stage_summary(cfg.run.path)
    return code


def _finetune_sites(cfg: Any, args: argparse.Namespace, child_args: list[str]) -> int:
    from atoll.config.topology import check_sites, load_topology
    from atoll.finetune.trainer import site_stage_dir
    from atoll.sync.launch import LoopbackHost, launch_sites

    topology = load_topology(args.topology)
    if len(topology.sites) < 2:
        raise AtollError(f"topology {args.topology} has one site: fine-tune without --topology")
    check_sites(topology, sync=cfg.sync, parallel=cfg.parallel, topology_path=args.topology)
    log.info("fine-tuning on %d sites; only trainable parameters cross the WAN (%s)", len(topology.sites), args.wan)
    return launch_sites(
        child_args,
        topology=topology,
        topology_path=args.topology,
        ranks_per_site=args.ranks_per_site,
        wan_mode=args.wan,
        host=LoopbackHost(),
        min_sites=cfg.sync.min_sites,
        site_dirs={s.name: site_stage_dir(cfg.run.path, s.name, index=i) for i, s in enumerate(topology.sites)},
        restarts=args.restart_sites,
        module="atoll.finetune",
    )


def _print_stage_summary(run_dir: Path) -> None:
    from atoll.rundir.lineage import read_lineage

    lineage = read_lineage(run_dir)
    parts = [
        f"stage {run_dir} ({lineage['method']}) {lineage['status']} at step "
        f"{lineage['steps']}/{lineage['planned_steps']}"
    ]
    if lineage.get("val_loss") is not None:
        parts.append(f"held-out loss {lineage['val_loss']:.4f}")
    parts.append(f"{lineage['trainable_params']:,} trainable parameters")
    if lineage.get("wan"):
        parts.append(f"{lineage['wan']['bytes_sent_by_first_site'] / 1e6:.2f} MB sent over the WAN by the first site")
    console = Console(highlight=False, soft_wrap=True)
    console.print("; ".join(parts))
    if lineage["status"] == "finished":
        console.print(
            f"next: atoll eval {run_dir} --data NAME=PATH | atoll generate {run_dir} --prompt TEXT "
            f"| atoll serve {run_dir} | atoll merge {run_dir} OUT"
        )


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One rank of a fine-tuning stage (`python -m atoll.finetune`), as torchrun or the launchers start it.

    Parses `argv` (default: the process's arguments), sets up logging with this rank's prefix,
    trains, and returns the exit code for ``__main__`` to exit with.
    """
    parser = argparse.ArgumentParser(
        prog="python -m atoll.finetune", description="One rank of an atoll fine-tuning stage."
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args, extra = parser.parse_known_args(argv)
    setup_logging(rank=launched_rank(), verbose=args.verbose)
    return guarded(_run_worker)(args, extra)


def _run_worker(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.config import load_config
    from atoll.finetune.config import FinetuneConfig
    from atoll.finetune.trainer import run_finetune, site_stage_dir
    from atoll.sync.site_env import SiteEnv

    launched = "ATOLL_LAUNCHED" in os.environ  # the atoll launcher prepared the stage already
    cfg = load_config(FinetuneConfig, args.config, extra, warn_ignored=not launched and launched_rank() == 0)
    result = run_finetune(cfg, resume=args.resume, stop_after=args.stop_after, prepared=launched)
    if not launched and launched_rank() == 0:
        site = SiteEnv.from_environ()
        if site is None or site.index == 0:
            _print_stage_summary(cfg.run.path)
        else:  # `atoll site --finetune` on another data center: the stage's record is the first site's
            print(
                f"site {site.site}: stage {cfg.run.name} at step {result.step}/{result.total_steps}; its checkpoints "
                f"and metrics: {site_stage_dir(cfg.run.path, site.site, index=site.index)} (the first site writes "
                "the stage's lineage and adapter)",
                flush=True,
            )
    return 0


# ---------------------------------------------------------------- lineage


def _fmt_count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _data_line(data: dict[str, Any] | None) -> str:
    if not data:
        return "unknown"
    if "sources_sha256" in data:
        docs, tokens = data["documents"], data["tokens"]
        return (
            f"{data['format']} from {', '.join(data['paths'])}: {docs['train']} documents / "
            f"{tokens['train']:,} tokens trained, "
            f"{docs['validation']} held out; sources sha256 {data['sources_sha256'][:16]}, data.json "
            f"sha256 {data['data_json_sha256'][:16]}"
        )
    if data.get("manifest_sha256"):
        return f"{data['dir']} (manifest.json sha256 {data['manifest_sha256'][:16]})"
    return f"{data.get('dir', '?')} (no manifest found)"


def _cmd_lineage(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.rundir.lineage import lineage_chain

    chain = lineage_chain(args.run)
    if args.json:
        print(json.dumps(chain, indent=1, default=str))
        return 0
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"lineage of {args.run}, root first:")
    for i, rec in enumerate(chain):
        method = rec["method"]
        if rec.get("lora"):
            lora = rec["lora"]
            method += f" (r={lora['rank']}, alpha={lora['alpha']:g}, {', '.join(lora['target_modules'])})"
        console.print(f"[bold]{i}. {rec['stage']}[/]: {method}", markup=True)
        console.print(f"     path       {rec['path']}")
        if rec.get("parent"):
            console.print(f"     parent     {rec['parent']}")
        console.print(
            f"     trained    {_fmt_count(rec.get('steps'))} steps, {_fmt_count(rec.get('tokens'))} "
            f"tokens, {_fmt_count(rec.get('trainable_params'))} trainable of "
            f"{_fmt_count(rec.get('total_params'))} parameters" + (f" ({rec['status']})" if rec.get("status") else "")
        )
        console.print(f"     data       {_data_line(rec.get('data'))}")
        if rec.get("val_loss") is not None:
            console.print(f"     held-out   loss {rec['val_loss']:.4f}")
    return 0


# ---------------------------------------------------------------- merge


def _cmd_merge(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.export import merge_stage

    out = merge_stage(args.run, args.out_dir, arch=args.arch)
    Console(highlight=False, soft_wrap=True).print(
        f"merged {args.run} into {out} (load with transformers.AutoModelForCausalLM.from_pretrained)"
    )
    return 0


def register(sub: Any) -> None:
    """Add `atoll finetune`, `atoll lineage` and `atoll merge` to the CLI's sub-parsers."""
    from atoll.train.commands import add_restart_flag

    p = sub.add_parser(
        "finetune", help="adapt a model to a domain: LoRA or full fine-tuning from a run or a Hugging Face directory"
    )
    p.add_argument("config", type=Path, help="fine-tuning config YAML (see examples/finetune/)")
    p.add_argument("--nproc", type=int, default=1, help="local ranks to start (DDP)")
    p.add_argument(
        "--topology",
        type=Path,
        default=None,
        help="fine-tune on every site of this topology (only trainable parameters cross the WAN)",
    )
    p.add_argument("--ranks-per-site", type=int, default=1, help="with --topology: local ranks per site")
    add_restart_flag(p, default=0)
    p.add_argument(
        "--wan",
        choices=["emulated", "none"],
        default="emulated",
        help="with --topology: emulate the links in the transport, or not",
    )
    p.add_argument("--resume", action="store_true", help="continue from the stage's latest complete checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="checkpoint and stop after STEP")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also: ATOLL_NO_PROGRESS=1)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_finetune, allow_overrides=True)

    p = sub.add_parser("lineage", help="print the chain of stages a run came from (base, data hashes, method, steps)")
    p.add_argument("run", type=Path, help="a run directory or Hugging Face directory")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_lineage, allow_overrides=False)

    p = sub.add_parser("merge", help="write a stage (LoRA adapters merged into its base) as a plain Hugging Face model")
    p.add_argument("run", type=Path, help="a fine-tuning or pre-training run directory")
    p.add_argument(
        "out_dir", type=Path, help="output directory (config.json, model.safetensors, tokenizer, chat template)"
    )
    p.add_argument(
        "--arch",
        choices=["auto", "llama", "qwen2"],
        default="auto",
        help="Hugging Face architecture (auto: qwen2 when q/k/v have bias)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_merge, allow_overrides=False)
