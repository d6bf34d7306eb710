"""Exact fingerprints of parameters, to prove that sites hold the same θ.

`theta_digest` is SHA-256 over the tensors' float32 bytes, in the order given: two sites agree
only if every bit agrees (a float sum, `engine.checksum`, can hide differences that cancel). The
sync engine compares digests after every applied round and at the end of a run; the final
record of each site's metrics carries its digest (`theta_digest`, hex), and `check_site_digests`
reads them back (`atoll.rundir.load.check_site_digests`) before a multi-site run is exported
or served. `site_digest` takes it over a site's full parameters in canonical order, whatever its
layout, so sites of different layouts that hold the same θ show the same digest.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from atoll.rundir.layout import FINAL_DIGEST_KEY
from atoll.sync.lanes import Lanes
from atoll.sync.placement import SiteView
from atoll.sync.tensors import checksum

__all__ = ["FINAL_DIGEST_KEY", "site_checksum", "site_digest", "theta_digest"]


def theta_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """SHA-256 of the tensors' float32 values (native byte order), one after the other."""
    h = hashlib.sha256()
    with torch.no_grad():
        for t in tensors:
            _update(h, t)
    return h.digest()


def _update(h: hashlib._Hash, t: torch.Tensor) -> None:
    flat = t.detach().to(torch.float32).contiguous().reshape(-1).cpu()
    h.update(memoryview(flat.numpy()).cast("B"))


def site_digest(view: SiteView, local: dict[str, torch.Tensor], *, rank: int) -> bytes:
    """`theta_digest` of the site's parameters, full tensors in the view's canonical order, on
    the site's rank 0 (other ranks get a digest of nothing). `local`: this rank's blocks by name.
    A site whose every rank holds every parameter whole hashes where it stands; any other layout
    brings each parameter to rank 0 in turn (collective over the site, one parameter at a time)."""
    if view.replicated_everywhere():
        return theta_digest(local[n] for n in view.names)
    to_zero = Lanes(view, mode="canonical", num_lanes=1, rank=rank)
    h = hashlib.sha256()
    for name in view.names:
        full = to_zero.read([name], local)
        if rank == 0:
            _update(h, full[name])
    return h.digest()


def site_checksum(view: SiteView, local: dict[str, torch.Tensor], *, rank: int) -> float:
    """`checksum` of the site's parameters (each element once): this rank's blocks that no
    lower rank also holds, summed over the site (collective unless every rank holds everything)."""
    if view.replicated_everywhere() or not dist.is_initialized():
        return checksum(local.values())
    mine = []
    for name in view.names:
        first: dict[object, int] = {}
        for r, box in view.holders[name]:
            first.setdefault(box, r)
        if first and rank in first.values() and name in local:
            mine.append(float(local[name].detach().double().sum()))
    device = next(iter(local.values())).device if local else torch.device("cpu")
    total = torch.tensor([math.fsum(mine)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())
