"""A site's timeline, derived from what its metrics records hold.

The loop logs a record every ``log_every`` steps with cumulative counters (`compute_seconds`,
`sync_wait_seconds`, `wan_seconds`, ...) and the unix `time` it was written; evaluation and
checkpoints write nothing but a `val_loss` record and a directory. So a timeline is derived:

- between two step records (interval [a, b], after any evaluation or checkpoint that followed
  the first), the site computed for Δcompute_seconds from the start and waited for an exchange
  for Δsync_wait_seconds at the end (a sync happens in ``after_step``, after the step's compute);
- an exchange is in flight from its ``exchange: sending`` record to its ``applied`` or
  ``failed`` record (what the sync tells the loop, by round and unit); a run written before
  those records existed: from the step it was sent to the step it was applied (the final
  record's ``sync_applied``; a blocking exchange is the wait at the end of its step), or for
  Δwan_seconds at the end of each interval whose `wan_exchanges` grew;
- evaluation ends at its `val_loss` record and lasts its `eval_seconds` (older runs: from the
  step record to the `val_loss` record);
- a checkpoint ends at its ``checkpoint`` record and lasts its `checkpoint_seconds` (older runs:
  from the last record of its step to its directory's mtime, only for the checkpoints still on
  disk: older ones were pruned by ``keep_checkpoints``);
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


def _checkpoint_ends(site: SiteRun) -> tuple[dict[int, float], dict[int, float]]:
    """When each checkpoint was complete, by step, and how long it took where the record says:
    the loop's ``checkpoint`` records, else the directories still on disk (their mtimes)."""
    ends, seconds = dict(site.checkpoints), {}
    for rec in site.records:
        if "checkpoint" in rec and "checkpoint_seconds" in rec:
            step = int(rec["checkpoint"])
            ends[step], seconds[step] = float(rec["time"]), float(rec["checkpoint_seconds"])
    return ends, seconds


def _main_row(site: SiteRun, t0: float) -> list[Segment]:
    """Compute, wait, evaluation and checkpoints: what the site's ranks did, one after another."""
    evals = {int(r["step"]): r for r in site.vals}
    ckpts, ckpt_seconds = _checkpoint_ends(site)
    out: list[Segment] = []
    steps = site.steps
    if not steps:
        return out
    cursor = site.start_time if site.start_time is not None else 0.0
    prev: dict[str, Any] | None = None
    for rec in steps:
        t, step = float(rec["time"]), int(rec["step"])
        prev_step = int(prev["step"]) if prev is not None else -1
        if prev is not None:  # evaluation and checkpoint of the last logged step: right after it
            cursor = _after_step(out, prev_step, evals, (ckpts, ckpt_seconds), cursor=cursor, t0=t0)
        # A resumed run's loop counts compute and wall seconds from zero again; it started
        # `wall_seconds` before this record (the time in between was not training).
        restarted = prev is not None and float(rec.get("wall_seconds", 0.0)) < float(prev.get("wall_seconds", 0.0))
        if restarted:
            cursor = max(cursor, t - float(rec["wall_seconds"]))
        compute = _delta(rec, None if restarted else prev, "compute_seconds")
        wait = _delta(rec, prev, "sync_wait_seconds")
        span = max(t - cursor, 0.0)
        if compute + wait > span > 0:  # the counters and the clock disagree a little: keep the shares
            compute, wait = compute * span / (compute + wait), wait * span / (compute + wait)
        first = prev_step + 1 if prev is not None else min(1, step)
        label = f"step {first}" if first == step else f"steps {first}-{step}"
        # Evaluations and checkpoints of steps between two logged ones: each ends at its record's
        # time or its directory's mtime; they share what the counters leave unaccounted for.
        middle = sorted(s for s in {*evals, *ckpts} if prev_step < s < step)
        left = max(0.0, span - compute - wait) / max(len(middle), 1)
        busy: list[Segment] = []
        for s in middle:
            busy += _between(s, evals.pop(s, None), ckpts.pop(s, None), ckpt_seconds.get(s), seconds=left, t0=t0)
        pieces = _gaps(cursor - t0, t - wait - t0, busy)
        bounds = [first, *(m + 1 for m in middle)], [*middle, step]
        for i, (a, b) in enumerate(pieces):
            if len(pieces) == len(middle) + 1 and bounds[0][i] != bounds[1][i]:
                label = f"steps {bounds[0][i]}-{bounds[1][i]}"
            out.append(Segment("site", "compute", a, b, f"{label}: compute"))
        out += busy
        if wait > 0:
            out.append(Segment("site", "wait", t - wait - t0, t - t0, f"step {step}: waiting {wait:.3g} s"))
        prev, cursor = rec, t
    if prev is not None:
        _after_step(out, int(prev["step"]), evals, (ckpts, ckpt_seconds), cursor=cursor, t0=t0)
    return _coalesce(sorted(out, key=lambda s: s.start))


