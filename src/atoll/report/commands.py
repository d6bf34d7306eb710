"""The `report` verb: one self-contained HTML page for one run or several side by side.

    atoll report RUN [RUN ...] [--out FILE.html] [--topology T.yaml] [--plan PLAN.yaml] [--eval EVAL.json]

A multi-site run writes ``RUN/report.html`` at its end through `write_run_report`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from atoll.errors import AtollError

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
"""Where a run's own report goes: RUN/report.html."""


def write_run_report(
    run_dir: Path,
    *,
    out: Path | None = None,
    topology: Path | None = None,
    plan: Path | None = None,
) -> Path:
    """Write the report of the run in `run_dir` to `out` (default ``RUN/report.html``) and
    return its path. What a launcher calls when a multi-site run ends; `topology` is the file
    the run was launched with (without it, and without ``RUN/topology.yaml``, link rates and
    MFU read n/a). Blocks about two seconds, mostly importing torch (through
    `atoll.rundir.layout`'s model config), which a launcher has loaded already. Raises
    AtollError when `run_dir` holds no metrics or a given file cannot be read."""
    return write_report([Path(run_dir)], out=out or Path(run_dir) / REPORT_HTML, topology=topology, plan=plan)


def write_report(
    run_dirs: list[Path],
    *,
    out: Path,
    topology: Path | None = None,
    plan: Path | None = None,
    eval_json: Path | None = None,
) -> Path:
    """Write one page for `run_dirs` (side by side when several) to `out`; returns `out`.
    `topology`, `plan` and `eval_json` apply to every run. Raises AtollError for a directory
    without metrics or a file that cannot be read."""
    from atoll.report.page import render_report
    from atoll.report.rundata import load_run

    labels = _labels(run_dirs)
    runs = [
        load_run(d, label=label, topology=topology, plan=plan, eval_json=eval_json)
        for d, label in zip(run_dirs, labels)
    ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_report(runs), encoding="utf-8")
    tmp.replace(out)  # a browser reloading the page never reads half of it
    return out


def _labels(run_dirs: list[Path]) -> list[str]:
    """Short names for the runs: the directory names, or more of the path where they collide."""
    resolved = [d.resolve() for d in run_dirs]
    depth = 1
    while depth < 8:
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return [str(d) for d in run_dirs]


def _report(args: argparse.Namespace, extra: list[str]) -> int:
    from rich.console import Console

    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not r.is_dir():
            raise AtollError(f"{r} is not a directory: give the run directory `atoll train` or `atoll finetune` wrote")
    out = args.out if args.out is not None else (runs[0] / REPORT_HTML if len(runs) == 1 else Path("report.html"))
    path = write_report(runs, out=out, topology=args.topology, plan=args.plan, eval_json=args.eval)
    Console().print(f"report: {path} (self-contained; open it in any browser)")
    if args.screenshot is not None:
        from atoll.report.browser import screenshot

        Console().print(
            f"screenshot: {screenshot(path, args.screenshot, width=args.width, height=args.screenshot_height)}"
        )
    return 0


def register(sub: Any) -> None:
    """Add `atoll report` to the CLI's sub-parsers."""
    p = sub.add_parser(
        "report",
        help="an HTML page for one run or several side by side: loss, per-site timeline, WAN, utilization, agreement",
        description=(
            "Write one self-contained HTML page (inline SVG; opens offline) for a single-site, multi-site or "
            "fine-tuning run, or several runs side by side."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (several: side by side)")
    p.add_argument(
        "--out", type=Path, default=None, help=f"where to write the page (default: RUN_DIR/{REPORT_HTML} for one run)"
    )
    p.add_argument(
        "--topology",
        type=Path,
        default=None,
        help="the topology the runs used: link rates and devices (MFU); default RUN_DIR/topology.yaml when present",
    )
    p.add_argument(
        "--plan", type=Path, default=None, help="a plan.yaml to set predictions against (default RUN_DIR/plan.yaml)"
    )
    p.add_argument(
        "--eval",
        type=Path,
        default=None,
        help="`atoll eval --json` output for a chain's table (default eval.json in or beside RUN_DIR)",
    )
    p.add_argument(
        "--screenshot", type=Path, default=None, help="also save a PNG of the page, taken by headless Chromium"
    )
    p.add_argument("--width", type=int, default=1240, help="with --screenshot: the window's width in pixels")
    p.add_argument(
        "--screenshot-height", type=int, default=None, help="with --screenshot: only the top of the page, in pixels"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_report, allow_overrides=False)
