"""Time to train as a distribution: the whole run, round by round, many times over.

The event simulator (`atoll.planner.simulate`) plays a few rounds in detail; a run of a trillion
tokens has up to a million steps, too many to play event by event for many trials. Here each
round (H inner steps) is drawn at once: a site's round takes H·mean + sqrt(H)·sigma·Z plus its
stragglers (a binomial count of steps, each `straggler_factor` times longer); the round waits
for the slowest site and then for the exposed WAN time of the strategy. Failures arrive as a
Poisson process per site. In ddp each one stops everybody for the recovery and the redo of the
work since the last checkpoint (uniform over the interval); otherwise the failed site's tokens
are lost for the rounds it needs to restart and heal, and the run lasts until the kept tokens
reach the target.

With no jitter and no failures the result is exactly the analytic steps x wall step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from atoll.planner.simulate import Disturbances, SimSite
from atoll.planner.wan import Strategy, exposed_per_round


@dataclass(frozen=True)
class HorizonResult:
    seconds: tuple[float, ...]
    """Time to train of each trial."""
    utilization: float
    """Mean device-weighted compute utilization over all trials."""
    failures: float
    """Mean number of failures per trial."""

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.seconds), q))

    @property
    def days_p10(self) -> float:
        return self.percentile(10) / 86400

    @property
    def days_p50(self) -> float:
        return self.percentile(50) / 86400

    @property
    def days_p90(self) -> float:
        return self.percentile(90) / 86400


def time_to_train(
    sites: list[SimSite],
    *,
    strategy: Strategy,
    inner_steps: int,
    sync_s: float,
    total_steps: int,
    sync_latency_s: float = 0.0,
    fragments: int = 1,
    overlap_steps: int = 0,
    disturbances: Disturbances = Disturbances(),  # noqa: B008 -- frozen dataclass, a shared default is safe
    heal_s: dict[str, float] | None = None,
    checkpoint_interval_s: float = 3600.0,
    trials: int = 20,
) -> HorizonResult:
    """Monte Carlo distribution of the time to finish `total_steps` inner steps' worth of tokens.

    `sync_s` is the WAN time of one full exchange (0 for one site). Deterministic per seed.
    """
    rng = np.random.default_rng(disturbances.seed)
    single = len(sites) == 1
    h = 1 if strategy == "ddp" or single else inner_steps
    rounds = math.ceil(total_steps / h)
    mean = np.array([s.step_s for s in sites])
    tokens = np.array([s.tokens_per_step * h for s in sites], dtype=float)
    devices = np.array([s.devices for s in sites], dtype=float)
    rates = np.array([s.failure_rate_per_s for s in sites])
    heal = np.array([(heal_s or {}).get(s.name, 0.0) for s in sites])
    target = tokens.sum() * rounds
    results, utils, fails = [], [], []
    for _ in range(trials):
        # Draw extra rounds for tokens lost to failures; grow if it is not enough.
        n = rounds + max(8, rounds // 20) if disturbances.failures else rounds
        while True:
            compute = _round_compute(rng, mean, h, n, disturbances)  # (n, S)
            slowest = compute.max(axis=1)
            if single:
                exposed = np.zeros(n)
            else:
                exposed = (
                    np.array(
                        [
                            exposed_per_round(
                                strategy,
                                inner_steps=h,
                                step_s=s / h,
                                sync_s=sync_s,
                                fragments=fragments,
                                overlap_steps=overlap_steps,
                                latency_s=sync_latency_s,
                            )
                            for s in slowest
                        ]
                    )
                    if strategy in ("delayed", "streaming")
                    else np.full(n, sync_s)
                )
            round_s = slowest + exposed
            kept = np.ones_like(compute)
            stalls = np.zeros(n, dtype=np.int64)
            counts = np.zeros((n, len(sites)), dtype=np.int64)
            if disturbances.failures and rates.any():
                counts = rng.poisson(np.outer(round_s, rates))  # (n, S)
                if strategy == "ddp" or single:
                    stalls = counts.sum(axis=1)
                else:
                    mean_round = float(round_s.mean())
                    for j in range(len(sites)):
                        miss = 1 + int((disturbances.recovery_s + heal[j]) // max(mean_round, 1e-9))
                        hit = np.convolve((counts[:, j] > 0).astype(float), np.ones(miss))[:n] > 0
                        kept[hit, j] = 0.0
            got = np.cumsum((kept * tokens).sum(axis=1))
            done = np.searchsorted(got, target - 1e-6 * target)
            if done < n:
                break
            n *= 2
        last = done + 1
        # Synchronous failures: everyone waits for the recovery and redoes the work since the
        # last checkpoint (uniform over the interval).
        num_stalls = int(stalls[:last].sum())
        extra = num_stalls * disturbances.recovery_s + float(rng.uniform(0, checkpoint_interval_s, num_stalls).sum())
        wall = float(round_s[:last].sum()) + extra
        results.append(wall)
        busy = float((compute[:last] * kept[:last] * devices).sum())
        utils.append(busy / (devices.sum() * wall))
        fails.append(float(counts[:last].sum()))
    return HorizonResult(seconds=tuple(results), utilization=float(np.mean(utils)), failures=float(np.mean(fails)))


def _round_compute(rng: np.random.Generator, mean: np.ndarray, h: int, n: int, d: Disturbances) -> np.ndarray:
    s = len(mean)
    base = np.tile(mean * h, (n, 1))
    if d.jitter > 0:
        base = base + rng.standard_normal((n, s)) * (d.jitter * mean * math.sqrt(h))
        base = np.maximum(base, 0.5 * mean * h)
    if d.straggler_prob > 0:
        slow = rng.binomial(h, d.straggler_prob, size=(n, s))
        base = base + slow * (d.straggler_factor - 1.0) * mean
    return base
