"""How the pipeline reports progress: one bar per stage, advanced per completed unit.

The pipeline only calls this protocol; the CLI decides whether a rich bar is drawn
(`atoll.data.commands`), so library code never prints.
"""

from __future__ import annotations

from typing import Protocol


class StageProgress(Protocol):
    def start(self, stage: str, *, total: int, completed: int = 0) -> None: ...
    def advance(self, count: int = 1) -> None: ...
    def finish(self) -> None: ...


class NullStageProgress:
    """Draws nothing."""

    def start(self, stage: str, *, total: int, completed: int = 0) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass
