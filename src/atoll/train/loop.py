"""The one training loop of a site: pre-training and fine-tuning both run it.

Run by every rank of a site. A caller (`atoll.train.trainer`, `atoll.finetune.trainer`) builds a
`TrainingJob`: the wrapped model, its trainable parameters, optimizer and schedule, a batch
source, a loss, an evaluation and the cross-site sync; `run_loop` then does the steps, the
metrics, evaluation and checkpoints the same way for both.

One step, on every rank:

    runner.forward_backward(micro-batches)            (each summed loss scaled by
                                                      dp_size / targets in the global batch,
                                                      so DDP's mean is the global-batch mean;
                                                      ranks of different speeds hold uneven
                                                      shares, atoll.train.balance)
    sync.commit_gradients(tokens)                     (`ddp` across sites averages gradients here;
                                                      False: skip the inner step, as torchft does)
    runner.clip_grad_norm; the guard judges the site's loss and gradient norm (atoll.train.guard):
      apply -> optimizer.step;  skip (not finite) -> no optimizer step;
      rollback -> back to the last good checkpoint (one site) or to the sites' shared
      parameters (several), skipping the batches that led there
    scheduler.step
    sync.after_step(step, tokens)                     (outer rounds: send, apply; see atoll.sync)

A run ends at `total_steps`, or, when the sync paces its rounds (`atoll.sync.pacing`: a wall-clock
budget or a measured balance), after its last round, whatever step that is.

The loop never asks which strategy runs: a single site gets `NoSync`, several sites a
`atoll.sync.engine.CrossSiteSync`, and both answer the same five calls.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atoll.config import ParallelSection, SyncSection, TrainSection
from atoll.config.topology import SiteSpec
from atoll.errors import AtollError
from atoll.parallel.dist import DistEnv, all_reduce_max, all_reduce_mean_gradients, all_reduce_sum
from atoll.parallel.layout import RankPlace, zero_level
from atoll.parallel.recompute import plain_name
from atoll.report.metrics import MetricsWriter
from atoll.report.progress import ProgressSink
from atoll.sync.site_env import SiteEnv
from atoll.train.balance import RankBalancer, rank_devices, site_speed
from atoll.train.guard import StepGuard
from atoll.train.job import (
    LoopState,
    NoSync,
    SiteSync,
    TrainingJob,
    save,
)
from atoll.train.recovery import REMEMBERED_STEPS, draw, log_verdict, roll_back
from atoll.train.runner import LocalRunner
from atoll.train.schedule import warmup_cosine

log = logging.getLogger(__name__)

# Metrics that each rank counts for itself and the site reports as a sum: a rank sends only the
# parameters it owns across the WAN.
SUMMED_OVER_RANKS = ("wan_bytes_sent", "wan_bytes_received", "heal_bytes")


class TrainableParameters(nn.Module):
    """The trainable parameters of a model under their names in the base model: what the
    cross-site sync exchanges (all of them in pre-training, the adapters of a LoRA stage).
    Holds references, not copies."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner = model.module if hasattr(model, "module") else model
        self._named = [
            (plain_name(n).removeprefix("base_model.model."), p) for n, p in inner.named_parameters() if p.requires_grad
        ]

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self._named)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return (p for _, p in self._named)


