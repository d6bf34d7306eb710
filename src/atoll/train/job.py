"""What the one training loop works on: the job, where it is, and its checkpoints.

`atoll.train.loop` runs the steps; this module holds the types it is handed (a `TrainingJob`
built by pre-training or fine-tuning, with its `BatchSource` and `SiteSync`), the `LoopState`
it carries, and `save`/`restore` of both as a checkpoint.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from atoll.errors import RunFailure
from atoll.parallel.dist import DistEnv, all_reduce_sum
from atoll.parallel.layout import RankPlace
from atoll.train.balance import RankBalancer
from atoll.train.checkpoint import load_checkpoint, save_checkpoint


class StepBatch(NamedTuple):
    """This rank's share of one global step."""

    micro_batches: list[Any]  # each handed to the loss function as is
    local_targets: int  # loss-bearing targets in this rank's share
    global_targets: int | None  # in the whole global batch when known up front; None: summed by the loop


class BatchSource(Protocol):
    """Where a step's data comes from; its position is checkpointed with the run."""

    tokens_per_step: int  # tokens the whole site processes per step (for tokens/s)

    def next_batch(self) -> StepBatch: ...
    def set_slice(self, rank_start: int, rank_count: int) -> None: ...  # this rank's part, from the next step
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, micro-batch) -> summed loss


class StepRunner(Protocol):
    """How one step's micro-batches go through the site's model: the loop calls these two and
    never asks how the model is split (`atoll.train.runner.LocalRunner` for data and tensor
    parallelism, a pipeline runner for pipeline stages)."""

    def forward_backward(self, micro_batches: list[Any], scale: float) -> float:
        """Forward and backward over this rank's micro-batches of one step, each micro-batch's
        summed loss multiplied by `scale` before backward; returns the summed (unscaled) loss
        this rank counts (0.0 where it must not count), so a sum over the site counts each
        target exactly once."""
        ...

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip (max_norm > 0) and return the total gradient norm over the whole model (collective
        where the model is split across ranks)."""
        ...


class DivergedError(RunFailure):
    """Training diverged and rolling back did not help (or there was nothing to roll back to)."""


class SiteSync(Protocol):
    """The cross-site half of a step, called the same way for every strategy."""

    # Every site applies the same inner step (cross-site ddp): a step is judged by the exchanged
    # gradient, since a site's own non-finite gradient was already left out of the average.
    lockstep: bool
    # Rounds end by measurement (a wall-clock budget or a balance): the run then ends on its last
    # round (`run_over`), and the schedule follows `schedule_step`, not the site's own step count.
    paced: bool
    # Told of each exchange's state (sending, waiting, applied, failed): the loop logs them.
    listener: Callable[[str, int, int, str], None]

    def commit_gradients(self, *, tokens: int) -> bool: ...
    def after_step(self, step: int, *, tokens: int, seconds: float | None = None) -> None: ...
    def run_over(self) -> bool: ...
    def schedule_step(self, step: int) -> float: ...
    def finish(self, step: int) -> None: ...
    def metrics(self) -> dict[str, Any]: ...
    def final_metrics(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any] | None: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def reset_to_global(self) -> bool: ...  # a diverged site takes the sites' shared parameters
    def take_jump(self) -> int | None: ...  # after a heal forward: the step the peers are at, once
    def close(self) -> None: ...


class NoSync:
    """A single site: nothing crosses a WAN, every step commits."""

    lockstep = False
    paced = False

    def listener(self, state: str, step: int, round: int, unit: str) -> None:
        pass  # nothing is exchanged

    def commit_gradients(self, *, tokens: int) -> bool:
        return True

    def after_step(self, step: int, *, tokens: int, seconds: float | None = None) -> None:
        pass

    def run_over(self) -> bool:
        return False

    def schedule_step(self, step: int) -> float:
        return float(step)

    def finish(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, Any]:
        return {}

    def final_metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def reset_to_global(self) -> bool:
        return False  # no peers: a diverged site rolls back to its own checkpoint

    def take_jump(self) -> int | None:
        return None  # no peers to be behind

    def close(self) -> None:
        pass


@dataclass
class TrainingJob:
    """Everything the loop trains with; built by pre-training or fine-tuning."""

    model: nn.Module  # as wrapped for the site (DDP, FSDP2 or plain)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: BatchSource
    loss_fn: LossFn
    evaluate: Callable[[], float]  # mean validation loss; collective over the site
    sync: SiteSync = field(default_factory=NoSync)
    slowdown: float = 1.0  # emulate a slower chip: compute, then sleep (slowdown - 1) x as long
    balancer: RankBalancer | None = None  # this rank's share of the batch, by speed (atoll.train.balance)
    # Where this rank sits in the site's layout; None: every rank a data-parallel replica.
    place: RankPlace | None = None
    runner: StepRunner | None = None  # None: atoll.train.runner.LocalRunner over model and loss_fn

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class LoopState:
    """Where the loop is; what `on_checkpoint` and the caller's result read."""

    step: int = 0
    tokens_seen: int = 0  # loss-bearing targets trained on, summed over the site
    val_loss: float | None = None
    speeds: list[float] = field(default_factory=list)  # tokens/s of each step of this process
    batches: int = 0  # batches drawn from the source, skipped ones included
    skip_batches: set[int] = field(default_factory=set)  # batch indices never to train on (rolled back past)
    skipped_steps: int = 0  # steps not applied: loss or gradient not finite
    spikes: int = 0  # steps whose loss spiked
    rollbacks: int = 0
    guard: dict[str, Any] = field(default_factory=dict)  # StepGuard's running estimate
    step_batch: dict[int, int] = field(default_factory=dict)  # recent steps -> the batch index they trained on
    finished: bool = False  # the run's last step is done (the sync finished: every site holds the same θ)

    def guard_extra(self) -> dict[str, Any]:
        """What a checkpoint keeps of the guard (JSON)."""
        return {
            "batches": self.batches,
            "skip_batches": sorted(self.skip_batches),
            "skipped_steps": self.skipped_steps,
            "spikes": self.spikes,
            "rollbacks": self.rollbacks,
            "estimate": self.guard,
        }

    def load_guard_extra(self, extra: dict[str, Any]) -> None:
        self.batches = int(extra.get("batches", self.step))  # older checkpoints: one batch per step
        self.skip_batches |= set(extra.get("skip_batches", []))
        self.skipped_steps = max(self.skipped_steps, int(extra.get("skipped_steps", 0)))
        self.spikes = max(self.spikes, int(extra.get("spikes", 0)))
        self.rollbacks = max(self.rollbacks, int(extra.get("rollbacks", 0)))
        self.guard = dict(extra.get("estimate", {}))

    @property
    def median_tokens_per_s(self) -> float | None:
        return statistics.median(self.speeds) if self.speeds else None


