"""Fine-tuning of one site: a frozen parent, a loss mask and the one training loop.

Run by every rank (in the CLI's process, or ``python -m atoll.finetune`` under torchrun or the
local and multi-site launchers). The steps, metrics, evaluation and checkpoints are
`atoll.train.loop`'s, as in pre-training; what is particular to a stage is built here: the
model from the parent (with LoRA adapters when asked), the example stream, the masked loss and
the stage's lineage record.

The loss of a step is the mean over the loss-bearing targets of the whole global batch: each
rank scales its masked sum by world_size / (targets in the global batch), so the DDP average
is exactly that mean whatever the split and however many response tokens each rank holds.

Across sites only the trainable parameters are exchanged (LoRA: the adapters), so a LoRA stage
sends a few percent of the model over the WAN.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atoll.data import even_split
from atoll.errors import AtollError
from atoll.finetune.config import FinetuneConfig
from atoll.finetune.data import ExampleSet, ExampleStream
from atoll.finetune.lora import apply_lora
from atoll.finetune.setup import prepare_finetune, prepare_site_stage
from atoll.model import Transformer
from atoll.model.loss import masked_loss_sum
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
from atoll.report.metrics import MetricsWriter
from atoll.report.progress import NullProgress, ProgressSink
from atoll.rundir.adapter import save_adapter
from atoll.rundir.layout import ADAPTER_DIR, DATA_DIR, site_dir
from atoll.rundir.lineage import Stage, model_config_of, read_lineage, write_lineage
from atoll.rundir.load import load_stage_state
from atoll.sync.site_env import SiteEnv
from atoll.train.checkpoint import latest_checkpoint
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

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What a stage reports when it ends (the main rank's view)."""

    run_dir: Path
    method: str
    step: int
    total_steps: int
    val_loss: float | None
    tokens_per_s: float | None
    tokens_seen: int
    trainable_params: int
    wan_bytes_sent: int | None = None

    @property
    def stopped_early(self) -> bool:
        return self.step < self.total_steps


class ExampleBatches:
    """Fine-tuning's batch source: this rank's rows of each global batch, with their loss masks."""

    def __init__(
        self,
        data: ExampleSet,
        stream: ExampleStream,
        *,
        rank_start: int,
        rank_count: int,
        micro_batch: int,
        global_batch: int,
    ) -> None:
        self.data, self.stream = data, stream
        self.rows = slice(rank_start, rank_start + rank_count)
        self.micro_batch = micro_batch
        self.tokens_per_step = global_batch * data.seq_len

    def next_batch(self) -> StepBatch:
        tokens, mask = self.data.gather(self.stream.next_indices()[self.rows])
        micro = list(zip(tokens.split(self.micro_batch), mask.split(self.micro_batch)))
        # Response-only masks hold different numbers of targets on each rank: the loop sums them.
        return StepBatch(micro, local_targets=int(mask.sum()), global_targets=None)

    def set_slice(self, rank_start: int, rank_count: int) -> None:
        self.rows = slice(rank_start, rank_start + rank_count)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    data: ExampleSet,
    *,
    max_rows: int,
    micro_batch: int,
    env: DistEnv,
    device: torch.device,
    dtype: str,
) -> float:
    """Mean masked loss over the first `max_rows` rows of `data`, shared by the site's ranks."""
    model.eval()
    rows = min(max_rows, len(data))
    if rows >= env.world_size:
        start, count = even_split(rows, env.world_size, env.rank)
    else:
        start, count = 0, rows if env.rank == 0 else 0
    total, n = 0.0, 0.0
    for offset in range(start, start + count, micro_batch):
        tokens, mask = data.gather(range(offset, min(offset + micro_batch, start + count)))
        total += float(masked_loss_sum(model, tokens, mask, device=device, dtype=dtype))
        n += float(mask.sum())
    model.train()
    total, n = all_reduce_sum([total, n], device=device)
    return total / max(n, 1.0)


