"""What a run of uneven sites or ranks achieves: the planner's efficiency prediction.

Pure functions, no torch. Efficiency is HETHUB's measure: the tokens per second a run reaches over
the sum of what its parts reach alone. Two places lose it: the slowest part of a round or step
(others wait for it), and the exchange that ends a round. The same split functions the runtime
uses decide the counts (`atoll.sync.pacing.split_steps` for sites, `atoll.data.shares.split_counts`
for ranks), so the planner predicts the run that `atoll train` will do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from atoll.data.shares import split_counts
from atoll.sync.pacing import makespan, split_steps

Policy = Literal["equal", "balanced"]


def site_round_counts(step_seconds: Sequence[float], *, inner_steps: int, policy: Policy) -> list[int]:
    """Each site's inner steps per round: H everywhere (`equal`), or the runtime's balanced split of
    sites x H (`balanced`)."""
    if policy == "equal":
        return [inner_steps] * len(step_seconds)
    return split_steps(inner_steps * len(step_seconds), step_seconds)


def sites_efficiency(
    step_seconds: Sequence[float], *, inner_steps: int, policy: Policy, exchange_seconds: float = 0.0
) -> float:
    """Predicted efficiency of sites with these step times (same global batch per site): a round
    lasts its slowest site's steps plus the exchange, and does the sum of the sites' steps."""
    counts = site_round_counts(step_seconds, inner_steps=inner_steps, policy=policy)
    round_seconds = makespan(counts, step_seconds) + exchange_seconds
    solo = sum(1.0 / t for t in step_seconds)  # steps per second, summed over sites alone
    return sum(counts) / round_seconds / solo


def ranks_efficiency(
    sample_seconds: Sequence[float], *, global_batch: int, policy: Policy, reduce_seconds: float = 0.0
) -> float:
    """Predicted efficiency of one site whose ranks take `sample_seconds` per sample: a step lasts
    its slowest rank's share plus the gradient all-reduce."""
    weights = [1.0 / t for t in sample_seconds]
    counts = split_counts(global_batch, weights if policy == "balanced" else [1.0] * len(weights))
    step = max(c * t for c, t in zip(counts, sample_seconds)) + reduce_seconds
    return global_batch / step / sum(weights)
