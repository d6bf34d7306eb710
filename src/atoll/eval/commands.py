"""`atoll eval` (registered through atoll.cli).

atoll eval RUN [RUN ...] --data NAME=PATH [--data NAME=PATH ...] [--json OUT.json] [--plot OUT.png]
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console

from atoll.errors import AtollError


def _cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.eval.evaluate import evaluate_stages
    from atoll.eval.heldout import parse_data_arg
    from atoll.eval.report import plot_results, results_table, write_results
    from atoll.parallel.dist import inference_device

    if args.max_tokens < 1 or args.batch_size < 1:
        raise AtollError("--max-tokens and --batch-size must be positive")
    command = _command_line(args)
    results = evaluate_stages(
        args.runs,
        [parse_data_arg(d) for d in args.data],
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        device=inference_device(args.device, threads=args.threads),
        allow_overlap=args.allow_overlap,
        command=command,
    )
    console = Console(highlight=False, soft_wrap=True)
    console.print(results_table(results))
    if args.json is not None:
        console.print(f"results: {write_results(results, args.json)}")
    if args.plot is not None:
        console.print(f"chart: {plot_results(results, args.plot)}")
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command as a user would retype it (recorded in the results)."""
    parts = ["atoll", "eval", *map(str, args.runs)]
    for d in args.data:
        parts += ["--data", d]
    for flag in ("seq_len", "max_tokens", "batch_size", "json", "plot"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    if args.allow_overlap:
        parts.append("--allow-overlap")
    if args.device != "auto":
        parts += ["--device", args.device]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return " ".join(shlex.quote(p) for p in parts)


def register(sub: Any) -> None:
    """Add `atoll eval` to the CLI's sub-parsers."""
    p = sub.add_parser(
        "eval", help="loss and perplexity of runs on several held-out sets (checked not to overlap training data)"
    )
    p.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="run directories (stages of a chain) or Hugging Face directories",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help=(
            "a held-out set: a prepared data directory (its validation split), a fine-tuning run (its "
            "held-out documents), a .jsonl file or text files (repeatable)"
        ),
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per scored window (default: the models' context, at most 1024)",
    )
    p.add_argument("--max-tokens", type=int, default=50_000, help="score at most this many tokens per set")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument("--json", type=Path, default=None, help="write the results record here")
    p.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) here")
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="score sets that share documents with training data (with a warning)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_eval, allow_overrides=False)
