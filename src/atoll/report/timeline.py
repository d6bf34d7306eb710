"""A site's timeline, derived from what its metrics records hold.

The loop logs a record every ``log_every`` steps with cumulative counters (`compute_seconds`,
`sync_wait_seconds`, `wan_seconds`, ...) and the unix `time` it was written; evaluation and
checkpoints write nothing but a `val_loss` record and a directory. So a timeline is derived:

- between two step records (interval [a, b], after any evaluation or checkpoint that followed
  the first), the site computed for Δcompute_seconds from the start and waited for an exchange
  for Δsync_wait_seconds at the end (a sync happens in ``after_step``, after the step's compute);
- an exchange is in flight from the step it was sent to the step it was applied (the final
  record's ``sync_applied``; a blocking exchange is the wait at the end of its step); without
  that record, for Δwan_seconds at the end of each interval whose `wan_exchanges` grew;
- evaluation runs from the step record to its `val_loss` record;
- a checkpoint runs from the last record of its step to its directory's mtime (only the
  checkpoints still on disk are seen: older ones were pruned by ``keep_checkpoints``);
- failures (guard verdicts, failed or refused exchanges, dropped and rejoined sites) are
  instants, heals last Δheal_seconds at the end of their interval.

What the records would need for exact bars is listed in docs/decisions.md ("Issue 15").
Pure Python over the records: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from atoll.report.rundata import SiteRun

ROWS = ("site", "wan", "events")
"""The rows of a site's lane: the site's main thread, the WAN, instants."""

KINDS = {
    "compute": "inner compute",
    "wait": "waiting for an exchange",
    "exchange": "exchange in flight",
    "heal": "healing from a peer",
    "eval": "evaluation",
    "checkpoint": "checkpoint",
    "failure": "failure",
    "membership": "site dropped / rejoined",
}
"""Segment kinds and their legend text."""


@dataclass(frozen=True)
class Segment:
    """One bar (or, with ``start == end``, one instant) of a site's lane, in seconds since the
    run's start."""

    row: str
    kind: str
    start: float
    end: float
    label: str

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _delta(rec: dict[str, Any], prev: dict[str, Any] | None, key: str) -> float:
    now = float(rec.get(key, 0.0) or 0.0)
    before = float(prev.get(key, 0.0) or 0.0) if prev is not None else 0.0
    return max(0.0, now - before)


def step_end_times(site: SiteRun) -> dict[int, float]:
    """Unix time each logged step ended (the step record's `time`)."""
    return {int(r["step"]): float(r["time"]) for r in site.steps}


def _time_at_step(ends: dict[int, float], step: int) -> float | None:
    """When `step` ended, interpolated linearly between logged steps (None outside them)."""
    if step in ends:
        return ends[step]
    before = [s for s in ends if s < step]
    after = [s for s in ends if s > step]
    if not before or not after:
        return None
    s0, s1 = max(before), min(after)
    return ends[s0] + (ends[s1] - ends[s0]) * (step - s0) / (s1 - s0)


def _main_row(site: SiteRun, t0: float) -> list[Segment]:
    """Compute, wait, evaluation and checkpoints: what the site's ranks did, one after another."""
    out: list[Segment] = []
    ckpts = dict(site.checkpoints)
    prev: dict[str, Any] | None = None
    free_at: float | None = None  # when the site was last free to compute (after eval/checkpoint)
    saved_at = 0.0  # when the last checkpoint was done
    for rec in site.records:
        t = float(rec["time"])
        step = int(rec.get("step", 0))
        if "val_loss" in rec and free_at is not None:
            out.append(
                Segment("site", "eval", free_at - t0, t - t0, f"evaluation at step {step}: {rec['val_loss']:.4f}")
            )
            free_at = t
        if "loss" not in rec or "step_seconds" not in rec:
            if "val_loss" not in rec and "guard" not in rec and free_at is None:
                free_at = t  # the loop's first record: training starts here
            continue
        a = free_at if free_at is not None else t - float(rec.get("wall_seconds", rec["step_seconds"]))
        if a < saved_at < t:
            a = saved_at
        compute = _delta(rec, prev, "compute_seconds")
        wait = _delta(rec, prev, "sync_wait_seconds")
        span = max(t - a, 0.0)
        if compute + wait > span > 0:  # the counters and the clock disagree a little: keep the shares
            compute, wait = compute * span / (compute + wait), wait * span / (compute + wait)
        first = int(prev["step"]) + 1 if prev is not None else step
        steps = f"step {first}" if first == step else f"steps {first}-{step}"
        out.append(Segment("site", "compute", a - t0, a + compute - t0, f"{steps}: compute {compute:.3g} s"))
        if wait > 0:
            out.append(Segment("site", "wait", t - wait - t0, t - t0, f"step {step}: waiting {wait:.3g} s"))
        prev, free_at = rec, t
        if step in ckpts:
            done = ckpts.pop(step)
            saved_at = done
            # The checkpoint follows the step's evaluation, if any: found when its record comes.
            out.append(Segment("site", "checkpoint", t - t0, done - t0, f"checkpoint at step {step}"))
    return _coalesce(_place_checkpoints(out))


