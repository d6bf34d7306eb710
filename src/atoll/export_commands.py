"""`atoll export RUN OUT`: a run's weights as a Hugging Face directory (registered through atoll.cli).

Kept apart from `atoll.export`, which imports torch and the model: building the `atoll` parser
imports every verb's module, and no verb should pay for torch before it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from atoll.errors import AtollError


def register(sub: Any) -> None:
    """Add `atoll export` to the CLI's sub-parsers `sub`."""
    p = sub.add_parser("export", help="write a run's weights as a Hugging Face directory")
    p.add_argument("run_dir", type=Path, help="run directory written by `atoll train`")
    p.add_argument("out_dir", type=Path, help="output directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument(
        "--arch",
        choices=["auto", "llama", "qwen2"],
        default="auto",
        help="Hugging Face architecture (auto: qwen2 when q/k/v have bias)",
    )
    p.add_argument("--step", type=int, default=None, help="export this checkpoint step (default: the latest)")
    p.add_argument(
        "--sample", metavar="PROMPT", default=None, help="after export, load it with transformers and continue PROMPT"
    )
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_export, allow_overrides=False)


def _cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from rich.console import Console

    from atoll.export import export_run, sample_with_transformers

    if extra:
        raise AtollError(f"unexpected arguments {' '.join(extra)}")
    out = export_run(args.run_dir, args.out_dir, arch=args.arch, step=args.step)
    console = Console()
    console.print(f"exported {args.run_dir} to {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    if args.sample is not None:
        text = sample_with_transformers(out, args.sample, max_new_tokens=args.max_new_tokens, seed=args.seed)
        console.print(f"[bold]transformers sample[/]: {text}", markup=True, highlight=False)
    return 0