def restore(job: TrainingJob, ckpt: Path, *, env: DistEnv, device: torch.device) -> LoopState:
    """Load a checkpoint into the job (weights, optimizer, schedule, data position, sync)."""
    meta = load_checkpoint(ckpt, model=job.model, optimizer=job.optimizer, env=env, device=device)
    job.scheduler.load_state_dict(meta["scheduler"])
    job.batches.load_state_dict(meta["data"])
    rank_state = meta.get("rank_state") or {}
    if "sync" in rank_state:
        job.sync.load_state_dict(rank_state["sync"])
    state = LoopState(step=int(meta["step"]), tokens_seen=int(meta.get("tokens_seen", 0)))
    state.load_guard_extra(meta.get("guard", {}))
    return state


def save(job: TrainingJob, state: LoopState, run_dir: Path, *, env: DistEnv, device: torch.device, keep: int) -> None:
    """Write a complete checkpoint of the job at `state.step`; collective over the site.

    Refuses (DivergedError, nothing written) when any weight is not finite: no checkpoint ever
    holds a diverged model.
    """
    (bad,) = all_reduce_sum([float(sum(_count_nonfinite(p) for p in job.params))], device=device)
    if bad:
        raise DivergedError(
            f"refusing to write the checkpoint of step {state.step}: {int(bad)} weights are not finite; "
            f"the last good checkpoint stays in {run_dir / 'checkpoints'}"
        )
    sync_state = job.sync.state_dict()
    save_checkpoint(
        run_dir,
        step=state.step,
        model=job.model,
        optimizer=job.optimizer,
        extra={
            "scheduler": job.scheduler.state_dict(),
            "data": job.batches.state_dict(),
            "tokens_seen": state.tokens_seen,
            "guard": state.guard_extra(),
        },
        env=env,
        device=device,
        keep=keep,
        rank_state={"sync": sync_state} if sync_state is not None else None,
    )


def _count_nonfinite(p: torch.Tensor) -> int:
    t = p.detach()
    local = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 shard counts its own part
    return int((~torch.isfinite(local)).sum())
