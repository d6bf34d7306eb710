"""What each rank of a site holds of the model's parameters, whatever the intra-site layout.

The cross-site exchange must not care how a site spreads its parameters over its ranks (DDP
replicas, FSDP2 shards, tensor-parallel shards, pipeline stages): it reads only what each rank
actually holds. A parameter on a rank is

- a plain tensor: the whole canonical tensor, replicated on every rank that has it;
- a DTensor: the box (offset and shape in the global tensor) its placements give this rank
  (`compute_local_shape_and_global_offset`: Shard, Replicate, and FSDP2-over-TP's strided shard);
- absent: other ranks hold it (a pipeline stage holds only its layers, under canonical names).

`SiteView.gather` collects every rank's holdings once at start-up (one all-gather of objects
inside the site) and checks that the distinct boxes of each parameter tile it exactly, so that
every element is read from and written to real holders. The canonical order of the names
(`canonical_order`) is the same on every site whatever its layout: θ's digest is taken over full
tensors in that order. Pure but for `gather`; no cross-site traffic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from atoll.errors import AtollError

__all__ = ["Box", "Holding", "SiteView", "canonical_order", "describe", "local_tensor"]


@dataclass(frozen=True)
class Box:
    """A rectangular block of a tensor: its offset and shape in every dimension."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @classmethod
    def full(cls, shape: Sequence[int]) -> Box:
        return cls(tuple(0 for _ in shape), tuple(int(s) for s in shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def intersect(self, other: Box) -> Box | None:
        """The common block of two boxes of one tensor, None when they share no element."""
        lo = tuple(max(a, b) for a, b in zip(self.offset, other.offset, strict=True))
        hi = tuple(
            min(a + n, b + m) for a, n, b, m in zip(self.offset, self.shape, other.offset, other.shape, strict=True)
        )
        if any(h <= low for low, h in zip(lo, hi)) and self.shape:
            return None
        return Box(lo, tuple(h - low for low, h in zip(lo, hi)))

    def within(self, outer: Box) -> tuple[slice, ...]:
        """Index of this box inside a tensor that holds `outer` (this box lies inside it)."""
        return tuple(slice(o - p, o - p + n) for o, p, n in zip(self.offset, outer.offset, self.shape, strict=True))

    def label(self) -> str:
        return ",".join(f"{o}:{o + n}" for o, n in zip(self.offset, self.shape))


@dataclass(frozen=True)
class Holding:
    """What one rank holds of one parameter: the canonical name, the global shape, its box."""

    name: str
    shape: tuple[int, ...]
    box: Box


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The elements this rank holds: a DTensor's local shard, a plain tensor itself (a view)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and _is_dtensor(t) else t


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def describe(params: Iterable[tuple[str, torch.Tensor]]) -> list[Holding]:
    """This rank's holdings, in the order given. Raises `AtollError` for a placement that is not
    a block of the global tensor (a partial sum: parameters never are)."""
    out = []
    for name, p in params:
        shape = tuple(int(s) for s in p.shape)
        if not _is_dtensor(p):
            out.append(Holding(name, shape, Box.full(shape)))
            continue
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
        for placement in placements:
            # FSDP2 over TP on one dim is a strided shard: one block, as DCP's checkpoints read it too.
            strided = type(placement).__name__ == "_StridedShard"
            if not (placement.is_shard() or placement.is_replicate() or strided):
                raise AtollError(
                    f"parameter {name} is placed as {placement} on its mesh: the cross-site exchange reads "
                    "blocks of parameters (Shard or Replicate placements); use such a layout inside the site"
                )
        local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
        if tuple(local_shape) != tuple(p.to_local().shape):  # type: ignore[attr-defined]
            raise AtollError(
                f"parameter {name}: its local shard {tuple(p.to_local().shape)} is not the block "  # type: ignore[attr-defined]
                f"{tuple(local_shape)} its placements give; the cross-site exchange cannot read it"
            )
        out.append(Holding(name, shape, Box(tuple(offset), tuple(local_shape))))
    return out


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FIRST = re.compile(r"(?:^|\.)embed\.[^.]+$")


def _group(name: str) -> float:
    """Where a name sits in atoll's Transformer: embeddings, decoder layer i, the rest last."""
    match = _LAYER.search(name)
    if match:
        return float(match.group(1))
    return -1.0 if _FIRST.search(name) else math.inf


def canonical_order(per_rank: Sequence[Sequence[str]]) -> list[str]:
    """One order of the union of the ranks' names, the same for any layout of the same model.

    By the name's place in the model (embeddings, decoder layers by index, then the rest), then
    by the first rank's order that lists it (the module's own order). A site whose rank 0 holds
    every parameter of atoll's Transformer gets the module's order unchanged.
    """
    first: dict[str, tuple[int, int]] = {}
    for r, names in enumerate(per_rank):
        for i, n in enumerate(names):
            first.setdefault(n, (r, i))
    return sorted(first, key=lambda n: (_group(n), first[n]))


@dataclass
class SiteView:
    """Every rank's holdings of every parameter of one site, and the canonical names and shapes."""

    names: list[str]  # canonical order
    shapes: dict[str, tuple[int, ...]]
    holders: dict[str, list[tuple[int, Box]]]  # per name: (rank, box) of every rank holding a non-empty part
    num_ranks: int

    @classmethod
    def from_holdings(cls, per_rank: Sequence[Sequence[Holding]]) -> SiteView:
        """Raises `AtollError` when ranks disagree on a shape or a parameter's distinct blocks do
        not tile it (an element held nowhere, or two blocks overlapping)."""
        shapes: dict[str, tuple[int, ...]] = {}
        holders: dict[str, list[tuple[int, Box]]] = {}
        for rank, holdings in enumerate(per_rank):
            for h in holdings:
                if shapes.setdefault(h.name, h.shape) != h.shape:
                    raise AtollError(
                        f"parameter {h.name} has shape {shapes[h.name]} on one rank and {h.shape} on rank {rank}: "
                        "every rank of a site must build the same model"
                    )
                holders.setdefault(h.name, [])
                if h.box.numel > 0:
                    holders[h.name].append((rank, h.box))
        for name, held in holders.items():
            distinct = sorted({box for _, box in held}, key=lambda b: b.offset)
            covered = sum(b.numel for b in distinct)
            overlap = any(a.intersect(b) is not None for i, a in enumerate(distinct) for b in distinct[i + 1 :])
            if covered != math.prod(shapes[name]) or overlap:
                raise AtollError(
                    f"parameter {name}: the site's ranks hold blocks that do not tile its shape {shapes[name]} "
                    f"({', '.join(b.label() for b in distinct) or 'none'}); the cross-site exchange needs every "
                    "element held by some rank, in one block"
                )
        names = canonical_order([[h.name for h in holdings] for holdings in per_rank])
        return cls(names, shapes, holders, len(per_rank))

    @classmethod
    def gather(cls, params: Sequence[tuple[str, torch.Tensor]], *, num_ranks: int) -> SiteView:
        """The view of a site, from every rank's parameters. Collective over the site's default
        process group when it has several ranks (an all-gather of objects, once); blocks."""
        mine = describe(params)
        if num_ranks == 1 or not dist.is_initialized():
            return cls.from_holdings([mine])
        everyone: list[list[Holding] | None] = [None] * num_ranks
        dist.all_gather_object(everyone, mine)
        return cls.from_holdings([h or [] for h in everyone])

    def numel(self, name: str) -> int:
        return math.prod(self.shapes[name])

    def held_by(self, rank: int) -> dict[str, Box]:
        """The box `rank` holds of each parameter it has."""
        return {n: box for n, held in self.holders.items() for r, box in held if r == rank}

    def replicated_everywhere(self) -> bool:
        """Whether every rank holds every parameter whole (a DDP site, or a single rank)."""
        return all(
            len(held) == self.num_ranks and all(box.numel == self.numel(n) for _, box in held)
            for n, held in self.holders.items()
        )

    def signature(self) -> list[tuple[str, tuple[int, ...], list[tuple[int, str]]]]:
        """The layout in plain values (names, shapes, who holds which block), to compare sites."""
        return [(n, self.shapes[n], [(r, b.label()) for r, b in self.holders[n]]) for n in self.names]
