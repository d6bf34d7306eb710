"""One rank of a pipeline-parallel job on gloo, and the one-rank reference it is compared with.

``python -m tests.dist.pipeline_worker SCENARIO OUT_DIR [RUN_IN]``, started by
`tests/dist/test_pipeline.py` through atoll's local launcher (RANK and WORLD_SIZE in the
environment). Scenarios:

- ``schedules`` (2 ranks, pp 2): trains the same model with gpipe, 1f1b and interleaved_1f1b
  (vp 2) for STEPS steps on fixed micro-batches; records the step losses, gradient norms and a
  held-out loss; then trains two steps afresh with 1f1b and saves a DCP checkpoint (model and
  optimizer, canonical keys, by `atoll.train.checkpoint`) in OUT_DIR/run-pp; then resumes
  RUN_IN's checkpoint (a one-rank run's after two steps) and trains the steps after it.
- ``four`` (4 ranks): pp 2 × dp 2 on a 2-D mesh (1f1b, each data-parallel replica taking half of
  each step's micro-batches, gradients averaged over dp by the runner or by FSDP2), then
  pp 2 × tp 2 without and with sequence parallelism (torch's tensor-parallel plans).

Rank 0 writes OUT_DIR/SCENARIO.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from atoll.errors import AtollError
from atoll.model import PRESETS
from atoll.model.llama import Transformer
from atoll.model.loss import token_loss_sum
from atoll.parallel.dist import dist_env_from_environ
from atoll.parallel.pipeline import PipelineRunner, build_stage_model
from atoll.parallel.tensor import parallelize
from atoll.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

CFG = dataclasses.replace(PRESETS["tiny"], num_layers=4, tie_embeddings=False)
STEPS = 4
MICRO = 4  # micro-batches per step
SEQ = 16
LR = 1e-2
CLIP = 1.0
CPU = torch.device("cpu")


def step_batches(step: int, num_micro: int = MICRO) -> list[torch.Tensor]:
    """The micro-batches of one step, (2, SEQ+1) tokens each, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(0, CFG.vocab_size, (2, SEQ + 1), generator=g) for _ in range(num_micro)]


def held_out() -> list[torch.Tensor]:
    """One micro-batch of three sequences: fewer micro-batches than stages, which 1f1b's training
    schedule would refuse; evaluation runs any count."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, CFG.vocab_size, (3, SEQ + 1), generator=g)]


def full_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG)


def full_eval(model: Transformer) -> float:
    with torch.no_grad():
        sums = [token_loss_sum(model, mb, device=CPU, dtype="fp32") for mb in held_out()]
    return sum(float(s) for s, _ in sums) / sum(n for _, n in sums)


def train_full(
    model: Transformer, opt: torch.optim.Optimizer, steps: range, num_micro: int = MICRO, dtype: str = "fp32"
) -> dict[str, Any]:
    """One rank, the whole model, the training loop's arithmetic: per-step losses and norms."""
    losses, norms = [], []
    for step in steps:
        mbs = step_batches(step, num_micro)
        targets = sum(mb[:, 1:].numel() for mb in mbs)
        total = 0.0
        for mb in mbs:
            loss, _ = token_loss_sum(model, mb, device=CPU, dtype=dtype)
            (loss / targets).backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        losses.append(total / targets)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "norms": norms}


def reference(*, steps: int = STEPS, num_micro: int = MICRO) -> dict[str, Any]:
    model = full_model()
    record = train_full(model, torch.optim.AdamW(model.parameters(), lr=LR), range(steps), num_micro)
    return record | {"eval": full_eval(model)}


def save(model: nn.Module, opt: torch.optim.Optimizer, run_dir: Path) -> None:
    """atoll's own checkpoint (DCP: model and optimizer state by parameter name) of step 2."""
    env = dist_env_from_environ()
    save_checkpoint(run_dir, step=2, model=model, optimizer=opt, extra={}, env=env, device=CPU, keep=1)


def load(model: nn.Module, opt: torch.optim.Optimizer, run_dir: Path) -> None:
    """atoll's own resume: the run's latest checkpoint into this rank's model and optimizer."""
    ckpt = list_checkpoints(run_dir)[-1].path
    load_checkpoint(ckpt, model=model, optimizer=opt, env=dist_env_from_environ(), device=CPU)


