"""Per-site search: the fastest layout that fits in memory, and its step time.

A site may hold several device groups (kinds) that share one collective backend. They share one
TP x PP layout (it must fit the smallest memory); each group contributes count/(tp·pp) replicas,
and the site's sequences are split across replicas in proportion to their speed as the runtime
splits them (`atoll.data.shares.split_counts`: largest remainder, at least one each), so that a
step ends at about the same time everywhere.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

from atoll.data.shares import split_counts
from atoll.errors import AtollError
from atoll.hardware import DeviceSpec
from atoll.planner.memory import MemoryEstimate, estimate_memory
from atoll.planner.shape import ModelShape
from atoll.planner.step import ATOLL_RUNTIME, Layout, RuntimeProfile, StepEstimate, estimate_step


@dataclass(frozen=True)
class DeviceGroup:
    device: DeviceSpec
    count: int
    per_node: int = 8


@dataclass(frozen=True)
class SearchSpace:
    """Which layout knobs the per-site search may turn."""

    tp: tuple[int, ...] = (1, 2, 4, 8)
    micro_batch: tuple[int, ...] = (1, 2, 4, 8)
    zero: tuple[int, ...] = (1, 3)
    recompute: tuple[str, ...] = ("none", "selective", "full")
    interleave: tuple[int, ...] = (1, 2, 4)
    sequence_parallel: bool = True
    max_pp: int = 128


@dataclass(frozen=True)
class SiteEstimate:
    """A site's layout, batch and predicted step."""

    layout: Layout
    """Shared layout; `layout.dp` is the site's total number of replicas."""
    batch: int
    """Sequences per step (inner step) in this site."""
    groups: tuple[DeviceGroup, ...]
    replicas: tuple[int, ...]
    """Replicas per group."""
    micro_batches: tuple[int, ...]
    """Micro-batches per replica, per group (the slowest replica of a group sets its pace)."""
    steps: tuple[StepEstimate, ...]
    """One estimate per group (with that group's micro-batches)."""
    memory: tuple[MemoryEstimate, ...]
    seq_len: int
    sequences: tuple[int, ...]
    """Sequences per step, per group (they add up to `batch`)."""
    notes: tuple[str, ...] = field(default=())

    @property
    def seconds(self) -> float:
        """Step time of the site: its slowest group."""
        return max(step.seconds for step in self.steps)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def devices_used(self) -> int:
        return sum(r * self.layout.tp * self.layout.pp for r in self.replicas)

    @property
    def devices_total(self) -> int:
        return sum(g.count for g in self.groups)

    def group_tokens(self, index: int) -> int:
        """Tokens group `index` processes per step (its share of `batch`)."""
        return self.sequences[index] * self.seq_len


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainders get the rest)."""
    wsum = sum(weights)
    exact = [total * w / wsum for w in weights]
    base = [math.floor(x) for x in exact]
    rest = total - sum(base)
    order = sorted(range(len(weights)), key=lambda i: exact[i] - base[i], reverse=True)
    for i in order[:rest]:
        base[i] += 1
    return base


def evaluate_site(
    shape: ModelShape,
    groups: tuple[DeviceGroup, ...],
    layout: Layout,
    *,
    batch: int,
    seq_len: int,
    runtime: RuntimeProfile = ATOLL_RUNTIME,
) -> SiteEstimate | None:
    """Step time and memory of `layout` on the site's groups, or None when it does not fit/apply.

    `layout.dp` is ignored: replicas come from each group's device count.
    """
    mp = layout.tp * layout.pp
    replicas = [g.count // mp for g in groups]
    total_replicas = sum(replicas)
    if total_replicas == 0 or batch < total_replicas:
        return None
    if any(layout.tp > g.per_node and r > 0 for g, r in zip(groups, replicas)):
        return None
    lay = Layout(
        tp=layout.tp,
        pp=layout.pp,
        dp=total_replicas,
        vp=layout.vp,
        micro_batch=layout.micro_batch,
        zero=layout.zero,
        recompute=layout.recompute,
        sequence_parallel=layout.sequence_parallel,
    )
    b = lay.micro_batch
    if b * total_replicas > batch:
        return None
    # Cheap rejection first: memory with the micro-batches of an even split.
    even_micro = math.ceil(batch / (total_replicas * b))
    for g, r in zip(groups, replicas):
        if r and not _memory(shape, g, lay, micro_batches=even_micro, seq_len=seq_len, runtime=runtime).fits:
            return None
    if len(groups) == 1:
        sequences = [batch]
        busiest = [math.ceil(batch / total_replicas)]  # an even split
    else:
        # Speed of one replica of each group: one micro-batch through its stage.
        speeds = [
            1.0
            / estimate_step(
                shape,
                seq_len=seq_len,
                layout=lay,
                micro_batches=1,
                device=g.device,
                per_node=g.per_node,
                runtime=runtime,
            ).stage_seconds
            if r
            else 0.0
            for g, r in zip(groups, replicas)
        ]
        # The runtime's split (`atoll.data.shares.split_counts`): replica by replica, by speed,
        # largest remainder, at least one sequence each; a group's pace is its busiest replica's.
        weights = [v for v, r in zip(speeds, replicas) for _ in range(r)]
        counts = split_counts(batch, weights)
        owner = [i for i, r in enumerate(replicas) for _ in range(r)]
        sequences = [sum(c for c, o in zip(counts, owner) if o == i) for i in range(len(groups))]
        busiest = [max((c for c, o in zip(counts, owner) if o == i), default=0) for i in range(len(groups))]
    micro = [math.ceil(busiest[i] / b) if replicas[i] else 0 for i in range(len(groups))]
    steps, mems = [], []
    for i, g in enumerate(groups):
        if replicas[i] == 0:
            continue
        m = max(1, micro[i])
        mem = _memory(shape, g, lay, micro_batches=m, seq_len=seq_len, runtime=runtime)
        if not mem.fits:
            return None
        mems.append(mem)
        steps.append(
            estimate_step(
                shape,
                seq_len=seq_len,
                layout=lay,
                micro_batches=m,
                device=g.device,
                per_node=g.per_node,
                runtime=runtime,
            )
        )
    return SiteEstimate(
        layout=lay,
        batch=batch,
        groups=tuple(g for i, g in enumerate(groups) if replicas[i] > 0),
        replicas=tuple(r for r in replicas if r > 0),
        micro_batches=tuple(max(1, micro[i]) for i in range(len(groups)) if replicas[i] > 0),
        steps=tuple(steps),
        memory=tuple(mems),
        seq_len=seq_len,
        sequences=tuple(sequences[i] for i in range(len(groups)) if replicas[i] > 0),
    )


def _memory(
    shape: ModelShape, group: DeviceGroup, lay: Layout, *, micro_batches: int, seq_len: int, runtime: RuntimeProfile
) -> MemoryEstimate:
    return estimate_memory(
        shape,
        seq_len=seq_len,
        micro_batch=lay.micro_batch,
        micro_batches=micro_batches,
        tp=lay.tp,
        pp=lay.pp,
        dp=lay.dp,
        vp=lay.vp,
        zero=lay.zero,
        recompute=lay.recompute,
        sequence_parallel=lay.sequence_parallel,
        attention=runtime.attention,
        dropout=runtime.dropout,
        element_bytes=group.device.compute_bytes,
        eager=runtime.eager_activations,
        capacity_bytes=group.device.memory_bytes,
    )


def candidate_layouts(
    shape: ModelShape,
    groups: tuple[DeviceGroup, ...],
    *,
    space: SearchSpace,
    runtime: RuntimeProfile,
    divide_devices: bool = True,
) -> list[Layout]:
    """Every layout the search space allows for these groups (before memory and batch checks).

    With `divide_devices`, tp x pp must divide every group's device count (no idle devices)."""
    max_devices = max(g.count for g in groups)
    per_node = min(g.per_node for g in groups)
    out = []
    recomputes = [r for r in space.recompute if not (r == "selective" and runtime.attention == "flash")]
    for tp in space.tp:
        if tp > per_node or shape.num_heads % tp or (shape.num_kv_heads % tp and tp % shape.num_kv_heads):
            continue
        for pp in _divisors(shape.num_layers):
            if pp > space.max_pp or tp * pp > max_devices:
                continue
            if divide_devices and any(g.count % (tp * pp) for g in groups):
                continue
            for vp in space.interleave if pp > 1 else (1,):
                if (shape.num_layers // pp) % vp:
                    continue
                sps = (True,) if (tp > 1 and space.sequence_parallel) else (False,)
                for b, zero, rc, sp in itertools.product(space.micro_batch, space.zero, recomputes, sps):
                    out.append(
                        Layout(tp=tp, pp=pp, dp=1, vp=vp, micro_batch=b, zero=zero, recompute=rc, sequence_parallel=sp)
                    )
    return out


@functools.lru_cache(maxsize=1024)
def best_site_layout(
    shape: ModelShape,
    groups: tuple[DeviceGroup, ...],
    *,
    batch: int,
    seq_len: int,
    space: SearchSpace = SearchSpace(),
    runtime: RuntimeProfile = ATOLL_RUNTIME,
    top: int = 1,
) -> tuple[SiteEstimate, ...]:
    """The `top` fastest layouts (shortest step for `batch` sequences) that fit; () when none fits.

    Cached: the cross-site search asks for the same site and batch many times."""
    results = []
    for divide in (True, False):  # idle devices only when no layout uses them all
        for lay in candidate_layouts(shape, groups, space=space, runtime=runtime, divide_devices=divide):
            est = evaluate_site(shape, groups, lay, batch=batch, seq_len=seq_len, runtime=runtime)
            if est is not None:
                results.append(est)
        if results:
            break
    results.sort(key=lambda e: (e.seconds, e.layout.tp * e.layout.pp, e.layout.zero))
    return tuple(results[:top])


def min_devices_needed(shape: ModelShape, device: DeviceSpec) -> int:
    """A lower bound on devices of this kind that can hold the model: 16 bytes per parameter of
    model states (fully sharded) in the memory left after the runtime's workspace."""
    from atoll.planner.memory import WORKSPACE_BYTES

    usable = device.memory_bytes - WORKSPACE_BYTES
    if usable <= 0:
        raise AtollError(f"device {device.kind} has {device.memory_gb} GB, less than the runtime workspace")
    return math.ceil(16.0 * shape.num_params() / usable)
