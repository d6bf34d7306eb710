"""Run directories for the report's tests, written record by record as the loop writes them.

`fake_run` makes a multi-site (or single-site) DiLoCo run with known timings: every step
computes `compute` seconds (times the site's slowdown), every H-th step waits `wait` seconds for
an exchange, evaluation and checkpoints at fixed steps, and optional failures: a skipped step,
a failed exchange, a heal and a dropped-then-rejoined site. No torch, no process: milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

from atoll.model.config import get_preset

TOPOLOGY = {
    "name": "fake-three",
    "sites": [
        {"name": "east", "devices": [{"kind": "cpu", "count": 1, "per_node": 1}]},
        {"name": "west", "devices": [{"kind": "cpu", "count": 1, "per_node": 1, "slowdown": 2.0}]},
        {"name": "north", "devices": [{"kind": "cpu", "count": 1, "per_node": 1}]},
    ],
    "links": [
        {"site": "east", "uplink_mbps": 10, "latency_ms": 5},
        {"site": "west", "uplink_mbps": 4, "latency_ms": 20},
        {"site": "north", "uplink_mbps": 10, "latency_ms": 5},
    ],
    "lighthouse": {"site": "east"},
}


def write_site(
    path: Path,
    *,
    steps: int = 20,
    inner_steps: int = 5,
    compute: float = 0.1,
    wait: float = 0.3,
    slowdown: float = 1.0,
    multi_site: bool = True,
    failures: bool = False,
    digest: str = "ab" * 32,
    t0: float = 1_700_000_000.0,
    exact: bool = False,
) -> list[dict[str, Any]]:
    """Write one site's run directory (metrics, model.json, config.yaml, checkpoints); returns
    the records. `exact`: also the records today's loop writes for exact bars (``exchange``
    states, `eval_seconds`, ``checkpoint`` records), with evaluations of 0.03 s in a 0.04 s gap,
    and only the last checkpoint left on disk (the others pruned)."""
    path.mkdir(parents=True, exist_ok=True)
    model = get_preset("tiny")
    (path / "model.json").write_text(json.dumps(dataclasses.asdict(model)), encoding="utf-8")
    config = {
        "run": {"name": path.name},
        "data": {"seq_len": 128},
        "sync": {"strategy": "diloco", "inner_steps": inner_steps, "codec": "int8", "block_size": 128},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    records: list[dict[str, Any]] = [{"step": 0, "time": t0, "train_tokens": 1000}]
    t, comp, waited, wan_s, sent, exchanges = t0, 0.0, 0.0, 0.0, 0, 0
    applied = []
    for step in range(1, steps + 1):
        c = compute * slowdown
        t += c
        comp += c
        w = 0.0
        if multi_site and step % inner_steps == 0:
            w = wait + (compute * 2 - c if slowdown == 1.0 else 0.0)  # the fast sites wait for the slow one
            round_ = step // inner_steps
            if exact:
                records.append(_exchange(step, t, "sending", round_))
            t += w
            waited += w
            wan_s += wait
            sent += 100_000
            exchanges += 1
            applied.append([step, step])
            if exact:
                state = "failed" if failures and step == 10 else "applied"
                records.append(_exchange(step, t, state, round_))
        if failures and step == 7:
            records.append({"step": step, "time": t, "guard": "skipped", "reason": "non-finite loss"})
        rec: dict[str, Any] = {
            "step": step,
            "time": t,
            "loss": 7.0 - 0.05 * step,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens_per_s": 1024 / (c + w),
            "tokens_seen": 1024 * step,
            "step_seconds": c + w,
            "compute_seconds": comp,
            "wall_seconds": t - t0,
            "compute_utilization": comp / (t - t0),
        }
        if multi_site:
            rec.update(
                wan_bytes_sent=sent,
                wan_bytes_received=sent * 2,
                wan_exchanges=exchanges,
                wan_seconds=wan_s,
                wan_failed=1 if failures and step >= 10 else 0,
                sync_wait_seconds=waited,
                sync_rejected=0,
                sync_refused=0,
                sync_disagreements=0,
                heals=1 if failures and step >= 15 else 0,
                heal_bytes=50_000 if failures and step >= 15 else 0,
                heal_seconds=0.05 if failures and step >= 15 else 0.0,
                params_checksum=float(step // inner_steps) if step % inner_steps == 0 else t,
            )
        records.append(rec)
        if step % 10 == 0:
            t += 0.04
            val: dict[str, Any] = {"step": step, "time": t, "val_loss": 6.9 - 0.04 * step}
            if exact:
                val["eval_seconds"] = 0.03
            records.append(val)
            t += 0.06
            if exact:
                records.append({"step": step, "time": t, "checkpoint": step, "checkpoint_seconds": 0.05})
            if not exact or step == steps:
                ckpt = path / "checkpoints" / f"step_{step:08d}"
                ckpt.mkdir(parents=True, exist_ok=True)
                os.utime(ckpt, (t, t))
    if multi_site:
        events = []
        if failures:
            events = [
                {"event": "dropped", "site": "north", "step": 10, "round": 2, "time": t0 + 1.5},
                {"event": "rejoined", "site": "north", "step": 15, "round": 3, "time": t0 + 2.2, "rounds_missed": 1},
            ]
        t += 0.01
        last = next(r for r in reversed(records) if "wan_bytes_sent" in r)
        final = {k: v for k, v in last.items() if k.startswith(("wan_", "sync_", "heal"))}
        records.append(
            {
                "step": steps,
                "time": t,
                **final,
                "sync_applied": applied,
                "sync_site_events": events,
                "theta_digest": digest,
            }
        )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def _exchange(step: int, t: float, state: str, round_: int) -> dict[str, Any]:
    return {"step": step, "time": t, "exchange": state, "exchange_round": round_, "exchange_unit": "model"}


def fake_run(
    root: Path,
    *,
    sites: tuple[str, ...] = ("east", "west", "north"),
    failures: bool = False,
    digests: dict[str, str] | None = None,
    topology: bool = True,
    **kwargs: Any,
) -> Path:
    """A multi-site run at `root` (RUN/sites/NAME) with the topology copied in; returns `root`."""
    for name in sites:
        slowdown = next(
            (d.get("slowdown", 1.0) for s in TOPOLOGY["sites"] if s["name"] == name for d in s["devices"]), 1.0
        )
        write_site(
            root / "sites" / name,
            slowdown=slowdown,
            failures=failures,
            digest=(digests or {}).get(name, "ab" * 32),
            **kwargs,
        )
    if topology:
        (root / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY), encoding="utf-8")
    return root


def fake_single(root: Path, **kwargs: Any) -> Path:
    """A single-site run at `root`."""
    write_site(root, multi_site=False, **kwargs)
    return root
