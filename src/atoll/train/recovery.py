"""What the loop does when a step goes wrong: skipping batches, recording verdicts, rolling back.

`atoll.train.guard.StepGuard` judges each step; `atoll.train.loop.run_loop` calls these to act
on its verdict. A rollback goes back to the sites' shared parameters where there are peers
(`SiteSync.reset_to_global`), else to the last checkpoint before the bad run, and the batches of
the bad run are never trained on again (`LoopState.skip_batches`, kept in checkpoints).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from atoll.config import TrainSection
from atoll.parallel.dist import DistEnv, barrier
from atoll.report.metrics import MetricsWriter
from atoll.sync.site_env import SITE
from atoll.train.checkpoint import list_checkpoints
from atoll.train.guard import StepGuard, Verdict
from atoll.train.job import BatchSource, DivergedError, LoopState, StepBatch, TrainingJob, restore

log = logging.getLogger(__name__)

REMEMBERED_STEPS = 4096  # how far back a rollback can name the batches it skips


def draw(batches: BatchSource, state: LoopState) -> tuple[StepBatch, int]:
    """The next batch to train on and its index, passing over the batches a rollback skipped."""
    while True:
        index = state.batches
        batch = batches.next_batch()
        state.batches += 1
        if index not in state.skip_batches:
            return batch, index
        log.debug("skipping batch %d (a rollback left it out)", index)


def log_verdict(
    verdict: Verdict,
    state: LoopState,
    metrics: MetricsWriter,
    *,
    env: DistEnv,
    batch_index: int,
    loss: float,
    norm: float,
) -> None:
    """Count and record a step the guard did not simply apply."""
    if verdict.reason == "loss spike":
        state.spikes += 1
    else:
        state.skipped_steps += 1
    action = {"apply": "spike", "skip": "skipped", "rollback": "rollback"}[verdict.action]
    metrics.log(
        state.step,
        {"guard": action, "reason": verdict.reason, "batch": batch_index, "step_loss": loss, "step_grad_norm": norm},
    )
    if env.is_main:
        log.warning(
            "step %d (batch %d): %s (loss %.4g, gradient norm %.4g)%s",
            state.step,
            batch_index,
            verdict.reason,
            loss,
            norm,
            {"skip": "; not applied", "rollback": "; rolling back", "apply": ""}[verdict.action],
        )


def roll_back(
    job: TrainingJob,
    state: LoopState,
    verdict: Verdict,
    guard: StepGuard,
    *,
    t: TrainSection,
    run_dir: Path,
    env: DistEnv,
    device: torch.device,
) -> LoopState:
    """Leave a run of bad steps behind: the sites' shared parameters where there are peers, else
    the last checkpoint before the run; the batches of the bad run are never trained on again.

    Raises DivergedError after `t.max_rollbacks` rollbacks, or when there is nothing to go back to.
    """
    first_bad = verdict.first_bad_step or state.step
    bad_batches = {state.step_batch[s] for s in range(first_bad, state.step + 1) if s in state.step_batch}
    lo, hi = min(bad_batches), max(bad_batches)
    where = f" on site {_site_name()}" if _site_name() else ""
    advice = f"lower train.lr (now {t.lr:g}) or check the training data of batches {lo}-{hi}"
    if state.rollbacks >= t.max_rollbacks:
        raise DivergedError(
            f"training diverged at step {state.step}{where} ({verdict.reason} since step {first_bad}) "
            f"after {state.rollbacks} rollback(s): {advice}"
        )
    state.rollbacks += 1
    state.skip_batches |= bad_batches
    guard.reset_runs()
    if job.sync.reset_to_global():
        # Several sites: take the parameters the sites share (newer than any checkpoint of ours)
        # and go on from this step, in step with the others; the bad batches are behind us.
        if env.is_main:
            log.warning("step %d: took the sites' shared parameters after %s", state.step, verdict.reason)
        return state
    if job.sync.lockstep:
        raise DivergedError(
            f"training diverged at step {state.step}{where} ({verdict.reason} since step {first_bad}) and "
            f"cross-site ddp has no shared parameters to go back to: {advice}"
        )
    target = next((c for c in reversed(list_checkpoints(run_dir)) if c.step < first_bad), None)
    if target is None:
        raise DivergedError(
            f"training diverged at step {state.step}{where} ({verdict.reason} since step {first_bad}) and no "
            f"checkpoint before step {first_bad} is left to roll back to: {advice}, or checkpoint more often "
            "(train.checkpoint_every)"
        )
    if env.is_main:
        for newer in list_checkpoints(run_dir):
            if newer.step >= first_bad:  # written during the bad run: never resume from it
                shutil.rmtree(newer.path, ignore_errors=True)
        log.warning(
            "rolling back from step %d to the checkpoint of step %d; skipping batches %s",
            state.step,
            target.step,
            sorted(bad_batches),
        )
    barrier()
    restored = restore(job, target.path, env=env, device=device)
    restored.skip_batches |= state.skip_batches
    restored.rollbacks = max(restored.rollbacks, state.rollbacks)
    restored.skipped_steps, restored.spikes = state.skipped_steps, state.spikes
    restored.speeds = state.speeds
    restored.guard = guard.state_dict()
    return restored


def _site_name() -> str | None:
    return os.environ.get(SITE)
