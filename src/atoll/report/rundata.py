"""What a run report reads from a run directory: every site's records and the run's small files.

A run directory is one of (see `atoll.rundir.layout`):

- a single-site run: ``RUN/metrics.jsonl``;
- a multi-site pre-training run: ``RUN/sites/NAME/metrics.jsonl`` for every site;
- a multi-site fine-tuning stage: its first site in ``RUN`` itself, the others in ``RUN/sites/NAME``;
- a fine-tuning stage of any of these shapes has a ``lineage.json`` naming its parent.

Beside the records, a report uses the topology (links and their rates, devices for MFU), a plan
(predicted step time and utilization), and an evaluation table (`atoll eval --json`) when it can
find them: given by the caller, or as ``RUN/topology.yaml``, ``RUN/plan.yaml``, ``RUN/eval.json``
(or ``eval.json`` beside the stage, where `make finetune-demo` writes it). Pure reading: nothing
here writes. (Importing `atoll.rundir.layout` imports torch, through the model's config.)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atoll.errors import AtollError
from atoll.report.metrics import read_metrics
from atoll.rundir.layout import (
    CHECKPOINTS_DIR,
    FINAL_DIGEST_KEY,
    LINEAGE_JSON,
    MODEL_JSON,
    SITES_DIR,
    read_model_json,
    read_run_config,
)

if TYPE_CHECKING:
    from atoll.config.topology import Topology
    from atoll.model.config import ModelConfig
    from atoll.planner.plan import Plan

log = logging.getLogger(__name__)

TOPOLOGY_FILE = "topology.yaml"
"""A copy of the topology a multi-site run was launched with, when the launcher leaves one."""
PLAN_FILE = "plan.yaml"
"""A copy of the plan a run was trained from (`atoll train --plan`), when the launcher leaves one."""
EVAL_FILE = "eval.json"
"""`atoll eval --json`'s record, in the stage or beside it."""


@dataclass
class SiteRun:
    """One site's records, split by kind, in the order they were written."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[tuple[int, float]] = field(default_factory=list)
    """(step, unix time the checkpoint's directory was last written) of the checkpoints still on disk."""

    @property
    def steps(self) -> list[dict[str, Any]]:
        """The per-step records (those with a training loss)."""
        return [r for r in self.records if "loss" in r and "step_seconds" in r]

    @property
    def vals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "val_loss" in r]

    @property
    def guards(self) -> list[dict[str, Any]]:
        """What the step guard did: skipped, spike, rollback, rolled_back."""
        return [r for r in self.records if "guard" in r]

    @property
    def final(self) -> dict[str, Any] | None:
        """The record a multi-site run ends with (sync_applied, site events, θ digest), if any."""
        finals = [r for r in self.records if FINAL_DIGEST_KEY in r]
        return finals[-1] if finals else None

    @property
    def start_time(self) -> float | None:
        """Unix time the loop started: the first record (the loop logs one at its start), or
        before it by the first step record's `wall_seconds`; None for an empty site."""
        if not self.records:
            return None
        times = [float(self.records[0]["time"])]
        steps = self.steps
        if steps and "wall_seconds" in steps[0]:
            times.append(float(steps[0]["time"]) - float(steps[0]["wall_seconds"]))
        return min(times)

    def last(self, key: str, default: Any = None) -> Any:
        """The last value a record gave `key`."""
        for r in reversed(self.records):
            if key in r:
                return r[key]
        return default


@dataclass
class RunData:
    """A run as a report sees it."""

    path: Path
    label: str
    kind: str
    """"single-site", "multi-site", or a fine-tuning stage's method ("lora", "full")."""
    sites: list[SiteRun]
    config: dict[str, Any]
    model: ModelConfig | None = None
    topology: Topology | None = None
    plan: Plan | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)
    eval_results: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    """What the report could not find or derive, to print on the page instead of guessing."""

    @property
    def start_time(self) -> float:
        """The earliest record of any site: the zero of the page's wall-clock axes."""
        times = [s.start_time for s in self.sites if s.start_time is not None]
        return min(times) if times else 0.0

    @property
    def multi_site(self) -> bool:
        return len(self.sites) > 1


