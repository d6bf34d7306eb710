"""The sync engine's checkpointed state and metrics: one rank's share, keyed by the pieces it exchanges.

`sync_state`, `load_sync_state`, `sync_metrics` and `final_sync_metrics` are `CrossSiteSync`'s
`state_dict`, `load_state_dict`, `metrics` and `final_metrics`; they live here to keep the
engine's module to its rounds. Anchors, codec residuals and outer state are
keyed by piece (`atoll.sync.lanes`: a parameter's name, or name[block] for a shard), so a
checkpoint resumes on a site of the same layout and lane plan.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from atoll.sync.digest import FINAL_DIGEST_KEY, site_checksum, site_digest
from atoll.sync.rounds import Pending
from atoll.sync.transport import Gathered

COUNTS = ("rejected", "refused", "heals", "heals_served", "heal_bytes", "heal_seconds", "disagreements")
_PENDING_KEYS = ("apply_at", "sent", "previous_anchor", "result", "like", "sent_step", "weight", "codec_state")


def sync_state(sync: Any) -> dict[str, Any]:
    """A `CrossSiteSync`'s state on this rank. Waits for exchanges in flight (their results are kept)."""
    for p in sync.pending:
        if not p.done:
            assert p.future is not None
            p.result, p.done = p.future.result(), True
    return {
        "outer": {u.name: u.outer.state_dict() for u in sync.units if u.outer is not None},
        "anchor": sync.anchor,
        "codec": sync.codec.state_dict(),
        "tokens_since": dict(sync.tokens_since),
        "pending": [{"unit": p.unit.name, **{k: getattr(p, k) for k in _PENDING_KEYS}} for p in sync.pending],
        "rounds": {u.name: [u.round, u.final] for u in sync.units},
        "counter": sync.transport.counter.as_dict(),
        "wait_seconds": sync.wait_seconds,
        "counts": {k: getattr(sync, k) for k in COUNTS},
        "pacer": sync.pacer.state_dict(),
    }


def load_sync_state(sync: Any, state: dict[str, Any]) -> None:
    """Restore `sync_state`'s output into `sync` (a checkpoint from before rounds were numbered too)."""
    for unit in sync.units:
        if unit.outer is not None:
            unit.outer.load_state_dict(state["outer"][unit.name])
        unit.round, unit.final = state.get("rounds", {}).get(unit.name, (0, False))
    sync.anchor = {n: t.clone() for n, t in state["anchor"].items()}
    sync.codec.load_state_dict(state["codec"])
    sync.tokens_since = dict(state["tokens_since"])
    units = {u.name: u for u in sync.units}
    sync.pending = deque()
    for p in state["pending"]:
        # An older checkpoint's result has no envelopes: that round is rolled back, and carried.
        result = p["result"] if isinstance(p["result"], Gathered) else None
        kept = {k: p[k] for k in ("apply_at", "sent", "previous_anchor", "like", "sent_step")}
        extra = {"weight": p.get("weight", 0.0), "codec_state": p.get("codec_state")}
        sync.pending.append(Pending(units[p["unit"]], **kept, **extra, result=result, done=True))
    c = sync.transport.counter
    saved = state["counter"]
    c.sent, c.received, c.exchanges, c.seconds, c.failed = (
        int(saved["wan_bytes_sent"]),
        int(saved["wan_bytes_received"]),
        int(saved["wan_exchanges"]),
        float(saved["wan_seconds"]),
        int(saved["wan_failed"]),
    )
    sync.wait_seconds = float(state["wait_seconds"])
    for k, v in state.get("counts", {}).items():
        setattr(sync, k, v)
    if "pacer" in state:
        sync.pacer.load_state_dict(state["pacer"])


def sync_metrics(sync: Any) -> dict[str, Any]:
    """The counters of one rank and the site's parameter checksum (collective unless replicated)."""
    return {
        **sync.transport.counter.as_dict(),
        "sync_wait_seconds": sync.wait_seconds,
        "sync_rejected": sync.rejected,
        "sync_refused": sync.refused,
        "sync_disagreements": sync.disagreements,
        "sync_round": min(u.round for u in sync.units),
        "round_steps_planned": sync.pacer.expected_steps(),
        "heals": sync.heals,
        "heals_served": sync.heals_served,
        "heal_bytes": sync.heal_bytes,
        "heal_seconds": sync.heal_seconds,
        "params_checksum": site_checksum(sync.view, sync.local_blocks(), rank=sync.local_rank),
    }


def final_sync_metrics(sync: Any) -> dict[str, Any]:
    """`sync_metrics`, the rounds applied, the site events, and θ's digest (collective)."""
    return {
        **sync_metrics(sync),
        "sync_applied": sync.applied_log,
        "sync_site_events": sync.membership.summary(round=min(u.round for u in sync.units)),
        "sync_rounds": [list(h) for h in sync.pacer.history],  # [round, steps, compute seconds]
        FINAL_DIGEST_KEY: site_digest(sync.view, sync.local_blocks(), rank=sync.local_rank).hex(),
    }
