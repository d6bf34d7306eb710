"""`parallel.compile`: torch.compile each decoder block, in place.

Each block is compiled with `nn.Module.compile()`, which keeps the module and its parameters
where they are: parameter names, state dicts and checkpoints are the same with or without it,
so a run may resume with compile switched either way. Per block rather than the whole model,
as torchtitan does: the blocks share one code object, so a model of any depth compiles one
graph (recompiled per block only where the guards require), the embedding, the head and the
loss stay eager, and tensor-parallel blocks and FSDP2 units keep their boundaries. Applied
after tensor parallelism and recompute and before FSDP2 (`atoll.parallel.dist.wrap_model`).

Off by default: compiling costs seconds to minutes when a run starts (more on CPU, where the
inductor backend builds C++ kernels with the machine's compiler) and pays off on GPUs.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from atoll.errors import AtollError


def compile_blocks(model: nn.Module, device: torch.device) -> int:
    """Compile every decoder block of `model` in place; returns how many. Raises `AtollError`
    on a CPU run without a C++ compiler (inductor needs one to build CPU kernels)."""
    if device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise AtollError(
            "parallel.compile on CPU needs a C++ compiler (torch's inductor builds CPU kernels with it): "
            "install one (Debian: apt-get install g++) or set --parallel.compile=false"
        )
    layers = getattr(model, "layers", None)
    if layers is None:
        return 0
    for block in layers:
        block.compile()
    return len(layers)
