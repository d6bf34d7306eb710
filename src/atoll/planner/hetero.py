"""What a run of uneven sites or ranks achieves: the planner's efficiency prediction.

Pure functions, no torch. Efficiency is HETHUB's measure: the tokens per second a run reaches over
the sum of what its parts reach alone. `predict_efficiency` is the one formula; `atoll plan` feeds
it the planner's step estimates (`Candidate.efficiency`) and `bench/hetero.py` the speeds a run measured
(`sites_efficiency`, `ranks_efficiency`), so the benchmark checks the planner's own prediction.

Three things make it less than 1, and the prediction names each:

- *inside a site* (`ranks`): a step lasts its slowest rank's share; shares are whole samples
  (largest remainder, at least one each: `atoll.data.shares.split_counts`, the runtime's function)
  cut into whole micro-batches. Alone, a group of alike devices has its own data-parallel traffic
  (HETHUB's solo: each homogeneous part training by itself); a single device has none.
- *between sites* (`rounds`): each site runs its own whole number of inner steps per round
  (`atoll.sync.pacing.split_steps`, the runtime's function), so the others wait for the site whose
  steps end last.
- *the exchange* (`exchange`): the seconds per round compute waits for the WAN (the link model's
  exchange time less what the strategy overlaps, `atoll.planner.wan.exposed_per_round`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from atoll.data.shares import split_counts
from atoll.sync.pacing import split_steps

Policy = Literal["equal", "balanced"]


@dataclass(frozen=True)
class SitePace:
    """One site as the efficiency model sees it."""

    name: str
    inner_steps: int
    """The site's inner steps per round (its H)."""
    step_seconds: float
    """One inner step of the site's batch: its slowest rank's share, plus its in-site traffic."""
    batch: int
    """Sequences per inner step."""
    solo_rate: float
    """Sequences per second of the site's groups of alike devices, each training alone on whole
    micro-batches."""


@dataclass(frozen=True)
class Efficiency:
    """A predicted efficiency and where the rest goes: `efficiency = ranks x rounds x exchange`."""

    efficiency: float
    ranks: float
    """Throughput of the sites' steps over their devices' solo throughput (shares, micro-batches)."""
    rounds: float
    """Lost to whole inner steps per site: the others wait for the site whose round ends last."""
    exchange: float
    """Lost to the exchange's seconds that compute waits for."""
    round_seconds: float
    """A round: the slowest site's compute plus the exposed exchange."""
    sites: dict[str, float]
    """Each site's throughput in the run over its solo throughput."""

    def describe(self) -> str:
        """One line: the efficiency and its three factors."""
        return (
            f"predicted efficiency {self.efficiency:.1%} of the devices' combined solo throughput "
            f"(inside sites {self.ranks:.1%} x rounds {self.rounds:.1%} x exchange {self.exchange:.1%})"
        )


def predict_efficiency(sites: Sequence[SitePace], *, exchange_seconds: float = 0.0) -> Efficiency:
    """The efficiency of a run whose sites run `inner_steps` steps of `step_seconds` each per round
    and then wait `exchange_seconds` for the exchange: the sequences of a round over the round's
    time, divided by the sum of the sites' solo rates. Raises `ValueError` on an empty or
    non-positive input."""
    if not sites or any(s.step_seconds <= 0 or s.solo_rate <= 0 or s.inner_steps < 1 for s in sites):
        raise ValueError(f"every site needs a positive step time, solo rate and H: {list(sites)}")
    compute = max(s.inner_steps * s.step_seconds for s in sites)
    round_seconds = compute + max(0.0, exchange_seconds)
    solo = sum(s.solo_rate for s in sites)
    stepping = sum(s.batch / s.step_seconds for s in sites)  # every site busy, no one waiting
    done = sum(s.inner_steps * s.batch for s in sites)  # sequences per round
    return Efficiency(
        efficiency=done / round_seconds / solo,
        ranks=stepping / solo,
        rounds=done / compute / stepping,
        exchange=compute / round_seconds,
        round_seconds=round_seconds,
        sites={s.name: s.inner_steps * s.batch / round_seconds / s.solo_rate for s in sites},
    )


def site_round_counts(step_seconds: Sequence[float], *, inner_steps: int, policy: Policy) -> list[int]:
    """Each site's inner steps per round: H everywhere (`equal`), or the runtime's balanced split of
    sites x H (`balanced`)."""
    if policy == "equal":
        return [inner_steps] * len(step_seconds)
    return split_steps(inner_steps * len(step_seconds), step_seconds)


def sites_efficiency(
    step_seconds: Sequence[float],
    *,
    inner_steps: int,
    policy: Policy,
    exchange_seconds: float = 0.0,
) -> float:
    """The efficiency of sites with these step times (the same batch each; alone, each as fast as
    its steps) whose rounds `policy` splits: `predict_efficiency`'s."""
    counts = site_round_counts(step_seconds, inner_steps=inner_steps, policy=policy)
    paces = [SitePace(f"site{i}", h, t, 1, 1.0 / t) for i, (h, t) in enumerate(zip(counts, step_seconds, strict=True))]
    return predict_efficiency(paces, exchange_seconds=exchange_seconds).efficiency


def rank_step(
    sample_seconds: Sequence[float],
    *,
    batch: int,
    micro_batch: int = 1,
    policy: Policy = "balanced",
    reduce_seconds: float = 0.0,
) -> tuple[float, float, list[int]]:
    """(step seconds, solo sequences per second, shares) of one site whose ranks take
    `sample_seconds` per sample: shares by speed as the runtime splits them (`equal`: even), each
    rank's share run as whole micro-batches (a partial one costs a full one), the step ending with
    the slowest rank plus the gradient all-reduce (`reduce_seconds`)."""
    weights = [1.0 / t for t in sample_seconds]
    counts = split_counts(batch, weights if policy == "balanced" else [1.0] * len(weights))
    step = max(math.ceil(c / micro_batch) * micro_batch * t for c, t in zip(counts, sample_seconds))
    return step + reduce_seconds, sum(weights), counts


def ranks_efficiency(
    sample_seconds: Sequence[float],
    *,
    global_batch: int,
    policy: Policy,
    reduce_seconds: float = 0.0,
    micro_batch: int = 1,
) -> float:
    """The efficiency of one site whose ranks take `sample_seconds` per sample (`rank_step`):
    `predict_efficiency`'s for one site and no exchange."""
    step, solo, _ = rank_step(
        sample_seconds, batch=global_batch, micro_batch=micro_batch, policy=policy, reduce_seconds=reduce_seconds
    )
    return predict_efficiency([SitePace("site", 1, step, global_batch, solo)]).efficiency
