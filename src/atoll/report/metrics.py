"""One small interface for metrics, with JSON Lines and TensorBoard behind it.

Only the main rank writes. Each record is one line of ``metrics.jsonl``: ``{"step": N, "time":
unix seconds, key: value, ...}``; the same scalars go to TensorBoard under the run directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsWriter:
    """Append-only metrics for a run directory; safe to reopen when a run resumes."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            _truncate_after(path, resume_step)
        self._jsonl = path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run logged past the checkpoint we resume from.
            self._tb = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"), purge_step=(resume_step + 1) if resume_step is not None else None
            )
        except ImportError:  # tensorboard is a dependency; this only guards a broken install
            log.warning("tensorboard is not importable: metrics go to metrics.jsonl only")

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _truncate_after(path: Path, step: int) -> None:
    """Keep only records up to `step`: a resumed run rewrites what came after its checkpoint."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run, in order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
