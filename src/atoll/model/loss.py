"""The next-token losses every tier uses: pre-training, fine-tuning, evaluation and calibration.

Both return a *sum* over targets, not a mean, so that a caller can weight ranks and
micro-batches by the targets they hold and reproduce the global-batch mean exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when asked for (or `auto` on CUDA); fp32 otherwise."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_loss_sum(
    model: nn.Module, batch: torch.Tensor, *, device: torch.device, dtype: str
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a (B, T+1) batch, and the number of predicted tokens."""
    x = batch[:, :-1].to(device, non_blocking=True)
    y = batch[:, 1:].to(device, non_blocking=True)
    with autocast(device, dtype):
        logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
    return loss, y.numel()


def masked_loss_sum(
    model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, *, device: torch.device, dtype: str = "auto"
) -> torch.Tensor:
    """Summed next-token cross-entropy of (B, T+1) `tokens` over the targets where `mask` (B, T) is set."""
    x = tokens[:, :-1].to(device, non_blocking=True)
    y = tokens[:, 1:].to(device, non_blocking=True).masked_fill(~mask.to(device), -100)
    with autocast(device, dtype):
        logits = model(x)  # (B, T, V)
    flat = logits.float().reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, y.reshape(-1), ignore_index=-100, reduction="sum")
