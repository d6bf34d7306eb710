"""One rank of a two-rank site whose gradient turns NaN at one step on rank 1 only.

``python -m tests.dist.guard_worker CONFIG OUT_DIR BAD_STEP``, started by
`tests/dist/test_guard_ranks.py` through atoll's local launcher. The loss stays finite; only the
gradient of rank 1 is poisoned, so DDP's all-reduce hands both ranks a NaN gradient. Each rank
writes its parameters' checksum to OUT_DIR/rank{R}.json at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

import atoll.train.trainer as trainer
from atoll.config import RunConfig, load_config


class NanGradient(torch.autograd.Function):
    """Identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


def main() -> None:
    config, out, bad_step = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rank = int(os.environ["RANK"])
    real_loss, real_loop = trainer.token_loss_sum, trainer.run_loop
    calls = {"n": 0}

    def loss(model: torch.nn.Module, chunk: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, int]:
        value, n = real_loss(model, chunk, **kw)
        if model.training:
            calls["n"] += 1
            if rank == 1 and calls["n"] == bad_step:  # one micro-batch per step on each rank
                value = NanGradient.apply(value)
        return value, n

    def loop(job: Any, state: Any, **kw: Any) -> Any:
        state = real_loop(job, state, **kw)
        params = [p.detach().double() for p in job.model.parameters()]
        record = {
            "checksum": math.fsum(float(p.sum()) for p in params),
            "finite": all(bool(torch.isfinite(p).all()) for p in params),
        }
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        return state

    trainer.token_loss_sum = loss  # type: ignore[assignment]
    trainer.run_loop = loop  # type: ignore[assignment]
    trainer.run_training(load_config(RunConfig, config))


if __name__ == "__main__":
    main()
