"""Pre-training of one site: the model, the token stream and the validation set for the one loop.

Run by every rank (``python -m atoll.train`` under torchrun or `atoll.parallel.launch`). The
global batch of each step is fixed by the data stream, independent of the number of ranks; each
rank's loss is weighted by its share of the step's tokens, so the averaged gradient equals the
global-batch mean exactly whatever the split. The steps themselves are `atoll.train.loop`'s.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from atoll.config import RunConfig
from atoll.data import BatchStream, TokenDataset, eval_batches, even_split
from atoll.errors import AtollError
from atoll.model import ModelConfig, Transformer
from atoll.model.hf import load_hf_model
from atoll.model.loss import token_loss_sum
from atoll.parallel.dist import (
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    destroy_process_group,
    dist_env_from_environ,
    init_process_group,
    pick_backend,
    pick_device,
    set_cpu_threads,
    wrap_model,
)
from atoll.parallel.layout import Layout, RankPlace, build_mesh, pipeline_micro_batches, resolve_layout
from atoll.parallel.tensor import loss_context, scalar
from atoll.report.metrics import MetricsWriter
from atoll.report.progress import NullProgress, ProgressSink
from atoll.rundir.layout import read_model_json
from atoll.sync.site_env import SiteEnv
from atoll.train.checkpoint import latest_checkpoint, load_model_weights
from atoll.train.job import LoopState, StepBatch, TrainingJob, restore
from atoll.train.loop import (
    build_sync,
    make_optimizer,
    make_scheduler,
    rank_balancer,
    run_loop,
    site_backend,
    site_steps,
)
from atoll.train.runner import LocalRunner
from atoll.train.setup import classify_init, prepare_run, site_config

if TYPE_CHECKING:
    from atoll.parallel.pipeline import PipelineRunner

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run reports when it ends (the main rank's view)."""

    run_dir: Path
    step: int
    val_loss: float | None
    tokens_per_s: float | None  # median over logged steps of this process's run
    tokens_seen: int
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def build_model(
    mcfg: ModelConfig, *, device: torch.device, layout: Layout | None = None, place: RankPlace | None = None
) -> Transformer:
    """The whole model, or with pipeline stages (`layout.pp` > 1) the part of the rank at `place`;
    initialized at construction, so under one seed a part holds the whole model's values."""
    if layout is not None and layout.pp > 1:
        assert place is not None, "a pipeline stage needs the rank's place"
        from atoll.parallel.pipeline import build_stage_model  # torch's pipelining: only with stages

        return build_stage_model(mcfg, pp=layout.pp, pp_rank=place.pp_rank, vp=layout.vp).to(device)
    return Transformer(mcfg).to(device)


def init_weights_from(model: Transformer, source: Path) -> None:
    """Overwrite fresh weights with a Hugging Face model's or an atoll run's (a pipeline stage's
    part takes the weights it holds)."""
    src = classify_init(source)
    if src.kind == "hf":
        _, state = load_hf_model(source)
        if not model.is_whole:  # the other stages' weights are theirs
            with torch.device("meta"):
                whole = set(Transformer(model.cfg).state_dict())
            held = set(model.state_dict())
            state = {k: v for k, v in state.items() if k in held or k not in whole}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise AtollError(
                f"weights in {source} do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    else:
        ckpt = latest_checkpoint(source)
        if ckpt is None:
            raise AtollError(f"model.init_from {source} has no complete checkpoint: train it first")
        load_model_weights(ckpt.path, model)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TokenDataset,
    cfg: RunConfig,
    *,
    env: DistEnv,
    device: torch.device,
    place: RankPlace | None = None,
    tensor_parallel: bool = False,
    pipeline: PipelineRunner | None = None,
) -> float:
    """Mean validation loss over fixed batches, summed over the site's replicas (`place`, default
    every rank one; each target counted by one rank of its replica); collective over the site.
    With `pipeline` the batches run forward through its stages (every rank of a pipeline reads
    the same rows)."""
    place = place or RankPlace.data_parallel(env.rank, env.world_size)
    model.eval()
    total, count = 0.0, 0
    start, count_here = even_split(cfg.train.global_batch, place.dp_size, place.dp_rank)
    batches = eval_batches(
        dataset,
        global_batch=cfg.train.global_batch,
        max_batches=cfg.train.eval_batches,
        rank_start=start,
        rank_count=count_here,
    )
    for batch in batches:
        if pipeline is not None:
            for run in _same_shape_runs(list(batch.split(cfg.train.micro_batch))):
                loss_sum, n = pipeline.evaluate(run)
                total += loss_sum
                count += n
            continue
        for chunk in batch.split(cfg.train.micro_batch):
            with loss_context(tensor_parallel):
                loss, n = token_loss_sum(model, chunk, device=device, dtype=cfg.parallel.dtype)
            total += scalar(loss)
            count += n
    model.train()
    if not place.counts:
        total, count = 0.0, 0
    total, count = all_reduce_sum([total, float(count)], device=device)
    return total / max(count, 1.0)


