"""Which part of the model each exchange carries: owners and streaming fragments.

Two independent splits, both pure functions of names and sizes, identical on every site:

- **Owners** (sharded outer exchange): each parameter belongs to one local rank
  (`assign_owners`, balanced by size); local rank r exchanges only its parameters with rank r
  of the other sites, so no byte crosses the WAN twice.
- **Fragments** (Streaming DiLoCo): the parameter names of atoll's `Transformer` are split into
  F fragments of whole decoder layers; fragment f syncs after the steps t with
  (t − offset_f) mod H = 0, offsets spread evenly over H (`StreamingSchedule`).

Who calls: the cross-site sync engine, once at setup and at every sync (`due`); `atoll.sync.lanes`
uses `assign_owners` for whole parameters. Pure: no process group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from atoll.errors import AtollError

__all__ = ["StreamingSchedule", "assign_owners", "count_layers", "split_fragments"]


def assign_owners(sizes: dict[str, int], *, num_ranks: int) -> dict[str, int]:
    """Give each parameter to one local rank: largest first, to the least loaded rank.

    Deterministic (ties by name, then rank), so every rank of every site computes the same
    owners. Whole parameters, not element ranges: codecs then see real tensors (low-rank needs
    matrices, top-k is per tensor), at the price of a less even split when one tensor (the
    embedding) is large. Raises `AtollError` for num_ranks < 1.
    """
    if num_ranks < 1:
        raise AtollError(f"num_ranks={num_ranks} must be at least 1")
    load = [0] * num_ranks
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(num_ranks), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += sizes[name]
    return owner


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FIRST = re.compile(r"(?:^|\.)embed\.[^.]+$")
_LAST = re.compile(r"(?:^|\.)(?:norm|lm_head)\.[^.]+$")


def count_layers(names: Sequence[str]) -> int:
    """How many decoder layers the names cover (at least 1: the most fragments a model takes)."""
    return len({m.group(1) for m in map(_LAYER.search, names) if m}) or 1


def split_fragments(
    names: Sequence[str],
    *,
    num_fragments: int,
    pattern: Literal["sequential", "strided"] = "sequential",
) -> list[list[str]]:
    """Partition the parameter names of atoll's `Transformer` into `num_fragments` fragments.

    Decoder layers go whole to one fragment: `sequential` gives each fragment a contiguous
    run of layers (run lengths differ by at most one, longer runs first), `strided` gives layer
    i to fragment i mod F. `embed.*` joins the first fragment, `norm.*` and `lm_head.*` the
    last. Names may carry a wrapper prefix (`module.`, `_orig_mod.`). Each fragment keeps the
    order of `names`. Raises `AtollError` for a name of another model, for F < 1 or F greater
    than the number of layers.
    """
    layer_of: list[int | None] = []
    for name in names:
        match = _LAYER.search(name)
        if match:
            layer_of.append(int(match.group(1)))
        elif _FIRST.search(name):
            layer_of.append(-1)
        elif _LAST.search(name):
            layer_of.append(None)
        else:
            raise AtollError(
                f"parameter {name!r} is not one of atoll's Transformer (embed.*, layers.<i>.*, "
                "norm.*, lm_head.*); streaming fragments need that naming"
            )
    num_layers = 1 + max((i for i in layer_of if i is not None), default=-1)
    if not isinstance(num_fragments, int) or not 1 <= num_fragments <= max(num_layers, 1):
        raise AtollError(
            f"num_fragments={num_fragments!r} must be between 1 and the number of decoder layers ({num_layers})"
        )
    if pattern not in ("sequential", "strided"):
        raise AtollError(f"fragment pattern {pattern!r} is not valid; use sequential or strided")
    base, extra = divmod(num_layers, num_fragments)
    starts = [f * base + min(f, extra) for f in range(num_fragments + 1)]

    def fragment_of(layer: int | None) -> int:
        if layer is None:
            return num_fragments - 1
        if layer < 0:
            return 0
        if pattern == "strided":
            return layer % num_fragments
        return next(f for f in range(num_fragments) if layer < starts[f + 1])

    fragments: list[list[str]] = [[] for _ in range(num_fragments)]
    for name, layer in zip(names, layer_of, strict=True):
        fragments[fragment_of(layer)].append(name)
    return fragments


@dataclass(frozen=True)
class StreamingSchedule:
    """When each of `num_fragments` fragments syncs, with one sync per fragment every
    `sync_every` (H) inner steps.

    Steps count inner steps done, from 1. Fragment f's offset is floor(f · H / F), and it is
    due after step t > 0 when (t − offset_f) mod H = 0; so fragment 0 syncs at H, 2H, ... and
    the others in between, spread evenly (with F > H some fragments share a step). Raises
    `AtollError` for F < 1 or H < 1.
    """

    num_fragments: int
    sync_every: int

    def __post_init__(self) -> None:
        for key in ("num_fragments", "sync_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise AtollError(f"{key}={value!r} must be a positive integer")

    @property
    def offsets(self) -> tuple[int, ...]:
        """offset_f for each fragment, non-decreasing in [0, H)."""
        return tuple(f * self.sync_every // self.num_fragments for f in range(self.num_fragments))

    def due(self, step: int) -> list[int]:
        """The fragments that sync after inner step `step` (ascending; empty for step ≤ 0)."""
        if step <= 0:
            return []
        return [f for f, off in enumerate(self.offsets) if (step - off) % self.sync_every == 0]

    def next_sync(self, fragment: int, step: int) -> int:
        """The first step > `step` after which `fragment` syncs."""
        wait = (self.offsets[fragment] - step) % self.sync_every
        return step + (wait or self.sync_every)
