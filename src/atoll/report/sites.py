"""A live view of a multi-site run for the launching terminal: one bar per site.

The launcher polls each site's ``metrics.jsonl`` (the ranks themselves draw nothing, so several
sites never scribble over one terminal) and shows step, loss, tokens/s and the megabytes the
site has sent over the WAN so far. A site the launcher restarted or lost says so beside its name;
a restarted site that resumes rewrites its metrics from its checkpoint on, and the view follows.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class SiteWatch:
    """Context manager; `refresh()` re-reads the sites' metrics and redraws."""

    def __init__(self, sites: dict[str, Path], *, total_steps: dict[str, int], console: Console | None = None) -> None:
        self._sites = sites
        self._offsets = {name: 0 for name in sites}
        self._progress = Progress(
            TextColumn("[bold]{task.description:>10}"),
            TextColumn("[yellow]{task.fields[state]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("[green]{task.fields[tps]}[/] tok/s"),
            TextColumn("WAN [magenta]{task.fields[wan]}[/] MB sent"),
            TextColumn("util {task.fields[util]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
        )
        self._tasks = {
            name: self._progress.add_task(
                name, total=total_steps[name], loss="-", tps="-", wan="0.0", util="-", state=""
            )
            for name in sites
        }

    def __enter__(self) -> SiteWatch:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.refresh()
        self._progress.stop()

    def mark(self, name: str, state: str) -> None:
        """Show `state` (e.g. "restarted 1x", "lost") beside the site's name."""
        self._progress.update(self._tasks[name], state=state)

    def refresh(self) -> None:
        for name, run_dir in self._sites.items():
            for record in self._read_new(name, run_dir / "metrics.jsonl"):
                fields: dict[str, str] = {}
                if "loss" in record:
                    fields["loss"] = f"{record['loss']:.4f}"
                if "tokens_per_s" in record:
                    fields["tps"] = f"{record['tokens_per_s']:,.0f}"
                if "wan_bytes_sent" in record:
                    fields["wan"] = f"{record['wan_bytes_sent'] / 1e6:.1f}"
                if "compute_utilization" in record:
                    fields["util"] = f"{record['compute_utilization']:.0%}"
                self._progress.update(self._tasks[name], completed=record.get("step", 0), **fields)

    def _read_new(self, name: str, path: Path) -> list[dict[str, object]]:
        if not path.exists():
            return []
        if path.stat().st_size < self._offsets[name]:  # a resumed site truncated its metrics: read again
            self._offsets[name] = 0
        with path.open("r", encoding="utf-8") as f:
            f.seek(self._offsets[name])
            data = f.read()
        complete, _, _ = data.rpartition("\n")
        if not complete:
            return []
        self._offsets[name] += len(complete.encode("utf-8")) + 1
        out = []
        for line in complete.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