def _same_shape_runs(chunks: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive chunks grouped by shape: a pipeline runs micro-batches of one shape at a time."""
    runs: list[list[torch.Tensor]] = []
    for chunk in chunks:
        if runs and runs[-1][0].shape == chunk.shape:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs


class TokenBatches:
    """Pre-training's batch source: this rank's slice of each global batch of packed sequences."""

    def __init__(self, stream: BatchStream, *, micro_batch: int, global_batch: int, seq_len: int) -> None:
        self.stream = stream
        self.micro_batch = micro_batch
        self.tokens_per_step = global_batch * seq_len  # every position predicts a token

    def next_batch(self) -> StepBatch:
        batch = self.stream.next_batch()
        targets = batch.size(0) * (batch.size(1) - 1)
        return StepBatch(
            list(batch.split(self.micro_batch)), local_targets=targets, global_targets=self.tokens_per_step
        )

    def set_slice(self, rank_start: int, rank_count: int) -> None:
        self.stream.set_slice(rank_start, rank_count)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def run_training(
    cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None, progress: ProgressSink | None = None
) -> TrainResult:
    """Train to `cfg.train.steps` (or `stop_after`, writing a checkpoint there); collective over the site.

    Raises AtollError for a user's mistake, on every rank alike.
    """
    env = dist_env_from_environ()
    site_env = SiteEnv.from_environ()
    if site_env is not None:
        cfg = site_config(cfg, site_env.site)
    device = pick_device(cfg.parallel.device, env, site_backend=site_backend(site_env))
    if device.type == "cpu":
        set_cpu_threads(cfg.parallel.threads, env)
    backend = pick_backend(cfg.parallel.backend, device)
    init_process_group(env, device=device, backend=backend, timeout_seconds=cfg.parallel.timeout_seconds)
    try:
        return _train(
            cfg,
            env=env,
            device=device,
            site_env=site_env,
            resume=resume,
            stop_after=stop_after,
            progress=progress or NullProgress(),
        )
    finally:
        destroy_process_group()


def _prepare_everywhere(cfg: RunConfig, *, env: DistEnv, resume: bool) -> ModelConfig:
    """The main rank checks and writes the run directory (and the layout); the others learn the outcome."""
    problem: str | None = None
    if env.is_main:
        try:
            prepare_run(cfg, resume=resume, world_size=env.world_size)
        except AtollError as exc:
            problem = str(exc)
    problem = broadcast_object(problem)  # type: ignore[assignment]
    if problem:
        raise AtollError(problem)
    return read_model_json(cfg.run.path)


def _train(
    cfg: RunConfig,
    *,
    env: DistEnv,
    device: torch.device,
    site_env: SiteEnv | None,
    resume: bool,
    stop_after: int | None,
    progress: ProgressSink,
) -> TrainResult:
    t = cfg.train
    run_dir = cfg.run.path
    site = site_env.site if site_env is not None else None
    mcfg = _prepare_everywhere(cfg, env=env, resume=resume)
    total_steps = site_steps(t.steps, cfg.sync, site)

    layout = resolve_layout(cfg.parallel, world_size=env.world_size, model=mcfg, seq_len=cfg.data.seq_len)
    place = layout.place(env.rank)
    num_micro = pipeline_micro_batches(layout, global_batch=t.global_batch, micro_batch=t.micro_batch)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (a stage: its layers')
    model = build_model(mcfg, device=device, layout=layout, place=place)
    if cfg.model.init_from is not None and not resume:
        init_weights_from(model, cfg.model.init_from)
    mesh = build_mesh(layout, device_type=device.type) if layout.split and env.launched else None
    model = wrap_model(model, device=device, env=env, layout=layout, mesh=mesh, compile=cfg.parallel.compile)
    # zero 0 with tp or pp > 1: no DDP wrapper, the replicas average their gradients in the runner
    dp_group = mesh["dp"].get_group() if mesh is not None and layout.zero == 0 and layout.dp > 1 else None
    pipeline: PipelineRunner | None = None
    if layout.pp > 1:
        assert mesh is not None  # pp > 1 means several ranks, launched
        from atoll.parallel.pipeline import PipelineRunner, shard_stages

        pipeline = PipelineRunner(
            model,  # type: ignore[arg-type]
            schedule=layout.pp_schedule,
            num_micro_batches=num_micro,
            group=mesh["pp"],
            device=device,
            vp=layout.vp,
            dtype=cfg.parallel.dtype,
            dp_group=dp_group,
            count_loss=place.counts,  # the last stage's tp rank 0, once per replica
            loss_context=(lambda: loss_context(True)) if layout.tp > 1 else None,
        )
        if layout.zero > 0 and layout.dp > 1:
            shard_stages(pipeline, mesh=mesh["dp"], zero=layout.zero)
    optimizer = make_optimizer(model, t, device=device)
    # Each site trains on its own stream: the shards the data's placement gives it (all of them
    # without a site map), in an order of its own. Validation is the whole held-out split on
    # every site, so that the sites' losses measure the one model on the same data.
    train_ds = TokenDataset(cfg.data.dir, "train", seq_len=cfg.data.seq_len, site=site)
    val_ds = TokenDataset(cfg.data.dir, "validation", seq_len=cfg.data.seq_len)
    sync, site_spec = build_sync(model, cfg.sync, site_env=site_env, env=env, steps=t.steps, device=device)
    balancer = rank_balancer(cfg.parallel, site_spec, global_batch=t.global_batch, env=env, device=device, place=place)
    start, count = balancer.slice()  # in proportion to the ranks' speeds (even when they are alike)
    stream = BatchStream(train_ds, global_batch=t.global_batch, seed=cfg.run.seed, rank_start=start, rank_count=count)
    clock = sync.schedule_step if sync.paced else None
    job = TrainingJob(
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, t, total_steps=total_steps, clock=clock),
        batches=TokenBatches(stream, micro_batch=t.micro_batch, global_batch=t.global_batch, seq_len=cfg.data.seq_len),
        loss_fn=lambda m, chunk: token_loss_sum(m, chunk, device=device, dtype=cfg.parallel.dtype)[0],
        evaluate=lambda: evaluate(
            model, val_ds, cfg, env=env, device=device, place=place, tensor_parallel=layout.tp > 1, pipeline=pipeline
        ),
        sync=sync,
        slowdown=balancer.slowdown,
        balancer=balancer,
        place=place,
    )
    job.runner = pipeline or LocalRunner(
        model,
        job.loss_fn,
        place=place,
        uneven=balancer.uneven and env.world_size > 1,
        tensor_parallel=layout.tp > 1,
        dp_group=dp_group,
    )

    if resume:
        ckpt = latest_checkpoint(run_dir)
        assert ckpt is not None  # prepare_run checked
        state = restore(job, ckpt.path, env=env, device=device)
        if env.is_main:
            log.info("resumed %s from step %d", run_dir, state.step)
    else:
        state = LoopState()
        # Seed again so the RNG stream after set-up does not depend on what set-up consumed.
        torch.manual_seed(cfg.run.seed + 1 + env.rank)

    metrics = MetricsWriter(run_dir, enabled=env.is_main, resume_step=state.step if resume else None)
    if sync.paced:  # the run ends on its last round, whatever step that is
        end = stop_after if stop_after is not None else sys.maxsize
    else:
        end = min(total_steps, stop_after) if stop_after is not None else total_steps
    if env.is_main:
        progress.start(total=total_steps, completed=state.step, description=site or cfg.run.name)
        log.info(
            "model %s: %.2fM parameters; %d rank(s) on %s (tp %d x pp %d x dp %d, zero %d); "
            "global batch %d x %d tokens",
            cfg.model.preset or "init",
            mcfg.num_params() / 1e6,
            env.world_size,
            device.type,
            layout.tp,
            layout.pp,
            layout.dp,
            layout.zero,
            t.global_batch,
            cfg.data.seq_len,
        )
        if site is not None:
            log.info(
                "site %s reads %d train shard(s), %s tokens", site, len(train_ds.shards), f"{train_ds.num_tokens:,}"
            )
    if site is not None and not resume:  # which data this site trained on, for reports and tests
        metrics.log(
            state.step, {"train_shards": [s.file for s in train_ds.shards], "train_tokens": train_ds.num_tokens}
        )

    state = run_loop(
        job,
        state,
        t=t,
        total_steps=total_steps,
        end_step=end,
        run_dir=run_dir,
        env=env,
        device=device,
        metrics=metrics,
        progress=progress,
    )
    return TrainResult(
        run_dir=run_dir,
        step=state.step,
        val_loss=state.val_loss,
        tokens_per_s=state.median_tokens_per_s,
        tokens_seen=state.tokens_seen,
        stopped_early=not state.finished,
    )
