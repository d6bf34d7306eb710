"""Progress display for the main rank: a rich bar with step, loss, tokens/s and ETA.

The CLI decides whether a run shows one (`RichProgress`) or not (`NullProgress`); the trainer
only calls `start`, `update` and `stop`.
"""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressSink(Protocol):
    def start(self, *, total: int, completed: int, description: str) -> None: ...
    def update(self, *, completed: int, loss: float | None, tokens_per_s: float | None) -> None: ...
    def stop(self) -> None: ...


class NullProgress:
    def start(self, *, total: int, completed: int, description: str) -> None:
        pass

    def update(self, *, completed: int, loss: float | None, tokens_per_s: float | None) -> None:
        pass

    def stop(self) -> None:
        pass


class RichProgress:
    """A live bar on stderr. On a terminal it redraws; elsewhere rich prints it when it stops."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("[green]{task.fields[tps]}[/] tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
        )
        self._task: int | None = None

    def start(self, *, total: int, completed: int, description: str) -> None:
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, loss="-", tps="-")

    def update(self, *, completed: int, loss: float | None, tokens_per_s: float | None) -> None:
        if self._task is None:
            return
        fields: dict[str, str] = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if tokens_per_s is not None:
            fields["tps"] = f"{tokens_per_s:,.0f}"
        self._progress.update(self._task, completed=completed, **fields)

    def stop(self) -> None:
        self._progress.stop()
        self._task = None