def _coalesce(segments: list[Segment], *, gap: float = 0.1) -> list[Segment]:
    """Merge compute bars that follow each other with a gap under `gap` of their length (the
    loop's bookkeeping between steps): one bar per stretch of compute, not one per logged step."""
    out: list[Segment] = []
    for seg in segments:
        last = out[-1] if out else None
        if (
            last is not None
            and seg.kind == last.kind == "compute"
            and 0 <= seg.start - last.end <= gap * (seg.end - last.start)
        ):
            first = last.label.split(":")[0].split()[-1].split("-")[0]
            final = seg.label.split(":")[0].split()[-1].split("-")[-1]
            seconds = last.seconds + seg.seconds
            out[-1] = Segment("site", "compute", last.start, seg.end, f"steps {first}-{final}: compute {seconds:.3g} s")
            continue
        out.append(seg)
    return out


def _place_checkpoints(segments: list[Segment]) -> list[Segment]:
    """A checkpoint written after an evaluation of the same step starts when the evaluation ends."""
    placed: list[Segment] = []
    for seg in segments:
        if seg.kind == "checkpoint":
            evals = [e for e in segments if e.kind == "eval" and seg.start <= e.start < seg.end]
            start = max([seg.start, *(e.end for e in evals)])
            seg = Segment(seg.row, seg.kind, start, max(start, seg.end), seg.label)
        placed.append(seg)
    return placed


def _exchanges(site: SiteRun, t0: float, ends: dict[int, float]) -> list[Segment]:
    """Exchanges in flight: from the final record's (applied, sent) pairs when the run finished,
    else from the intervals in which `wan_exchanges` grew."""
    final = site.final
    waits: dict[int, float] = {}
    prev = None
    for rec in site.steps:
        waits[int(rec["step"])] = _delta(rec, prev, "sync_wait_seconds")
        prev = rec
    out: list[Segment] = []
    if final is not None and final.get("sync_applied"):
        for applied, sent in final["sync_applied"]:
            t_sent, t_applied = _time_at_step(ends, int(sent)), _time_at_step(ends, int(applied))
            if t_sent is None or t_applied is None:
                continue
            if applied == sent:  # a blocking exchange: the wait at the end of its step
                start = t_sent - waits.get(int(sent), 0.0)
                label = f"round sent and applied at step {sent}"
            else:
                start = t_sent
                label = f"sent at step {sent}, applied at step {applied}"
            out.append(Segment("wan", "exchange", start - t0, t_applied - t0, label))
        return out
    prev = None
    for rec in site.steps:
        n = _delta(rec, prev, "wan_exchanges")
        if n > 0:
            seconds = _delta(rec, prev, "wan_seconds")
            t = float(rec["time"])
            out.append(Segment("wan", "exchange", t - seconds - t0, t - t0, f"{n:.0f} exchange(s), {seconds:.3g} s"))
        prev = rec
    return out


def _events(site: SiteRun, t0: float) -> list[Segment]:
    """Failures, heals and membership changes."""
    out: list[Segment] = []
    prev = None
    for rec in site.records:
        t = float(rec["time"]) - t0
        step = rec.get("step", 0)
        if "guard" in rec:
            reason = rec.get("reason") or rec["guard"]
            out.append(Segment("events", "failure", t, t, f"step {step}: guard {rec['guard']} ({reason})"))
            continue
        if "loss" not in rec or "step_seconds" not in rec:
            continue
        for key, what in (
            ("wan_failed", "exchange failed"),
            ("sync_rejected", "update rejected"),
            ("sync_refused", "envelope refused"),
            ("sync_disagreements", "sites disagreed"),
        ):
            n = _delta(rec, prev, key)
            if n > 0:
                out.append(Segment("events", "failure", t, t, f"step {step}: {what} x{n:.0f}"))
        if _delta(rec, prev, "heals") > 0:
            seconds = _delta(rec, prev, "heal_seconds")
            moved = _delta(rec, prev, "heal_bytes")
            out.append(Segment("wan", "heal", t - seconds, t, f"step {step}: healed from a peer, {moved / 1e6:.3g} MB"))
        prev = rec
    final = site.final
    for event in (final or {}).get("sync_site_events", []) or []:
        if "time" in event:
            what = f"site {event.get('site')} {event.get('event')} at round {event.get('round')}"
            if event.get("rounds_missed"):
                what += f" (missed {event['rounds_missed']} rounds)"
            out.append(Segment("events", "membership", float(event["time"]) - t0, float(event["time"]) - t0, what))
    return out


def site_timeline(site: SiteRun, *, t0: float) -> list[Segment]:
    """Every segment of `site`'s lane, in seconds since `t0` (the run's start)."""
    ends = step_end_times(site)
    return [*_main_row(site, t0), *_exchanges(site, t0, ends), *_events(site, t0)]


def busy_shares(segments: list[Segment]) -> dict[str, float]:
    """Seconds per kind on the site's main row (what the time went to)."""
    shares: dict[str, float] = {}
    for seg in segments:
        if seg.row == "site":
            shares[seg.kind] = shares.get(seg.kind, 0.0) + seg.seconds
    return shares