def train_pipeline(
    runner: PipelineRunner,
    model: Transformer,
    *,
    steps: range = range(STEPS),
    opt: torch.optim.Optimizer | None = None,
    micro: slice = slice(None),
    dp: int = 1,
) -> dict[str, list[float]]:
    """The training loop as it would drive a step runner; losses summed over every rank."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for step in steps:
        mbs = step_batches(step, MICRO * dp)
        targets = sum(mb[:, 1:].numel() for mb in mbs)
        counted = runner.forward_backward(mbs[micro], scale=dp / targets)  # dp: averaged over replicas
        norms.append(runner.clip_grad_norm(list(model.parameters()), CLIP))
        total = torch.tensor([counted], dtype=torch.float64)
        dist.all_reduce(total)
        losses.append(float(total) / targets)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "norms": norms}


def evaluate(runner: PipelineRunner) -> float:
    total, n = runner.evaluate(held_out())
    both = torch.tensor([total, float(n)], dtype=torch.float64)
    dist.all_reduce(both)
    return float(both[0] / both[1])


def schedules(out: Path, run_in: Path, rank: int) -> dict[str, Any]:
    group = dist.group.WORLD
    result: dict[str, Any] = {}
    for name, vp in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)):
        torch.manual_seed(0)
        model = build_stage_model(CFG, pp=2, pp_rank=rank, vp=vp)
        runner = PipelineRunner(model, schedule=name, num_micro_batches=MICRO, group=group, device=CPU, vp=vp)
        record = train_pipeline(runner, model)
        record["eval"] = evaluate(runner)
        record["keys"] = sorted(model.state_dict())
        result[name] = record
    # bf16 autocast inside each stage, as the loop's loss function applies it to the whole model.
    torch.manual_seed(0)
    model = build_stage_model(CFG, pp=2, pp_rank=rank)
    runner = PipelineRunner(model, schedule="1f1b", num_micro_batches=MICRO, group=group, device=CPU, dtype="bf16")
    result["bf16"] = train_pipeline(runner, model, steps=range(2))
    # Checkpoints across layouts: this pipeline's after two steps, and a one-rank run's resumed here.
    torch.manual_seed(0)
    model = build_stage_model(CFG, pp=2, pp_rank=rank)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    runner = PipelineRunner(model, schedule="1f1b", num_micro_batches=MICRO, group=group, device=CPU)
    train_pipeline(runner, model, steps=range(2), opt=opt)
    save(model, opt, out / "run-pp")
    result["saved_eval"] = evaluate(runner)
    torch.manual_seed(1)
    model = build_stage_model(CFG, pp=2, pp_rank=rank)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    load(model, opt, run_in)
    runner = PipelineRunner(model, schedule="1f1b", num_micro_batches=MICRO, group=group, device=CPU)
    result["resumed"] = train_pipeline(runner, model, steps=range(2, STEPS), opt=opt)
    result["errors"] = misuse(runner, rank)
    return result


def misuse(runner: PipelineRunner, rank: int) -> list[str]:
    """What a caller can get wrong, each refused on every rank before any message is sent."""
    attempts = [
        lambda: runner.forward_backward(
            [torch.zeros(2, SEQ + 1, dtype=torch.long)] * 3 + [torch.zeros(1, SEQ + 1)], 1.0
        ),
        lambda: runner.forward_backward([torch.zeros(2, SEQ + 1, dtype=torch.long)], 1.0),
        lambda: PipelineRunner(
            build_stage_model(CFG, pp=2, pp_rank=rank, vp=2),
            schedule="interleaved_1f1b",
            num_micro_batches=MICRO,
            group=dist.group.WORLD,
            device=CPU,
        ),
    ]
    errors = []
    for attempt in attempts:
        try:
            attempt()
        except AtollError as exc:
            errors.append(str(exc))
    dist.barrier()
    return errors


def pp_dp(*, fsdp: bool) -> dict[str, Any]:
    """Gradients averaged over dp by the runner, or by FSDP2 on each stage over the dp sub-mesh."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    torch.manual_seed(0)
    model = build_stage_model(CFG, pp=2, pp_rank=pp_rank)
    runner = PipelineRunner(
        model,
        schedule="1f1b",
        num_micro_batches=MICRO,
        group=mesh["pp"],
        device=CPU,
        dp_group=None if fsdp else mesh["dp"].get_group(),
    )
    if fsdp:
        for part in runner.parts:
            for block in part.layers:
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(part, mesh=mesh["dp"])
    mine = slice(dp_rank * MICRO, (dp_rank + 1) * MICRO)
    record: dict[str, Any] = train_pipeline(runner, model, micro=mine, dp=2)
    record["dtensors"] = sum(isinstance(p, DTensor) for p in model.parameters())
    return record


def pp_tp(*, sp: bool) -> dict[str, Any]:
    """Parameters and gradients are DTensors; activations between stages plain tensors (whole,
    or each tp rank's slice of the sequence with `sp`)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    torch.manual_seed(0)
    model = build_stage_model(CFG, pp=2, pp_rank=mesh["pp"].get_local_rank())
    parallelize(model, mesh["tp"], sequence_parallel=sp)
    runner = PipelineRunner(
        model,
        schedule="1f1b",
        num_micro_batches=MICRO,
        group=mesh["pp"],
        device=CPU,
        count_loss=mesh["tp"].get_local_rank() == 0,  # the last stage's loss once, not once per tp rank
        loss_context=loss_parallel,
    )
    record: dict[str, Any] = train_pipeline(runner, model)
    record["eval"] = evaluate(runner)
    record["dtensors"] = sum(isinstance(p, DTensor) for p in model.parameters())
    return record


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        if scenario == "schedules":
            result = schedules(out, Path(sys.argv[3]), rank)
        elif scenario == "four":
            result = {
                "pp_dp": pp_dp(fsdp=False),
                "pp_fsdp": pp_dp(fsdp=True),
                "pp_tp": pp_tp(sp=False),
                "pp_sp": pp_tp(sp=True),
            }
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        if rank == 0:
            (out / f"{scenario}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
