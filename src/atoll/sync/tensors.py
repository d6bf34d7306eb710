"""Tensor helpers of the cross-site tier: host-memory copies and cheap fingerprints of parameters."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy of `t` in host memory. θ, anchors, codecs and the WAN work there whatever
    device the site trains on: the cross-site gloo group takes CPU tensors, and the outer state
    then costs the accelerator no memory."""
    return t.detach().to("cpu", torch.float32, copy=True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def checksum(params: Iterable[torch.Tensor]) -> float:
    """A cheap fingerprint of parameters (sum of float64 sums), to compare sites."""
    with torch.no_grad():
        return math.fsum(float(p.detach().double().sum()) for p in params)


def param_checksum(model: nn.Module) -> float:
    """`checksum` of a model's parameters (DDP-wrapped or not)."""
    return checksum(unwrap(model).parameters())
