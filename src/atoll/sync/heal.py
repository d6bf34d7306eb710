"""The bytes of a heal: θ and the outer momentum of one rank's share of a unit, from a live peer.

A site that restarted, missed rounds or holds a θ the others do not (`atoll.sync.agreement`)
gets, from one in-sync site and over the same cross-site group that carries the exchanges:

    θ (float32, exact) | momentum (bfloat16, only if the sender's outer optimizer has one) | tag (32)

θ is checked against the digest that the sender's authenticated envelope announced for that
round, so a heal installs exactly the run's θ or nothing. The momentum goes in bfloat16 to keep
a heal at 1.5x the share's float32 bytes (1x without momentum): before a heal every site of the
exchange rounds its momentum to bfloat16 (`OuterOptimizer.round_momentum`), so the healed site
holds bitwise the same buffers as the others, and their θ stay identical afterwards. The cost is
one rounding of the momentum (relative error 2^-8) at the rounds where a site heals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from atoll.sync.agreement import Plan
from atoll.sync.auth import TAG_BYTES
from atoll.sync.digest import theta_digest
from atoll.sync.envelope import Sealer
from atoll.sync.outer import OuterOptimizer

MOMENTUM_DTYPE = torch.bfloat16


def heal_bytes(numel: int, *, with_momentum: bool) -> int:
    """Size of a heal of `numel` parameters: 4 bytes each, 2 more with momentum, and the tag."""
    return numel * (4 + (MOMENTUM_DTYPE.itemsize if with_momentum else 0)) + TAG_BYTES


def pack_heal(
    outer: OuterOptimizer | None, sealer: Sealer, *, unit: int, round: int, with_momentum: bool
) -> torch.Tensor:
    """What the in-sync source sends (uint8): its θ, its momentum if `with_momentum`, the tag."""
    parts: list[torch.Tensor] = []
    if outer is not None:
        parts += [p.detach().float().reshape(-1).cpu().view(torch.uint8) for p in outer.params]
        if with_momentum:
            momentum = outer.momentum()
            assert momentum is not None, "the envelope announced a momentum buffer"
            parts += [b.detach().to(MOMENTUM_DTYPE).reshape(-1).cpu().view(torch.uint8) for b in momentum]
    body = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    mac = torch.frombuffer(bytearray(sealer.heal_tag(unit, round, body)), dtype=torch.uint8)
    return torch.cat([body, mac])


def unpack_heal(
    buf: torch.Tensor,
    outer: OuterOptimizer | None,
    sealer: Sealer,
    *,
    unit: int,
    round: int,
    digest: bytes,
    with_momentum: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None] | None:
    """θ and the momentum (None without) from a heal `buf` shaped like `outer`'s tensors, or None
    when the tag or θ's digest does not check (nothing is installed then)."""
    body, mac = buf[:-TAG_BYTES], bytes(buf[-TAG_BYTES:].tolist())
    if not sealer.heal_verify(unit, round, body, mac):
        return None
    shapes = [tuple(p.shape) for p in outer.params] if outer is not None else []
    theta, offset = [], 0
    for shape in shapes:
        n = math.prod(shape) * 4
        theta.append(body[offset : offset + n].clone().view(torch.float32).reshape(shape))
        offset += n
    if theta_digest(theta) != digest:
        return None
    if not with_momentum:
        return theta, None
    momentum = []
    for shape in shapes:
        n = math.prod(shape) * MOMENTUM_DTYPE.itemsize
        momentum.append(body[offset : offset + n].clone().view(MOMENTUM_DTYPE).reshape(shape).float())
        offset += n
    return theta, momentum


@dataclass
class Healed:
    """One rank's part of a heal: whether it worked, what a healer installs, what it cost."""

    ok: bool
    theta: list[torch.Tensor] | None = None
    momentum: list[torch.Tensor] | None = None
    num_bytes: int = 0
    seconds: float = 0.0


Transfer = Callable[..., torch.Tensor | None]  # the transport's transfer(tensor, *, src, dst, rank)


def run_heal(
    plan: Plan,
    *,
    rank: int,
    outer: OuterOptimizer | None,
    sealer: Sealer,
    unit: int,
    numel: int,
    with_momentum: bool,
    transfer: Transfer,
) -> Healed:
    """The source's send or a healer's receive of one heal (other ranks do not call it).

    Blocking, collective between the plan's source and healers. The source sends to every healer
    and reports the bytes it sent; a healer gets θ (checked against the plan's digest) and the
    momentum, or `ok=False` when the transfer failed or did not check. Installs nothing.
    """
    size = heal_bytes(numel, with_momentum=with_momentum)
    t0 = time.perf_counter()
    if rank == plan.source:
        buf = pack_heal(outer, sealer, unit=unit, round=plan.reference_round, with_momentum=with_momentum)
        assert buf.numel() == size, "every site lays out a share the same way"
        sent = transfer(buf, src=rank, dst=plan.heal, rank=rank)
        return Healed(sent is not None, num_bytes=size * len(plan.heal), seconds=time.perf_counter() - t0)
    got = transfer(torch.empty(size, dtype=torch.uint8), src=plan.source, dst=plan.heal, rank=rank)
    checked = None
    if got is not None:
        checked = unpack_heal(
            got,
            outer,
            sealer,
            unit=unit,
            round=plan.reference_round,
            digest=plan.reference_digest,
            with_momentum=with_momentum,
        )
    seconds = time.perf_counter() - t0
    if checked is None:
        return Healed(False, seconds=seconds)
    return Healed(True, theta=checked[0], momentum=checked[1], num_bytes=size, seconds=seconds)