def site_stage_dir(run_dir: Path, site: str | None, *, index: int = 0) -> Path:
    """Where a site keeps checkpoints and metrics: the first site in the stage's directory itself
    (so the stage loads like a single-site one), the others in RUN/sites/NAME."""
    if site is None or index == 0:
        return run_dir
    return site_dir(run_dir, site)


def run_finetune(
    cfg: FinetuneConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: ProgressSink | None = None,
    prepared: bool = True,
) -> FinetuneResult:
    """Train the stage to `cfg.train.steps` (or `stop_after`, checkpointing there); collective over the site.

    `prepared`: the CLI already ran `prepare_finetune`; otherwise the main rank runs it first.
    Raises AtollError for a user's mistake, on every rank alike.
    """
    env = dist_env_from_environ()
    site_env = SiteEnv.from_environ()
    device = pick_device(cfg.parallel.device, env, site_backend=site_backend(site_env))
    if device.type == "cpu":
        set_cpu_threads(cfg.parallel.threads, env)
    backend = pick_backend(cfg.parallel.backend, device)
    init_process_group(env, device=device, backend=backend, timeout_seconds=cfg.parallel.timeout_seconds)
    try:
        if not prepared:
            problem: str | None = None
            if env.is_main:  # every site prepares on its own machine: data centers share no disk
                try:
                    if site_env is None:
                        prepare_finetune(cfg, resume=resume)
                    else:
                        own_dir = site_stage_dir(cfg.run.path, site_env.site, index=site_env.index)
                        prepare_site_stage(cfg, resume=resume, first_site=site_env.index == 0, own_dir=own_dir)
                except AtollError as exc:
                    problem = str(exc)
            problem = broadcast_object(problem)  # type: ignore[assignment]
            if problem:
                raise AtollError(problem)
        return _finetune(
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


def _build_model(cfg: FinetuneConfig, *, resume: bool, device: torch.device) -> nn.Module:
    run_dir = cfg.run.path
    mcfg = model_config_of(Stage(run_dir, cfg.finetune.method))
    torch.manual_seed(cfg.run.seed)  # identical adapters (and fresh weights) on every rank
    model: nn.Module = Transformer(mcfg)
    if not resume:  # on resume the checkpoint holds every weight
        step = read_lineage(run_dir)["parent"]["fingerprint"].get("step")
        _, state = load_stage_state(cfg.finetune.parent, step=step)
        model.load_state_dict(state)
    if cfg.finetune.method == "lora":
        model = apply_lora(model, cfg.finetune.lora)
    return model.to(device)


def _finetune(
    cfg: FinetuneConfig,
    *,
    env: DistEnv,
    device: torch.device,
    site_env: SiteEnv | None,
    resume: bool,
    stop_after: int | None,
    progress: ProgressSink,
) -> FinetuneResult:
    t = cfg.train
    run_dir = cfg.run.path
    site = site_env.site if site_env is not None else None
    own_dir = site_stage_dir(run_dir, site, index=site_env.index if site_env is not None else 0)
    writes_stage = env.is_main and (site_env is None or site_env.index == 0)
    total_steps = site_steps(t.steps, cfg.sync, site)
    if resume and latest_checkpoint(own_dir) is None:
        raise AtollError(f"--resume: {own_dir} has no complete checkpoint: start without --resume")

    model = _build_model(cfg, resume=resume, device=device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    model = wrap_model(model, shard="ddp", device=device, env=env, compile=cfg.parallel.compile)
    optimizer = make_optimizer(model, t, device=device)
    sync, site_spec = build_sync(model, cfg.sync, site_env=site_env, env=env, steps=t.steps, device=device)
    balancer = rank_balancer(cfg.parallel, site_spec, global_batch=t.global_batch, env=env, device=device)

    train_set = ExampleSet(run_dir / DATA_DIR, "train")
    val_set = ExampleSet(run_dir / DATA_DIR, "validation")
    data_seed = cfg.run.seed if site_env is None else cfg.run.seed + 7919 * (site_env.index + 1)
    stream = ExampleStream(len(train_set), global_batch=t.global_batch, seed=data_seed)
    start, count = balancer.slice()
    eval_rows = t.eval_batches * t.global_batch
    job = TrainingJob(
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(
            optimizer, t, total_steps=total_steps, clock=sync.schedule_step if sync.paced else None
        ),
        batches=ExampleBatches(
            train_set,
            stream,
            rank_start=start,
            rank_count=count,
            micro_batch=t.micro_batch,
            global_batch=t.global_batch,
        ),
        loss_fn=lambda m, micro: masked_loss_sum(m, micro[0], micro[1], device=device, dtype=cfg.parallel.dtype),
        evaluate=lambda: evaluate_split(
            model,
            val_set,
            max_rows=eval_rows,
            micro_batch=t.micro_batch,
            env=env,
            device=device,
            dtype=cfg.parallel.dtype,
        ),
        sync=sync,
        slowdown=balancer.slowdown,
        balancer=balancer,
    )

    if resume:
        ckpt = latest_checkpoint(own_dir)
        assert ckpt is not None
        state = restore(job, ckpt.path, env=env, device=device)
        if env.is_main:
            log.info("resumed %s from step %d", own_dir, state.step)
    else:
        state = LoopState()
        torch.manual_seed(cfg.run.seed + 1 + env.rank)  # LoRA dropout: same stream whatever set-up consumed

    metrics = MetricsWriter(own_dir, enabled=env.is_main, resume_step=state.step if resume else None)
    if sync.paced:  # the run ends on its last round, whatever step that is
        end = stop_after if stop_after is not None else sys.maxsize
    else:
        end = min(total_steps, stop_after) if stop_after is not None else total_steps
    if env.is_main:
        progress.start(total=total_steps, completed=state.step, description=site or cfg.run.name)
        log.info(
            "%s fine-tuning: %s trainable of %s parameters; %d rank(s) on %s; %d rows of %d tokens",
            cfg.finetune.method,
            f"{trainable:,}",
            f"{total_params:,}",
            env.world_size,
            device.type,
            len(train_set),
            train_set.seq_len,
        )

    def record_stage(state: LoopState) -> None:
        # Collective: each rank sends only the adapters it owns, the site's traffic is the sum.
        (site_sent,) = all_reduce_sum([float(sync.metrics().get("wan_bytes_sent", 0))], device=device)
        if not writes_stage:
            return
        if cfg.finetune.method == "lora":
            save_adapter(model, cfg.finetune.lora, run_dir / ADAPTER_DIR, base_model=str(cfg.finetune.parent))
        lineage = read_lineage(run_dir)
        lineage.update(
            steps=state.step,
            tokens=state.tokens_seen,
            status="finished" if state.finished else "running",
            val_loss=state.val_loss,
            trainable_params=trainable,
        )
        if site_env is not None:
            lineage["wan"] = {
                "sites": site_env.num_sites,
                "bytes_sent_by_first_site": int(site_sent),
                "strategy": cfg.sync.strategy,
                "codec": cfg.sync.codec,
            }
        write_lineage(run_dir, lineage)

    state = run_loop(
        job,
        state,
        t=t,
        total_steps=total_steps,
        end_step=end,
        run_dir=own_dir,
        env=env,
        device=device,
        metrics=metrics,
        progress=progress,
        on_checkpoint=record_stage,
    )
    wan_sent = sync.metrics().get("wan_bytes_sent")
    return FinetuneResult(
        run_dir=run_dir,
        method=cfg.finetune.method,
        step=state.step,
        total_steps=state.step if state.finished else total_steps,  # a paced run's own count
        val_loss=state.val_loss,
        tokens_per_s=state.median_tokens_per_s,
        tokens_seen=state.tokens_seen,
        trainable_params=trainable,
        wan_bytes_sent=int(wan_sent) if wan_sent is not None else None,
    )
