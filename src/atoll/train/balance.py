"""Uneven ranks inside a site: each rank's share of the global batch follows its speed.

Used by the one training loop (`atoll.train.loop`) on every rank, for pre-training and
fine-tuning alike. A site whose ranks stand for different devices (several `devices` entries of
other kinds or slowdowns in its topology entry, or `parallel.rank_slowdowns` on one site) starts
from the catalog's figures (peak FLOP/s over the emulated slowdown) and then, every
`parallel.rebalance_every` steps, re-splits the batch in proportion to the samples per second
each rank measured, with largest-remainder rounding and at least one sample each
(`atoll.data.shares.split_counts`). The speeds are summed over the site (each rank fills its own
slot), so every rank computes the same split.

Nothing changes in what is learned: the global batch is the same samples, and each rank's summed
loss is scaled by world_size / global targets, so the gradient stays the global-batch mean
whatever the split. Such a site measures each rank's own compute: its micro-batches run without
DDP's overlapped all-reduce, and the gradients are summed over the site in one all-reduce after
the (emulated) slowdown, as a slower chip would reach it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from atoll.config.schema import ParallelSection
from atoll.config.topology import SiteSpec
from atoll.data.shares import split_counts
from atoll.hardware import get_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankDevice:
    """What one rank of a site stands for."""

    kind: str
    slowdown: float = 1.0
    share: float | None = None  # a plan's sequences per step for one device of this kind

    @property
    def prior_speed(self) -> float:
        """Relative speed before any measurement: the plan's share, else the catalog's peak FLOP/s,
        over the emulated slowdown."""
        base = self.share if self.share is not None else get_device(self.kind).peak_tflops
        return base / self.slowdown


def site_speed(site: SiteSpec) -> float:
    """A site's speed on paper: its devices' peak FLOP/s over their emulated slowdowns, summed.
    Every site has the same global batch, so a site's step time goes as its inverse."""
    return sum(get_device(d.kind).peak_tflops * d.count / d.slowdown for d in site.devices)


def rank_devices(parallel: ParallelSection, site: SiteSpec | None, *, world_size: int) -> list[RankDevice]:
    """Each rank's device: from the site's topology entry (rank r takes its r-th device), else
    `parallel.rank_slowdowns` (one site in the lab), else plain CPUs; `parallel.device_shares`
    (a plan's split) sets where their shares start."""
    shares = parallel.device_shares
    if site is not None:
        return [RankDevice(d.kind, d.slowdown, shares.get(d.kind)) for d in site.rank_devices(world_size)]
    slow = parallel.rank_slowdowns or [1.0]
    return [RankDevice("cpu", slow[r % len(slow)], shares.get("cpu")) for r in range(world_size)]


class Sliceable(Protocol):
    def set_slice(self, rank_start: int, rank_count: int) -> None: ...


@dataclass
class RankBalancer:
    """One rank's share of the global batch, re-measured every `every` steps (0: never).

    `sum_over_site(values)`: the element-wise sum over the site's ranks (a collective).
    """

    global_batch: int
    rank: int
    devices: list[RankDevice]
    every: int
    sum_over_site: Callable[[list[float]], list[float]] = field(repr=False)
    balance: bool = True  # False: equal shares whatever the speeds (measured all the same)
    measure: bool = False  # measure each rank alone even when the devices are alike (lab emulation)
    counts: list[int] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)  # the speeds the current split follows
    _samples: float = 0.0
    _seconds: float = 0.0
    _steps: int = 0
    _measured: bool = False
    history: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.speeds = [d.prior_speed for d in self.devices]
        self.counts = split_counts(self.global_batch, self.speeds if self.balance else [1.0] * len(self.devices))
        self.history.append(list(self.counts))

    @property
    def uneven(self) -> bool:
        """Whether the ranks differ: only then does the loop measure each rank on its own."""
        return self.measure or len({(d.kind, d.slowdown) for d in self.devices}) > 1

    @property
    def slowdown(self) -> float:
        return self.devices[self.rank].slowdown

    @property
    def measured(self) -> list[float] | None:
        """The ranks' measured samples/s (None before the first measurement)."""
        return self.speeds if self._measured else None

    def slice(self) -> tuple[int, int]:
        """This rank's (start, count) of each global batch."""
        return sum(self.counts[: self.rank]), self.counts[self.rank]

    def record(self, *, samples: int, seconds: float, batches: Sliceable) -> bool:
        """One step of this rank's own compute; every `every` steps the site re-splits (collective,
        on every rank at the same step). Returns whether the split changed (then `batches` already
        takes the new slice from the next step on)."""
        self._steps += 1
        if self._steps > 1:  # the first step pays for warm-up
            self._samples += samples
            self._seconds += seconds
        if not self.every or self._steps % self.every or self._seconds <= 0:
            return False
        mine = self._samples / self._seconds
        self._samples = self._seconds = 0.0
        slots = [0.0] * len(self.devices)
        slots[self.rank] = mine
        speeds = self.sum_over_site(slots)
        if not all(s > 0 for s in speeds):
            return False
        self._measured = True
        self.speeds = list(speeds)
        counts = split_counts(self.global_batch, speeds) if self.balance else self.counts
        if counts == self.counts:
            return False
        self.counts = counts
        self.history.append(list(counts))
        batches.set_slice(*self.slice())
        if self.rank == 0:
            log.info("rank shares of the global batch: %s (measured samples/s %s)", counts, _fmt(speeds))
        return True


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"
