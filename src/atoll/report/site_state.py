"""What one site of a running multi-site run is doing, read from its ``metrics.jsonl`` as it grows.

Pure bookkeeping for the launcher's live view (`atoll.report.sites`): no rich, no torch. The
loop logs a step record every ``train.log_every`` steps (loss, tokens/s, the WAN counters summed
over the site's ranks, `sync_wait_seconds`, `sync_round`), then evaluation and checkpoint
records. From those the view derives the state of the site's current exchange, its links'
rates and an ETA; an *exchange record* makes the state exact where the loop writes one::

    {"step": S, "time": T, "exchange": "sending" | "waiting" | "applied" | "failed",
     "exchange_round": R, "exchange_unit": U}

(written by the site's main rank when a unit is sent after inner step S, when the loop blocks on
an exchange still in flight, and when the round is applied or rolled back; R is the round sent,
or the round the unit holds after it is applied). Without them the state is a guess, and the
view says so by the words it uses: see `exchange_state`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EXCHANGE_KEY = "exchange"  # the exchange record's state: see the module docstring
EXCHANGE_ROUND_KEY = "exchange_round"
EXCHANGE_STATES = ("sending", "waiting", "applied", "failed")
RATE_WINDOW_SECONDS = 60.0  # a link's "now": the bytes of the last minute of records
RECENT_RECORDS = 20  # records a site's throughput and compute seconds per step are measured over


@dataclass(frozen=True)
class RunShape:
    """What the view needs from a site's config: its strategy, its H (``inner_steps`` of this
    site; None when rounds are timed, ``round_seconds``), ``train.log_every`` and its inner steps."""

    strategy: str | None = None
    inner_steps: int | None = None
    log_every: int = 1
    total_steps: int | None = None

    @classmethod
    def read(cls, run_dir: Path, site: str) -> RunShape:
        """From ``RUN_DIR/config.yaml`` (the validated config the run started with); an empty
        shape when it is missing or unreadable, and the view then infers what it can."""
        try:
            raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return cls()
        if not isinstance(raw, dict):
            return cls()
        sync = raw.get("sync") or {}
        train = raw.get("train") or {}
        strategy = sync.get("strategy")
        base_h = int(sync.get("inner_steps", 50))
        h = int((sync.get("site_inner_steps") or {}).get(site, base_h))
        steps = train.get("steps")
        total = None
        if isinstance(steps, int):
            # as atoll.train.loop.site_steps: every site runs the same number of rounds, each of its own H
            total = steps if strategy in (None, "ddp") else max(1, steps // base_h) * h
        timed = sync.get("round_seconds") is not None
        return cls(
            strategy=strategy,
            inner_steps=None if timed or strategy in (None, "ddp") else h,
            log_every=int(train.get("log_every", 10)),
            total_steps=total,
        )


class MetricsTail:
    """Reads the complete lines a ``metrics.jsonl`` gained since the last `poll`.

    A site that resumes rewrites its file (only the records up to its checkpoint stay) and one
    restarted from the beginning appends from step 1 again: `poll` notices a rewrite (the file
    shrank, or the last line read is no longer where it was) and starts again from the top.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._last = b""

    def poll(self) -> tuple[bool, list[dict[str, Any]]]:
        """(whether the file was rewritten, so earlier records no longer hold; the new records)."""
        try:
            with self.path.open("rb") as f:
                rewritten = self._offset > 0 and not self._still_there(f)
                if rewritten:
                    self._offset, self._last = 0, b""
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            rewritten, self._offset, self._last = self._offset > 0, 0, b""
            return rewritten, []
        end = data.rfind(b"\n")
        if end < 0:
            return rewritten, []
        lines = data[:end].split(b"\n")
        self._offset += end + 1
        self._last = lines[-1] + b"\n"
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line cut short by a crash
            if isinstance(record, dict):
                out.append(record)
        return rewritten, out

    def _still_there(self, f: Any) -> bool:
        start = self._offset - len(self._last)
        f.seek(0, 2)
        if f.tell() < self._offset:
            return False
        f.seek(start)
        return bool(f.read(len(self._last)) == self._last)


@dataclass
class LinkRates:
    """A site's link in Mbit/s: over the last `RATE_WINDOW_SECONDS` of records (None before two
    records), and while it last exchanged (bytes over `wan_seconds`, which includes the wait for
    the quorum; None before the first exchange)."""

    up_now: float | None = None
    down_now: float | None = None
    up_exchange: float | None = None
    down_exchange: float | None = None


