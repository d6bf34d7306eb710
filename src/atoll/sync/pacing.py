"""When a site's round ends: a fixed step count, a wall-clock budget, or a measured balance.

Used by `atoll.sync.engine.CrossSiteSync` on every rank of every site, for the `diloco` and
`delayed` strategies (`streaming` keeps its step schedule). Rounds are *numbered*, not stepped:
every site runs the same number of rounds, each ending when its pacer says so, and the exchange
pairs the sites' k-th sends whatever step each is at. Three modes:

- `fixed`: the site's own H (`sync.inner_steps`, `sync.site_inner_steps`), as before.
- `budget` (`sync.round_seconds`): as many inner steps as fit in the budget, measured: the round
  ends before a step that would overrun it (at least one step).
- `balanced` (no budget, and `sync.balance: always`, or `auto` over sites that differ without
  per-site counts): the first round is split as `sync.site_inner_steps` says (a plan's split) or,
  without them, by the catalog's figures (peak FLOP/s over emulated slowdowns); then each
  site reports its step time (a moving average) in its envelope (`Header.pace`, authenticated);
  after every exchange, every site splits the round's total work (the sites' H summed) from the
  same gathered paces, so all reach the same plan without another message: the split that
  minimizes the slowest site's round time. A plan is replaced only when the new one is faster by
  more than `sync.rebalance_gain` (hysteresis: equal sites never flip-flop on noise). A site that
  slows down inside a round (a straggler) stops at its planned time plus the tolerance
  (`sync.balance_tolerance`), so it stalls the others by at most that.

Every decision that shapes the run is taken from numbers every rank of the site holds alike
(`agree`: the site's maximum), so all ranks run the same inner step count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from atoll.config.schema import SyncSection

PaceMode = Literal["fixed", "budget", "balanced"]
# A site's step time is the mean of its last PACE_WINDOW steps (a moving average; the run's first
# WARMUP_STEPS are left out: allocations, first kernels). The mean, not the median: a round lasts
# the *sum* of its steps, and step times on shared machines are skewed (occasional slow steps), so
# a median under-predicts the round and trips the straggler deadline. Evaluation and checkpoints
# fall outside the step time the loop reports. A lasting 2x change moves it halfway in 4 steps.
# The pace a site reports at an exchange averages over the whole round it just ran (at least
# PACE_WINDOW steps): what the next round's length depends on. In the lab the coefficient of
# variation of a fast site's single steps was 55% (its neighbours' compute comes and goes), of its
# 8-step means 20%, of its round means 1.6% (bench/hetero.py, 2026-12-07).
PACE_WINDOW = 8
PACE_HISTORY = 512  # step times kept: a round's pace averages at most this many
WARMUP_STEPS = 2
_LOG_SCALE = 1024.0  # pace code: log2(seconds) in 1/1024 steps (0.07 % resolution) ...
_LOG_OFFSET = 32.0  # ... from 2^-32 s up to 2^32 s, in 16 bits; 0 means "not measured yet"


def pace_mode(cfg: SyncSection, *, sites_differ: bool) -> PaceMode:
    """How a run's rounds end: `budget` with `round_seconds`; `fixed` for streaming and ddp, when
    balancing is `never`, with `site_inner_steps` unless balancing is `always` (then they are the
    first round's split), or `auto` over alike sites (their H is already the balanced split, and
    measuring could only add noise); `balanced` otherwise."""
    if cfg.strategy not in ("diloco", "delayed"):
        return "fixed"
    if cfg.round_seconds is not None:
        return "budget"
    if cfg.balance == "never" or (cfg.site_inner_steps and cfg.balance != "always"):
        return "fixed"
    if cfg.balance == "auto" and not sites_differ:
        return "fixed"
    return "balanced"


def encode_pace(seconds: float | None) -> int:
    """A step time as the envelope's 16-bit pace code (0: unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return 0
    code = round((math.log2(seconds) + _LOG_OFFSET) * _LOG_SCALE)
    return min(max(code, 1), 0xFFFF)


def decode_pace(code: int) -> float | None:
    """The step time (seconds) a pace code stands for, None for 0 (unknown)."""
    if code <= 0:
        return None
    return float(2.0 ** (code / _LOG_SCALE - _LOG_OFFSET))


