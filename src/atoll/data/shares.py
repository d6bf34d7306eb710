"""Shares of a whole: how many of `total` items each part gets, in proportion to weights.

Pure Python (no torch): the loader uses it to split a global batch between ranks of different
speeds, the planner to predict what such a split achieves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from atoll.errors import AtollError


def split_counts(total: int, weights: Sequence[float], *, minimum: int = 1) -> list[int]:
    """`total` items shared in proportion to `weights`, each getting at least `minimum`.

    Largest-remainder rounding (Hamilton): each share is its quota's floor (raised to `minimum`),
    then the items left go to the largest fractional parts (an excess is taken back from the
    smallest ones above the minimum); ties go to the lower index. Pure and deterministic, so every
    rank computing it from the same weights gets the same split. Raises `AtollError` when `total`
    cannot give everyone `minimum` or a weight is not positive.
    """
    n = len(weights)
    if n == 0 or total < n * minimum:
        raise AtollError(f"{total} samples cannot give each of {n} ranks {minimum}: raise the global batch")
    if any(not (math.isfinite(w) and w > 0) for w in weights):
        raise AtollError(f"rank speeds must be positive and finite, got {list(weights)}")
    whole = sum(weights)
    quotas = [total * w / whole for w in weights]
    counts = [max(minimum, int(q)) for q in quotas]
    order = sorted(range(n), key=lambda i: (-(quotas[i] - counts[i]), i))
    k = 0
    while sum(counts) < total:
        counts[order[k % n]] += 1
        k += 1
    for i in reversed(order):
        while sum(counts) > total and counts[i] > minimum:
            counts[i] -= 1
    return counts