@dataclass
class SiteHistory:
    """The step records of a site since it last started (or since the view began), and its last
    exchange record; fed record by record (`add`)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    exchange: dict[str, Any] | None = None  # the last exchange record
    exchange_is_current: bool = False  # no step record came after it
    applied_round: int | None = None  # the round the site last applied (derived when no exchange record)
    failed_since_applied: bool = False
    started_at: float | None = None  # wall time of the site's (re)start, when the launcher said

    def reset(self) -> None:
        self.steps.clear()
        self.exchange, self.exchange_is_current = None, False
        self.applied_round, self.failed_since_applied = None, False

    def add(self, record: dict[str, Any]) -> None:
        if record.get(EXCHANGE_KEY) in EXCHANGE_STATES:
            self.exchange, self.exchange_is_current = record, True
            return
        if "loss" not in record or "step" not in record:
            return  # evaluation, checkpoint, guard and final records
        if self.steps and int(record["step"]) <= int(self.steps[-1]["step"]):
            self.reset()  # a site restarted from the beginning appends from step 1 again
        previous = self.steps[-1] if self.steps else None
        self.steps.append(record)
        self.exchange_is_current = False
        if previous is None:
            self.applied_round = _int(record.get("sync_round")) if _num(record, "wan_exchanges") > 0 else None
            return
        if _num(record, "wan_failed") > _num(previous, "wan_failed"):
            self.failed_since_applied = True
        if _num(record, "wan_exchanges") > _num(previous, "wan_exchanges"):
            self.applied_round = _int(record.get("sync_round"))
            self.failed_since_applied = False

    @property
    def last(self) -> dict[str, Any] | None:
        return self.steps[-1] if self.steps else None

    def recent(self) -> list[dict[str, Any]]:
        """The step records since the site's last (re)start, as far as the launcher told."""
        if self.started_at is None:
            return self.steps
        return [r for r in self.steps if float(r.get("time", 0.0)) >= self.started_at]

    def exchange_seconds(self) -> float | None:
        """How long an exchange usually takes here: the median `wan_seconds` per exchange over
        the recent record intervals that held exchanges."""
        recent = self.recent()
        per = []
        for a, b in zip(recent, recent[1:]):
            n = _num(b, "wan_exchanges") - _num(a, "wan_exchanges")
            if n > 0:
                per.append((_num(b, "wan_seconds") - _num(a, "wan_seconds")) / n)
        return statistics.median(per) if per else None

    def tokens_per_s(self) -> float | None:
        """The site's throughput over the recent records: `tokens_seen` over wall time (its
        exchanges included, which a logged step's own `tokens_per_s` may or may not hold);
        the last record's `tokens_per_s` while there is one record only."""
        recent = self.recent()[-RECENT_RECORDS - 1 :]
        if len(recent) >= 2:
            first, last = recent[0], recent[-1]
            seconds = float(last["time"]) - float(first["time"])
            if seconds > 0 and "tokens_seen" in last and "tokens_seen" in first:
                return max(0.0, _num(last, "tokens_seen") - _num(first, "tokens_seen")) / seconds
        values = [float(r["tokens_per_s"]) for r in recent[-1:] if "tokens_per_s" in r]
        return values[0] if values else None

    def compute_seconds_per_step(self) -> float | None:
        """Seconds a step computes here (`compute_seconds` deltas: no exchange, evaluation or
        checkpoint in them); the median `step_seconds` before two records."""
        recent = self.recent()[-RECENT_RECORDS - 1 :]
        if len(recent) >= 2 and "compute_seconds" in recent[-1] and "compute_seconds" in recent[0]:
            steps = int(recent[-1]["step"]) - int(recent[0]["step"])
            spent = _num(recent[-1], "compute_seconds") - _num(recent[0], "compute_seconds")
            if steps > 0 and spent > 0:
                return spent / steps
        values = [float(r["step_seconds"]) for r in recent if "step_seconds" in r]
        return statistics.median(values) if values else None

    def seconds_per_step(self, shape: RunShape) -> float | None:
        """Wall seconds per step over a trailing window of at least one round (exchanges,
        evaluations and checkpoints included, as the rest of the run will have them); the
        median of `step_seconds` while there is one record only."""
        recent = self.recent()
        if not recent:
            return None
        last = recent[-1]
        span = max(shape.inner_steps or 0, 10 * shape.log_every, 20)
        window = [r for r in recent if int(r["step"]) >= int(last["step"]) - span]
        first = window[0]
        steps = int(last["step"]) - int(first["step"])
        if steps > 0:
            return (float(last["time"]) - float(first["time"])) / steps
        values = [float(r["step_seconds"]) for r in recent if "step_seconds" in r]
        return statistics.median(values) if values else None

    def link_rates(self) -> LinkRates:
        recent = self.recent()
        rates = LinkRates()
        if len(recent) < 2:
            return rates
        last = recent[-1]
        start = recent[0]
        for r in reversed(recent[:-1]):  # the latest record at least a window before the last
            start = r
            if float(last["time"]) - float(r["time"]) >= RATE_WINDOW_SECONDS:
                break
        seconds = float(last["time"]) - float(start["time"])
        if seconds > 0:
            rates.up_now = _mbps(_num(last, "wan_bytes_sent") - _num(start, "wan_bytes_sent"), seconds)
            rates.down_now = _mbps(_num(last, "wan_bytes_received") - _num(start, "wan_bytes_received"), seconds)
        for a, b in zip(reversed(recent[:-1]), reversed(recent)):  # the last interval that moved bytes
            busy = _num(b, "wan_seconds") - _num(a, "wan_seconds")
            if _num(b, "wan_bytes_sent") > _num(a, "wan_bytes_sent") and busy > 0:
                rates.up_exchange = _mbps(_num(b, "wan_bytes_sent") - _num(a, "wan_bytes_sent"), busy)
                rates.down_exchange = _mbps(_num(b, "wan_bytes_received") - _num(a, "wan_bytes_received"), busy)
                break
        return rates