def split_steps(total: int, step_seconds: Sequence[float]) -> list[int]:
    """`total` inner steps shared by sites of the given step times, at least one each, so that the
    slowest site's round (steps x step time) is as short as possible.

    Greedy: each further step goes to the site that would finish it first (ties: the lower index);
    for identical steps on machines of different speeds this is optimal. Pure and deterministic.
    """
    n = len(step_seconds)
    if n == 0:
        return []
    if total < n:
        raise ValueError(f"{total} steps cannot give each of {n} sites one")
    counts = [1] * n
    for _ in range(total - n):
        k = min(range(n), key=lambda i: ((counts[i] + 1) * step_seconds[i], i))
        counts[k] += 1
    return counts


def makespan(counts: Sequence[int], step_seconds: Sequence[float]) -> float:
    """The round's length when the sites run `counts` steps of the given times."""
    return max(c * s for c, s in zip(counts, step_seconds))


@dataclass
class Pacer:
    """One rank's view of when its site's rounds end. Not thread-safe (the training thread only).

    `agree(x)`: the maximum of `x` over the site's ranks (a collective; identity for one rank).
    """

    mode: PaceMode
    site: str
    inner_steps: int  # H: fixed mode's round; balanced: this site's share of the round's work
    rounds: int  # rounds in the run: every site runs the same number
    round_seconds: float | None = None
    tolerance: float = 0.1  # balanced: a straggler's deadline is the planned round x (1 + this)
    rebalance_gain: float = 0.03  # balanced: a new split must shorten the round by more than this
    agree: Callable[[float], float] = field(default=lambda x: x, repr=False)
    prior: dict[str, float] | None = None  # balanced: every site's relative step time on paper (the catalog)
    first_split: dict[str, int] | None = None  # balanced: the first round's steps per site (a plan's split)
    # state (checkpointed)
    rounds_sent: int = 0
    steps_in_round: int = 0
    seconds_in_round: float = 0.0
    recent: list[float] = field(default_factory=list)  # this site's last step times (the moving window)
    steps_measured: int = 0
    planned: int = 0  # balanced: this site's steps in the current round
    plan: dict[str, int] = field(default_factory=dict)  # balanced: every site's share of the current round
    last_round_steps: int = 0
    planned_round_seconds: float = 0.0  # balanced: the plan's round length (its slowest site's)
    planned_step_seconds: float = 0.0  # balanced: this site's step time the plan assumed
    history: list[tuple[int, int, float]] = field(default_factory=list)  # (round, steps, seconds), for reports

    def __post_init__(self) -> None:
        if self.mode == "budget" and not self.round_seconds:
            raise ValueError("a budget pacer needs round_seconds")
        self.planned = self.planned or self.inner_steps
        if self.mode == "balanced" and self.first_split and self.site in self.first_split and not self.plan:
            # The run's own split (a plan's) stands until measured paces beat it by the tolerance.
            self.plan = dict(self.first_split)
            self.planned = self.plan[self.site]
        elif self.mode == "balanced" and self.prior and self.site in self.prior and not self.plan:
            # The first round follows the catalog (no absolute time yet, so no deadline); measured
            # paces replace it from the first exchange on, when they beat it by the tolerance.
            names = sorted(self.prior)
            counts = split_steps(self.inner_steps * len(names), [self.prior[n] for n in names])
            self.plan = dict(zip(names, counts))
            self.planned = self.plan[self.site]

    @property
    def paced(self) -> bool:
        """Whether a round's length is decided while it runs (the loop then ends on rounds)."""
        return self.mode != "fixed"

    def step_done(self, seconds: float) -> None:
        """Record one inner step of this rank's (compute, the emulated slowdown included)."""
        self.steps_in_round += 1
        self.seconds_in_round += seconds
        self.steps_measured += 1
        if self.steps_measured > WARMUP_STEPS:
            self.recent = [*self.recent, seconds][-PACE_HISTORY:]

    @property
    def step_seconds(self) -> float | None:
        """This site's step time: the moving average (None before a step was measured)."""
        return statistics.fmean(self.recent[-PACE_WINDOW:]) if self.recent else None

    @property
    def round_step_seconds(self) -> float | None:
        """This site's step time over the round so far (at least the last PACE_WINDOW steps)."""
        window = max(PACE_WINDOW, self.steps_in_round)
        return statistics.fmean(self.recent[-window:]) if self.recent else None

    def round_over(self) -> bool:
        """Whether the round ends after the step just recorded; the same answer on every rank of
        the site (collective in `budget` and `balanced` modes)."""
        n = self.steps_in_round
        if self.mode == "fixed":
            return n >= self.inner_steps
        if self.mode == "budget":
            assert self.round_seconds is not None
            ahead = self.step_seconds if self.step_seconds is not None else self.seconds_in_round / max(n, 1)
            # Another step fits if it would end inside the budget; the site's slowest rank decides.
            return self.agree(self.seconds_in_round + ahead) > self.round_seconds
        if n >= self.planned:
            return True
        deadline = self._deadline()
        return deadline is not None and self.agree(self.seconds_in_round) > deadline

    def _deadline(self) -> float | None:
        """Balanced: the plan's round length plus the tolerance (None before a plan is measured)."""
        if not self.plan or not self.planned_round_seconds or not self.planned_step_seconds:
            return None
        # Steps are indivisible: a site may finish the step (as planned) that crosses the round.
        return self.planned_round_seconds * (1.0 + self.tolerance) + self.planned_step_seconds

    def pace(self) -> int:
        """The pace code this site puts in its envelopes: its agreed step time over the round."""
        seconds = self.round_step_seconds
        if seconds is None:
            return 0
        return encode_pace(self.agree(seconds))

    def round_sent(self) -> None:
        """The round ended and its exchange was sent: start counting the next one."""
        self.history.append((self.rounds_sent, self.steps_in_round, self.seconds_in_round))
        self.rounds_sent += 1
        self.last_round_steps = self.steps_in_round
        self.steps_in_round = 0
        self.seconds_in_round = 0.0

    def observe(self, paces: Sequence[tuple[str, int]]) -> None:
        """After an exchange: the (site, pace code) of every site in it, in any order. Balanced
        mode re-plans the next round from them; every site computes the same plan."""
        if self.mode != "balanced":
            return
        known = sorted((site, decode_pace(code)) for site, code in paces)
        if not known or any(s is None for _, s in known) or self.site not in {site for site, _ in known}:
            return  # a site has not measured yet: keep the current plan
        names = [site for site, _ in known]
        seconds = [float(s) for _, s in known]  # type: ignore[arg-type]
        # The round's work: the sites' H summed (a first split's own counts, where it gives them).
        total = sum((self.first_split or {}).get(site, self.inner_steps) for site in names)
        best = split_steps(total, seconds)
        current = [self.plan.get(site, self.inner_steps) for site in names]
        if sum(current) != total or makespan(best, seconds) * (1.0 + self.rebalance_gain) < makespan(current, seconds):
            self.plan = dict(zip(names, best))
        else:
            self.plan = dict(zip(names, current))
        self.planned = self.plan[self.site]
        self.planned_round_seconds = makespan([self.plan[n] for n in names], seconds)
        self.planned_step_seconds = seconds[names.index(self.site)]

    def expected_steps(self) -> int:
        """Steps this round is expected to take (for the learning-rate clock)."""
        if self.mode == "budget":
            return self.last_round_steps or self.inner_steps
        return self.planned

    def schedule_step(self) -> float:
        """Where the run is on a nominal axis of `rounds x inner_steps` steps, the same for every
        site whatever its own step count: the learning-rate schedule reads it."""
        fraction = min(1.0, self.steps_in_round / max(self.expected_steps(), 1))
        return (self.rounds_sent + fraction) * self.inner_steps

    def run_over(self) -> bool:
        return self.rounds_sent >= self.rounds

    def state_dict(self) -> dict[str, Any]:
        keys = ("rounds_sent", "steps_in_round", "seconds_in_round", "recent", "steps_measured")
        return {
            **{k: getattr(self, k) for k in keys},
            "planned": self.planned,
            "plan": dict(self.plan),
            "planned_round_seconds": self.planned_round_seconds,
            "planned_step_seconds": self.planned_step_seconds,
            "last_round_steps": self.last_round_steps,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("rounds_sent", "steps_in_round", "steps_measured", "planned", "last_round_steps"):
            setattr(self, k, int(state[k]))
        self.seconds_in_round = float(state["seconds_in_round"])
        self.recent = [float(x) for x in state["recent"]]
        self.plan = {str(k): int(v) for k, v in state["plan"].items()}
        self.planned_round_seconds = float(state["planned_round_seconds"])
        self.planned_step_seconds = float(state.get("planned_step_seconds", 0.0))
        self.history = [(int(a), int(b), float(c)) for a, b, c in state["history"]]