def checkpoint_times(run_dir: Path) -> list[tuple[int, float]]:
    """(step, mtime) of the complete checkpoints in `run_dir` (``checkpoints/step_N``): the
    directory's mtime is when its last file was written, about when the checkpoint finished."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d.stat().st_mtime))
    return sorted(found)


def _site(path: Path, name: str) -> SiteRun:
    return SiteRun(
        name=name,
        path=path,
        records=read_metrics(path),
        config=read_run_config(path),
        checkpoints=checkpoint_times(path),
    )


def _site_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / SITES_DIR
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if (d / "metrics.jsonl").is_file())


def find_sites(run_dir: Path, *, first_site: str | None = None) -> list[SiteRun]:
    """Every site of the run in `run_dir` with its records. `first_site` names a fine-tuning
    stage's first site, which lives in the directory itself (default: the run's own name).
    Raises AtollError when `run_dir` holds no metrics at all."""
    sites = []
    if (run_dir / "metrics.jsonl").is_file():
        sites.append(_site(run_dir, first_site or run_dir.name))
    sites += [_site(d, d.name) for d in _site_dirs(run_dir)]
    if not sites:
        raise AtollError(
            f"{run_dir} holds no metrics.jsonl (nor sites/NAME/metrics.jsonl): give a directory that "
            "`atoll train` or `atoll finetune` wrote"
        )
    return sites


def _model(run_dir: Path, sites: list[SiteRun]) -> ModelConfig | None:
    for d in [run_dir, *(s.path for s in sites)]:
        if (d / MODEL_JSON).is_file():
            try:
                return read_model_json(d)
            except (AtollError, TypeError) as exc:  # another atoll version's model.json
                log.warning("cannot read %s: %s", d / MODEL_JSON, exc)
                return None
    return None


def _topology(run_dir: Path, given: Path | None) -> Topology | None:
    from atoll.config.topology import load_topology

    path = given or (run_dir / TOPOLOGY_FILE)
    return load_topology(path) if path.is_file() or given is not None else None


def _plan(run_dir: Path, given: Path | None) -> Plan | None:
    from atoll.planner.plan import load_plan

    path = given or (run_dir / PLAN_FILE)
    return load_plan(path) if path.is_file() or given is not None else None


def _eval(run_dir: Path, given: Path | None) -> dict[str, Any] | None:
    candidates = [given] if given is not None else [run_dir / EVAL_FILE, run_dir.parent / EVAL_FILE]
    for path in candidates:
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise AtollError(f"{path} is not valid JSON ({exc}): give the file `atoll eval --json` wrote") from None
            if isinstance(data, dict) and "stages" in data and "sets" in data:
                return data
            if given is not None:
                raise AtollError(f"{path} is not an `atoll eval --json` record (no stages/sets)")
    return None


def _lineage(run_dir: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not (run_dir / LINEAGE_JSON).is_file():
        return []
    from atoll.rundir.lineage import lineage_chain

    try:
        return lineage_chain(run_dir)
    except AtollError as exc:  # a parent moved away: the page says so and shows the rest
        notes.append(f"lineage: {exc}")
        return []


def load_run(
    run_dir: Path,
    *,
    label: str | None = None,
    topology: Path | None = None,
    plan: Path | None = None,
    eval_json: Path | None = None,
) -> RunData:
    """Read the run in `run_dir` for a report. `topology`, `plan` and `eval_json` override the
    files found in the run directory. Raises AtollError for a directory without metrics or a
    given file that cannot be read."""
    run_dir = Path(run_dir)
    topo = _topology(run_dir, topology)
    first = topo.sites[0].name if topo is not None and (run_dir / SITES_DIR).is_dir() else None
    sites = find_sites(run_dir, first_site=first)
    if topo is not None:  # the topology's order (sites/ is listed by name)
        order = {s.name: i for i, s in enumerate(topo.sites)}
        sites.sort(key=lambda s: order.get(s.name, len(order)))
    notes: list[str] = []
    lineage = _lineage(run_dir, notes)
    if lineage:
        kind = str(lineage[-1].get("method", "stage"))
    else:
        kind = "multi-site" if len(sites) > 1 else "single-site"
    if topo is None and len(sites) > 1:
        notes.append(
            f"no topology: link rates, link shares and MFU are n/a (give --topology, or keep {TOPOLOGY_FILE} "
            "in the run directory)"
        )
    return RunData(
        path=run_dir,
        label=label or run_dir.name,
        kind=kind,
        sites=sites,
        config=sites[0].config,
        model=_model(run_dir, sites),
        topology=topo,
        plan=_plan(run_dir, plan),
        lineage=lineage,
        eval_results=_eval(run_dir, eval_json),
        notes=notes,
    )