def exchange_state(history: SiteHistory, shape: RunShape, *, now: float) -> str:
    """The state of the site's current exchange, in 13 characters or fewer (rounds below 10,000).

    With exchange records: the latest one's state and round (``sending r4``, ``waiting r4``,
    ``applied r5``, ``failed r4``); a ``sending`` or ``waiting`` record followed by step records
    is an exchange in flight behind the steps (``in flight r4``: delayed and streaming); a
    site overdue (below) with no exchange record since its last step is ``quiet 42s``.

    Without them, from the step records alone: the site's next record is overdue (the time since
    the last one exceeds what computing the steps up to the next takes, at the site's recent
    compute seconds per step, by half of that and 0.5 s) and a round boundary falls before it (H
    from the config): ``sending r4`` while the overdue time is within what its exchanges usually
    take, else ``waiting r4`` (the others are late, or the link is slower); ``delayed`` sends in
    the background, so a late record at its boundary is ``waiting``. An overdue record away from a
    boundary is ``quiet 42s`` (an evaluation, a checkpoint, or a stall); otherwise the last round
    applied (``applied r5``: `wan_exchanges` rose, `sync_round` names it) or ``failed`` when a
    later exchange failed (`wan_failed` rose). ``-`` before the first exchange; ``lockstep`` for
    cross-site ddp, which exchanges gradients at every step.
    """
    last = history.last
    if shape.strategy == "ddp":
        return "lockstep"
    ex = history.exchange
    overdue = _overdue(history, shape, now=now)
    if ex is not None:
        state, rnd = str(ex[EXCHANGE_KEY]), _int(ex.get(EXCHANGE_ROUND_KEY))
        if not history.exchange_is_current:
            if overdue is not None and last is not None:  # an exchange would have said so
                return f"quiet {_short_seconds(now - float(last['time']))}"
            if state in ("sending", "waiting"):
                state = "in flight"
        return f"{state} r{rnd}" if rnd is not None else state
    if last is None:
        return "-"
    rnd = history.applied_round
    if overdue is not None:
        boundary = _next_boundary(int(last["step"]), shape)
        if boundary is None:
            return f"quiet {_short_seconds(now - float(last['time']))}"
        sending = (_int(last.get("sync_round")) or 0) + 1 if "sync_round" in last else None
        label = f" r{sending}" if sending is not None else ""
        usual = history.exchange_seconds()
        if shape.strategy == "delayed" or (usual is not None and overdue > usual):
            return f"waiting{label}"
        return f"sending{label}"
    if history.failed_since_applied:
        return "failed"
    return f"applied r{rnd}" if rnd is not None else "-"


def eta_seconds(history: SiteHistory, shape: RunShape, *, total_steps: int) -> float | None:
    """Seconds until the site's last step: steps left times `SiteHistory.seconds_per_step`."""
    last = history.last
    per_step = history.seconds_per_step(shape)
    if last is None or per_step is None:
        return None
    return max(0, total_steps - int(last["step"])) * per_step


def _overdue(history: SiteHistory, shape: RunShape, *, now: float) -> float | None:
    """Seconds the site has spent since its last step record beyond computing the steps up to
    its next one, when that is more than half the compute and 0.5 s (see `exchange_state`); else None."""
    last = history.last
    per_step = history.compute_seconds_per_step()
    if last is None or per_step is None:
        return None
    step = int(last["step"])
    to_next = shape.log_every - step % shape.log_every
    if shape.total_steps is not None:
        to_next = max(1, min(to_next, shape.total_steps - step))
    expected = per_step * to_next
    beyond = now - float(last["time"]) - expected
    return beyond if beyond > max(0.5 * expected, 0.5) else None


def _next_boundary(step: int, shape: RunShape) -> int | None:
    """The round boundary before the site's next step record, if the config says when rounds end."""
    h = shape.inner_steps
    if h is None or shape.strategy not in ("diloco", "delayed"):
        return None
    boundary = (step // h + 1) * h
    limit = step + shape.log_every
    if shape.total_steps is not None:
        limit = min(limit, shape.total_steps)
    return boundary if boundary <= limit else None


def _num(record: dict[str, Any], key: str) -> float:
    value = record.get(key, 0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def _mbps(num_bytes: float, seconds: float) -> float:
    return max(0.0, num_bytes) * 8 / seconds / 1e6


def _short_seconds(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.0f}s"
    if seconds < 6000:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"
