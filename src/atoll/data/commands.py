"""`atoll data prepare DATA.yaml` and `atoll data report DIR`: the data verbs of the CLI.

`register(sub)` adds them to `atoll`'s sub-parsers. Handlers return an exit code; a user's
mistake raises `AtollError`, which `atoll.console.guarded` prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from atoll.console import want_progress
from atoll.errors import AtollError


class RichStageProgress:
    """One rich bar per stage on stderr (a redrawn bar on a terminal, a final line elsewhere)."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("units"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task: TaskID | None = None

    def start(self, stage: str, *, total: int, completed: int = 0) -> None:
        if self._task is None:
            self._progress.start()
        self._task = self._progress.add_task(stage, total=total, completed=completed)

    def advance(self, count: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, count)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self._progress.stop()


def _cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.config.load import load_config
    from atoll.data.config import DataConfig
    from atoll.data.pipeline import prepare
    from atoll.data.report import REPORT_MD

    cfg = load_config(DataConfig, args.config, extra)
    updates: dict[str, object] = {}
    if args.output is not None:
        updates["output"] = args.output
    if args.workers is not None:
        if args.workers < 1:
            raise AtollError(f"--workers must be at least 1, got {args.workers}")
        updates["workers"] = args.workers
    if updates:
        cfg = cfg.model_copy(update=updates)
    err = Console(stderr=True)
    progress = RichStageProgress(err) if want_progress(args) else None
    try:
        result = prepare(cfg, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    _print_tables(result.report)
    Console().print(
        f"wrote {cfg.output} (manifest.json, {REPORT_MD}); train on it with --data.dir={cfg.output} --data.prepare=none"
    )
    return 0


def _resolve_data_dir(path: Path) -> Path:
    from atoll.config.load import read_yaml

    if (path / "manifest.json").is_file() or (path / "report.json").is_file():
        return path
    config = path / "config.yaml"
    if config.is_file():
        data_dir = read_yaml(config).get("data", {}).get("dir")
        if data_dir:
            return Path(data_dir)
    raise AtollError(
        f"{path} is neither a prepared data directory (manifest.json) nor a run directory (config.yaml "
        "with data.dir): give one of those"
    )


def _cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.data.report import REPORT_MD, load_report, render_markdown

    if extra:
        raise AtollError(f"unexpected arguments {' '.join(extra)}: atoll data report takes a directory")
    data_dir = _resolve_data_dir(args.path)
    report = load_report(data_dir)
    _print_tables(report)
    out = args.out if args.out is not None else data_dir / REPORT_MD
    out.write_text(render_markdown(report), encoding="utf-8")
    Console().print(f"wrote {out}")
    return 0


def _print_tables(report: dict[str, object]) -> None:
    from atoll.data.report import report_tables

    console = Console()
    for title, header, rows in report_tables(report):  # type: ignore[arg-type]
        table = Table(title=title, title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `atoll data prepare` and `atoll data report` to the CLI's sub-parsers."""
    data = sub.add_parser("data", help="prepare training data (clean, dedup, tokenize, shard) and report on it")
    verbs = data.add_subparsers(dest="data_verb", metavar="VERB", required=True)

    p = verbs.add_parser(
        "prepare",
        help="raw text -> clean, deduplicated, tokenized, site-placed shards with a manifest (resumable)",
        epilog="Config overrides: any --section.key=value after DATA.yaml (e.g. --dedup.near.threshold=0.8).",
    )
    p.add_argument("config", type=Path, help="data config YAML (see examples/data/)")
    p.add_argument("--output", type=Path, default=None, help="data directory to write (overrides `output`)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (overrides `workers`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also: ATOLL_NO_PROGRESS=1)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_prepare, allow_overrides=True)

    p = verbs.add_parser(
        "report",
        help=(
            "print a data directory's report (input, filters, duplicates, tokens per split and site) and "
            "write it as Markdown"
        ),
    )
    p.add_argument("path", type=Path, help="a data directory, or a run directory (its config's data.dir)")
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: DATA_DIR/report.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_report, allow_overrides=False)


__all__ = ["register"]
