"""The outer step of DiLoCo: global parameters θ, pseudo-gradients, and the outer optimizer.

A sync round, as the strategies run it for each set of tensors they exchange (the whole model,
a streaming fragment, or one rank's flat shard):

    delta = outer.pseudo_gradient(local)            # Δ_s = θ − θ_s, on every site
    ...exchange deltas (or their encodings) across sites...
    avg = weighted_average(deltas_per_site, tokens) # Σ_s (w_s / Σw) · Δ_s
    outer.step(avg)                                 # θ.grad = avg; SGD(Nesterov) step
    outer.copy_to(local)                            # the next inner round starts from θ

Every site holds its own `OuterOptimizer` and applies the same average, so all sites keep
bitwise-identical θ as long as they add the decoded deltas in the same (site) order. Memory:
θ and the momentum buffer, 8 bytes per element in fp32. No `torch.distributed`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from atoll.errors import AtollError

__all__ = ["OuterOptimizer", "weighted_average"]


def weighted_average(deltas_per_site: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> list[Tensor]:
    """The token-weighted mean of the sites' pseudo-gradients, tensor by tensor, in float32.

    Exactly: avg = 0, then for each site s in the given order avg += (w_s / W) · Δ_s, with
    W = Σ w (Python floats), so the result does not depend on how the weights are scaled beyond
    float rounding; sites must be given in the same order everywhere to get bitwise-identical
    results. A site with weight 0 contributes nothing (a site that processed no tokens).
    Raises `AtollError` for mismatched lengths or shapes, or weights that are negative, not
    finite, or sum to 0.
    """
    if len(deltas_per_site) != len(weights) or not deltas_per_site:
        raise AtollError(f"{len(deltas_per_site)} sites' deltas but {len(weights)} weights; give one weight per site")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise AtollError(f"site weights {list(weights)} must be finite, non-negative and not all zero")
    first = deltas_per_site[0]
    for site, deltas in enumerate(deltas_per_site):
        shapes = [tuple(d.shape) for d in deltas]
        if shapes != [tuple(d.shape) for d in first]:
            raise AtollError(f"site {site}'s deltas have shapes {shapes}, site 0's {[tuple(d.shape) for d in first]}")
    total = float(sum(weights))
    out = [torch.zeros(d.shape, dtype=torch.float32, device=d.device) for d in first]
    for deltas, weight in zip(deltas_per_site, weights, strict=True):
        for acc, delta in zip(out, deltas, strict=True):
            acc.add_(delta.to(acc.device, torch.float32), alpha=weight / total)
    return out


class OuterOptimizer:
    """θ (a detached float32 copy of the tensors it was built from) and the outer optimizer.

    Built from any list of tensors: a model's parameters, a fragment's, or one rank's flat
    shard (from `gather_shard`); those tensors are only read at construction. Defaults are
    DiLoCo's: `torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)`; `averaging()` gives plain
    weighted averaging (lr 1, momentum 0). Raises `AtollError` for invalid hyperparameters.
    Not thread-safe: one round's calls come from one thread.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
    ) -> None:
        if not lr > 0 or not math.isfinite(lr):
            raise AtollError(f"outer lr={lr!r} must be positive (DiLoCo uses 0.7)")
        if not 0 <= momentum < 1:
            raise AtollError(f"outer momentum={momentum!r} must be in [0, 1) (DiLoCo uses 0.9)")
        if nesterov and momentum == 0:
            raise AtollError("outer nesterov=true needs momentum > 0; set nesterov=false for plain SGD")
        self.params: list[Tensor] = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
        """θ in host memory, one float32 leaf tensor per tensor given at construction; read-only for callers."""
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=nesterov)

    @classmethod
    def averaging(cls, params: Sequence[Tensor]) -> OuterOptimizer:
        """Plain weighted averaging: θ ← θ − avg Δ, i.e. θ becomes the weighted mean of θ_s."""
        return cls(params, lr=1.0, momentum=0.0, nesterov=False)

    def _check(self, tensors: Sequence[Tensor], what: str) -> None:
        shapes = [tuple(t.shape) for t in tensors]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise AtollError(
                f"{what}: got shapes {shapes}, the outer optimizer holds "
                f"{[tuple(p.shape) for p in self.params]}; pass the tensors it was built from"
            )

    def pseudo_gradient(self, local_params: Sequence[Tensor]) -> list[Tensor]:
        """Δ = θ − θ_local per tensor, new float32 tensors on θ's device. Raises `AtollError`
        if the shapes differ from θ's."""
        self._check(local_params, "pseudo_gradient")
        with torch.no_grad():
            return [p - q.detach().to(p.device, torch.float32) for p, q in zip(self.params, local_params, strict=True)]

    weighted_average = staticmethod(weighted_average)

    def step(self, avg_delta: Sequence[Tensor]) -> None:
        """Apply the averaged pseudo-gradient: θ.grad = avg_delta, one outer optimizer step.

        Raises `AtollError` if the shapes differ from θ's.
        """
        self._check(avg_delta, "step")
        for p, g in zip(self.params, avg_delta, strict=True):
            p.grad = g.detach().to(p.device, torch.float32)
        self.optimizer.step()
        for p in self.params:
            p.grad = None

    def copy_to(self, local_params: Sequence[Tensor]) -> None:
        """Write θ into `local_params` in place (cast to their dtype and device)."""
        self._check(local_params, "copy_to")
        with torch.no_grad():
            for p, q in zip(self.params, local_params, strict=True):
                q.copy_(p)

    def reset_to(self, params: Sequence[Tensor]) -> None:
        """Set θ to `params` (e.g. after healing from a peer), keeping the momentum."""
        self._check(params, "reset_to")
        with torch.no_grad():
            for p, q in zip(self.params, params, strict=True):
                p.copy_(q)

    def momentum(self) -> list[Tensor] | None:
        """The momentum buffers (live tensors, one per θ tensor), or None before the first step
        or without momentum."""
        buffers = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.params]
        return None if any(b is None for b in buffers) else buffers  # type: ignore[return-value]

    def set_momentum(self, buffers: Sequence[Tensor] | None) -> None:
        """Replace the momentum buffers (None: drop them, as before the first step)."""
        for i, p in enumerate(self.params):
            if buffers is None:
                self.optimizer.state.pop(p, None)
            else:
                self.optimizer.state[p]["momentum_buffer"] = buffers[i].detach().to(p.device, torch.float32).clone()

    def round_momentum(self, dtype: torch.dtype) -> None:
        """Round the momentum buffers to `dtype`'s precision in place (kept in float32), so that
        a heal can send them in `dtype` and every site still holds bitwise the same buffers."""
        with torch.no_grad():
            for b in self.momentum() or []:
                b.copy_(b.to(dtype).to(torch.float32))

    def state_dict(self) -> dict[str, Any]:
        """θ and the optimizer state (momentum), as copies: later steps do not change them."""
        return {
            "params": [p.detach().clone() for p in self.params],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output; later steps are bitwise those of the saved run."""
        self.reset_to(state["params"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