def build_sync(
    model: nn.Module, cfg: SyncSection, *, site_env: SiteEnv | None, env: DistEnv, steps: int, device: torch.device
) -> tuple[SiteSync, SiteSpec | None]:
    """The rank's sync (NoSync without a site environment) and its site's topology entry.

    `steps` is `train.steps` (the run's rounds: steps // inner_steps). Rounds end as
    `atoll.sync.pacing.pace_mode` says. Collective across sites for a multi-site rank (it joins
    the Lighthouse's quorum machinery).
    """
    if site_env is None:
        return NoSync(), None
    from atoll.config.topology import load_topology
    from atoll.sync.join import sync_for_site
    from atoll.sync.pacing import Pacer, pace_mode

    topology = load_topology(site_env.topology)
    pacer = Pacer(
        pace_mode(cfg, sites_differ=topology.sites_differ()),
        site_env.site,
        cfg.inner_steps_for(site_env.site),
        rounds=max(1, steps // cfg.inner_steps),
        round_seconds=cfg.round_seconds,
        tolerance=cfg.balance_tolerance,
        rebalance_gain=cfg.rebalance_gain,
        agree=lambda x: all_reduce_max(x, device=device),
        prior={site.name: 1.0 / site_speed(site) for site in topology.sites},
        # Per-site counts (a plan's split) start a balanced run; every site, listed or not, alike.
        first_split={site.name: cfg.inner_steps_for(site.name) for site in topology.sites}
        if cfg.site_inner_steps
        else None,
    )
    sync = sync_for_site(
        TrainableParameters(model),
        cfg,
        site_env,
        local_rank=env.local_rank,
        local_world_size=env.local_world_size,
        pacer=pacer,
    )
    return sync, topology.site(site_env.site)


def site_backend(site_env: SiteEnv | None) -> str | None:
    """The collective library of this rank's site's devices (catalog), None without a site."""
    if site_env is None:
        return None
    from atoll.config.topology import load_topology

    return load_topology(site_env.topology).site(site_env.site).backend


def rank_balancer(
    parallel: ParallelSection,
    site: SiteSpec | None,
    *,
    global_batch: int,
    env: DistEnv,
    device: torch.device,
    place: RankPlace | None = None,
) -> RankBalancer:
    """This rank's share of each global batch and its emulated slowdown (`atoll.train.balance`).

    The batch is split over the data-parallel replicas (`place`; default: every rank one): the
    tensor- and pipeline-parallel ranks of a replica read the same rows.
    """
    place = place or RankPlace.data_parallel(env.rank, env.world_size)
    devices = rank_devices(parallel, site, world_size=place.dp_size)
    uneven = len(set(devices)) > 1 or bool(parallel.rank_slowdowns)
    if uneven and place.dp_size != env.world_size:
        raise AtollError(
            "ranks of different speeds share a batch unevenly only when every rank is a replica: "
            "drop parallel.rank_slowdowns (or the site's mixed devices) or use --parallel.tp=1 --parallel.pp=1"
        )
    if zero_level(parallel) > 0 and len(set(devices)) > 1:
        raise AtollError("ranks of different speeds share a batch unevenly under parallel.shard=ddp only: use ddp")
    return RankBalancer(
        global_batch,
        place.dp_rank,
        devices,
        every=parallel.rebalance_every,
        sum_over_site=lambda values: all_reduce_sum(values, device=device),
        balance=parallel.balance_ranks,
        measure=bool(parallel.rank_slowdowns),
    )


def site_steps(steps: int, sync: SyncSection, site: str | None) -> int:
    """Inner steps a site runs: the same number of rounds everywhere, each of the site's own H."""
    if site is None or sync.strategy == "ddp":
        return steps
    rounds = max(1, steps // sync.inner_steps)
    return rounds * sync.inner_steps_for(site)


def make_optimizer(model: nn.Module, t: TrainSection, *, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, norms and biases (1-D) do not.

    A group without parameters (LoRA adapters are all matrices) is left out: checkpoints store
    the optimizer's hyper-parameters by parameter name (`atoll.train.checkpoint`), and an empty
    group has none to store them under."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        fused=device.type == "cuda",
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainSection, *, total_steps: int, clock: Callable[[int], float] | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `min_lr_ratio` over the site's own step count.

    `clock` maps the scheduler's step to the one the schedule follows: a paced sync's place on
    its nominal axis (`SiteSync.schedule_step`), so sites of any speed decay together."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(
            clock(s) if clock is not None else s,  # type: ignore[arg-type]
            warmup_steps=t.warmup_steps,
            total_steps=total_steps,
            min_ratio=t.min_lr_ratio,
        ),
    )


def _sync_record(sync: SiteSync, values: dict[str, Any], *, device: torch.device) -> dict[str, Any]:
    """The sync's metrics with the per-rank counters summed over the site (collective)."""
    record = dict(values)
    summed = [k for k in SUMMED_OVER_RANKS if k in record]
    if summed:
        totals = all_reduce_sum([float(record[k]) for k in summed], device=device)
        record.update({k: int(v) for k, v in zip(summed, totals)})
    return record


def jump_forward(job: TrainingJob, state: LoopState, *, to: int, metrics: MetricsWriter) -> None:
    """The site healed from peers further on: move its step (and the learning-rate schedule) to
    theirs, so it runs the rest of the run with them. Its tokens and data stream stay its own:
    it did not train on the steps it skips."""
    skipped = to - state.step
    log.warning("healed forward: step %d -> %d (the %d steps the other sites ran meanwhile)", state.step, to, skipped)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        for _ in range(skipped):
            job.scheduler.step()
    metrics.log(to, {"healed_forward_from": state.step, "healed_forward_steps": skipped})
    state.step = to


def run_loop(
    job: TrainingJob,
    state: LoopState,
    *,
    t: TrainSection,
    total_steps: int,
    end_step: int,
    run_dir: Path,
    env: DistEnv,
    device: torch.device,
    metrics: MetricsWriter,
    progress: ProgressSink,
    on_checkpoint: Callable[[LoopState], None] | None = None,
) -> LoopState:
    """Train from `state.step` to `end_step` (≤ `total_steps`); collective over the site.

    Checkpoints go to `run_dir` every `t.checkpoint_every` steps and at `end_step`; evaluation
    runs every `t.eval_every` steps and at the end (`total_steps`, or a paced sync's last round),
    where the sync also finishes (every site then holds the same parameters; `state.finished`).
    Closes the sync and the progress display on the way out.
    """
    model, sync = job.model, job.sync
    params = job.params
    guard = StepGuard.from_config(t)
    sync.listener = lambda what, step, rnd, unit: metrics.log(
        step, {"exchange": what, "exchange_round": rnd, "exchange_unit": unit}
    )  # what a live view reads between a site's logged steps
    state.skip_batches |= set(t.skip_batches)
    guard.load_state_dict(state.guard)
    compute_seconds = 0.0
    wall_start = time.perf_counter()
    state.finished = not sync.paced and state.step >= total_steps  # resumed at the end
    balancer = job.balancer
    uneven = balancer is not None and balancer.uneven and env.world_size > 1
    place = job.place or RankPlace.data_parallel(env.rank, env.world_size)
    runner = job.runner or LocalRunner(model, job.loss_fn, place=place, uneven=uneven)
    model.train()
    try:
        while state.step < end_step and not state.finished:
            t0 = time.perf_counter()
            batch, batch_index = draw(job.batches, state)
            if batch.global_targets is not None:
                global_targets = float(batch.global_targets)
            else:  # each target counted by one rank only (the others of its replica read the same rows)
                (global_targets,) = all_reduce_sum([float(batch.local_targets) if place.counts else 0.0], device=device)
            # DDP, FSDP2 and the runner average gradients over the dp replicas: scaled by dp_size
            # here, their mean is the global-batch mean (the tp ranks of a replica share its loss).
            loss_sum = runner.forward_backward(batch.micro_batches, place.dp_size / max(global_targets, 1.0))
            compute = time.perf_counter() - t0
            if job.slowdown > 1.0:
                time.sleep((job.slowdown - 1.0) * compute)
                compute *= job.slowdown
            if uneven:
                assert balancer is not None
                all_reduce_mean_gradients(params, world_size=env.world_size)  # what DDP's all-reduce gives
                balancer.record(samples=balancer.slice()[1], seconds=compute, batches=job.batches)
            tokens = int(global_targets)
            committed = sync.commit_gradients(tokens=tokens)
            t1 = time.perf_counter()
            grad_norm = runner.clip_grad_norm(params, t.grad_clip)
            (total,) = all_reduce_sum([loss_sum], device=device)  # every rank judges the same numbers
            train_loss = total / max(global_targets, 1.0)
            judged_loss = train_loss if not sync.lockstep or math.isfinite(train_loss) else 0.0
            verdict = guard.judge(state.step + 1, loss=judged_loss, grad_norm=grad_norm)
            lr = job.optimizer.param_groups[0]["lr"]
            applied = committed and verdict.action == "apply"
            if applied:
                job.optimizer.step()
            with warnings.catch_warnings():  # torch warns when a schedule steps past a skipped optimizer step
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                job.scheduler.step()
            job.optimizer.zero_grad(set_to_none=True)
            compute_seconds += compute + time.perf_counter() - t1
            state.step += 1
            state.step_batch[state.step] = batch_index
            state.step_batch.pop(state.step - REMEMBERED_STEPS, None)
            if verdict.action != "apply":
                tokens = 0  # the site learned nothing from this batch: its update weighs nothing
            state.tokens_seen += tokens
            if verdict.reason is not None:
                log_verdict(verdict, state, metrics, env=env, batch_index=batch_index, loss=train_loss, norm=grad_norm)
            sync.after_step(state.step, tokens=tokens, seconds=time.perf_counter() - t0)
            if verdict.action == "rollback":
                at = state.step
                state = roll_back(job, state, verdict, guard, t=t, run_dir=run_dir, env=env, device=device)
                metrics.log(state.step, {"guard": "rolled_back", **state.guard_extra()})
                if state.step < at:  # back to a checkpoint: its steps run again
                    if env.is_main:
                        progress.update(completed=state.step, loss=float("nan"), tokens_per_s=0.0)
                    continue
                # with peers the site took their θ and stays at this step, in step with their rounds
            jump = sync.take_jump()
            if jump is not None and jump > state.step:
                jump_forward(job, state, to=min(jump, end_step), metrics=metrics)
            state.finished = sync.run_over() if sync.paced else state.step >= total_steps
            if state.finished:
                sync.finish(state.step)
            elapsed = time.perf_counter() - t0
            state.speeds.append(job.batches.tokens_per_step / elapsed)
            state.guard = guard.state_dict()

            if state.step % t.log_every == 0 or state.step == end_step:
                wall = time.perf_counter() - wall_start
                record: dict[str, Any] = {
                    "loss": train_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": state.speeds[-1],
                    "tokens_seen": state.tokens_seen,
                    "step_seconds": elapsed,
                    "compute_seconds": compute_seconds,
                    "wall_seconds": wall,
                    "compute_utilization": compute_seconds / wall,
                    "skipped_steps": state.skipped_steps,
                    "spikes": state.spikes,
                    "rollbacks": state.rollbacks,
                }
                if uneven:
                    assert balancer is not None
                    record["rank_shares"] = list(balancer.counts)
                    if balancer.measured is not None:
                        record["rank_samples_per_s"] = balancer.measured
                record.update(_sync_record(sync, sync.metrics(), device=device))
                metrics.log(state.step, record)
                if env.is_main:
                    progress.update(
                        completed=state.step, loss=train_loss, tokens_per_s=statistics.median(state.speeds[-20:])
                    )
            if (t.eval_every and state.step % t.eval_every == 0) or state.finished:
                t_eval = time.perf_counter()
                state.val_loss = job.evaluate()
                metrics.log(state.step, {"val_loss": state.val_loss, "eval_seconds": time.perf_counter() - t_eval})
                if env.is_main:
                    log.info("step %d: validation loss %.4f", state.step, state.val_loss)
            due = t.checkpoint_every and state.step % t.checkpoint_every == 0 and not guard.in_bad_run
            if due or state.step == end_step or state.finished:  # during a bad run the last good checkpoint must stay
                t_save = time.perf_counter()
                save(job, state, run_dir, env=env, device=device, keep=t.keep_checkpoints)
                metrics.log(state.step, {"checkpoint": state.step, "checkpoint_seconds": time.perf_counter() - t_save})
                if on_checkpoint is not None:
                    on_checkpoint(state)
        if state.finished:
            final = sync.final_metrics()
            if final:  # every site now holds the same parameters: the record says which
                metrics.log(state.step, _sync_record(sync, final, device=device))
    finally:
        if env.is_main:
            progress.stop()
        metrics.close()
        sync.close()
    return state