def _after_step(
    out: list[Segment],
    step: int,
    evals: dict[int, dict[str, Any]],
    ckpts: tuple[dict[int, float], dict[int, float]],
    *,
    cursor: float,
    t0: float,
) -> float:
    """Append the evaluation and the checkpoint that followed logged step `step` (the loop runs
    them in that order); returns when the site was free again. `ckpts`: end times and, where
    recorded, durations."""
    if step in evals:
        rec = evals.pop(step)
        end = float(rec["time"])
        start = max(cursor, end - float(rec["eval_seconds"])) if "eval_seconds" in rec else cursor
        out.append(Segment("site", "eval", start - t0, end - t0, f"evaluation at step {step}: {rec['val_loss']:.4f}"))
        cursor = end
    ends, seconds = ckpts
    if step in ends:
        done = ends.pop(step)
        start = max(cursor, done - seconds[step]) if step in seconds else cursor
        out.append(Segment("site", "checkpoint", start - t0, max(done, start) - t0, f"checkpoint at step {step}"))
        cursor = max(done, cursor)
    return cursor


def _between(
    step: int,
    val: dict[str, Any] | None,
    done: float | None,
    ckpt_seconds: float | None,
    *,
    seconds: float,
    t0: float,
) -> list[Segment]:
    """Evaluation and checkpoint at a step that was not logged: they end when their record was
    written (or, for an older run's checkpoint, its directory last changed), and last what their
    records say or, in older runs, `seconds` together."""
    out = []
    if val is not None:
        end = float(val["time"])
        ckpt = (done - end) if done is not None and done >= end else 0.0
        length = float(val["eval_seconds"]) if "eval_seconds" in val else max(0.0, seconds - ckpt)
        out.append(
            Segment("site", "eval", end - length - t0, end - t0, f"evaluation at step {step}: {val['val_loss']:.4f}")
        )
        if done is not None:
            out.append(Segment("site", "checkpoint", end - t0, max(done, end) - t0, f"checkpoint at step {step}"))
    elif done is not None:
        length = ckpt_seconds if ckpt_seconds is not None else seconds
        out.append(Segment("site", "checkpoint", done - length - t0, done - t0, f"checkpoint at step {step}"))
    return out


def _gaps(start: float, end: float, busy: list[Segment]) -> list[tuple[float, float]]:
    """The parts of [start, end] that no segment of `busy` covers."""
    free, cursor = [], start
    for seg in sorted(busy, key=lambda s: s.start):
        if seg.start > cursor:
            free.append((cursor, min(seg.start, end)))
        cursor = max(cursor, seg.end)
    if end > cursor:
        free.append((cursor, end))
    return [(a, b) for a, b in free if b > a]


def _coalesce(segments: list[Segment], *, gap: float = 0.1) -> list[Segment]:
    """Merge compute bars that follow each other with a gap under `gap` of their length (the
    loop's bookkeeping between steps): one bar per stretch of compute, not one per logged step;
    a compute bar's label gets its length."""
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
            out[-1] = Segment("site", "compute", last.start, seg.end, f"steps {first}-{final}: compute")
            continue
        out.append(seg)
    return [
        Segment(s.row, s.kind, s.start, s.end, f"{s.label} {s.seconds:.3g} s") if s.kind == "compute" else s
        for s in out
    ]


def _recorded_exchanges(site: SiteRun, t0: float) -> list[Segment]:
    """Exchanges in flight from the sync's own records: each round of each unit from the record
    that sent it to the one that applied it (or said it failed)."""
    out: list[Segment] = []
    sent: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in site.records:
        what = rec.get("exchange")
        if what is None:
            continue
        key = (str(rec.get("exchange_unit", "model")), int(rec.get("exchange_round", 0)))
        if what == "sending":
            sent[key] = rec
        elif what in ("applied", "failed") and key in sent:
            start = sent.pop(key)
            unit = "" if key[0] == "model" else f" ({key[0]})"
            label = f"round {key[1]}{unit}: sent at step {start['step']}, {what} at step {rec['step']}"
            kind = "exchange" if what == "applied" else "failure"
            out.append(Segment("wan", kind, float(start["time"]) - t0, float(rec["time"]) - t0, label))
    return out


def _exchanges(site: SiteRun, t0: float, ends: dict[int, float]) -> list[Segment]:
    """Exchanges in flight: from the sync's exchange records; in runs written before them, from
    the final record's (applied, sent) pairs when the run finished, else from the intervals in
    which `wan_exchanges` grew."""
    recorded = _recorded_exchanges(site, t0)
    if recorded:
        return recorded
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
