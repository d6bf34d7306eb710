"""Activation recomputation: keep fewer activations from forward, compute them again in backward.

`parallel.recompute`:

    none        every activation is kept
    full        each decoder block is one checkpointed region: only its input is kept, the
                whole block runs again in backward (about a third more compute)
    selective   each block's attention (projections, rotary, scaled dot-product attention) is
                checkpointed, the MLP's activations are kept. This is the choice the planner's
                memory model assumes (`atoll.planner.memory`: selective drops the attention's
                a*s/h term, after Korthikanti et al.), and it costs only the attention's
                recompute, the cheaper half of a block at short sequences.

Applied after tensor parallelism (the wrappers then hold the already-sharded modules) and before
FSDP2 (`fully_shard` of a block wraps its checkpointed parts), the order torchtitan uses. The
wrapper's name never reaches a checkpoint: `checkpoint_wrapper` strips it from state-dict keys.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)

WRAPPED_PREFIX = "_checkpoint_wrapped_module."


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Wrap `model`'s decoder blocks (`mode` full) or their attention (`selective`) in place."""
    if mode == "none":
        return
    layers = model.layers  # type: ignore[union-attr]
    for i, block in enumerate(layers):  # type: ignore[arg-type]
        if mode == "full":
            layers[i] = _wrap(block)  # type: ignore[index]
        elif mode == "selective":
            block.attn = _wrap(block.attn)
        else:
            raise AssertionError(f"unknown recompute mode {mode!r}")  # the config allows three


def _wrap(module: nn.Module) -> nn.Module:
    # Non-reentrant: works with keyword arguments (cos, sin, cache) and with DTensor inputs.
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def plain_name(name: str) -> str:
    """A parameter's name without the recompute wrapper's part (the model's own name)."""
    return name.replace(WRAPPED_PREFIX, "")
