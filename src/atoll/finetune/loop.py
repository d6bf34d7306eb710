"""The fine-tuning loop of one site: pre-training's loop with a loss mask and a frozen parent.

Run by every rank (in the CLI's process, or ``python -m atoll.finetune`` under torchrun or the
local and multi-site launchers). What it shares with pre-training is used from there: process
groups and DDP (`atoll.parallel`), DCP checkpoints written complete-or-absent
(`atoll.train.checkpoint`), warm-up + cosine, metrics and progress, the cross-site engine.

The loss of a step is the mean over the loss-bearing targets of the whole global batch: each
rank scales its masked sum by world_size / (targets in the global batch), so the DDP average
is exactly that mean whatever the split and however many response tokens each rank holds.

Across sites only the trainable parameters are exchanged (LoRA: the adapters), so a LoRA stage
sends a few percent of the model over the WAN.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atoll.config import TrainSection
from atoll.data import even_split
from atoll.errors import AtollError
from atoll.finetune.config import FinetuneConfig
from atoll.finetune.data import DATA_DIR, ExampleSet, ExampleStream
from atoll.finetune.lora import ADAPTER_DIR, apply_lora, save_adapter
from atoll.finetune.loss import masked_loss_sum
from atoll.finetune.setup import prepare_finetune
from atoll.finetune.stage import Stage, load_stage_state, model_config_of, read_lineage, write_lineage
from atoll.model import Transformer
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
from atoll.sync.engine import param_checksum, sync_from_environ
from atoll.sync.transport import SiteInfo
from atoll.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from atoll.train.schedule import warmup_cosine
from atoll.train.trainer import site_from_environ

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


class TrainableParameters(nn.Module):
    """The trainable parameters of a model, under their names inside the base model: what the
    cross-site engine synchronizes. Holds references, not copies."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner = model.module if hasattr(model, "module") else model
        self._named = [(n.removeprefix("base_model.model."), p) for n, p in inner.named_parameters() if p.requires_grad]

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:  # type: ignore[override]
        return iter(self._named)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return (p for _, p in self._named)


def _no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()  # type: ignore[operator]


def make_optimizer(model: nn.Module, t: TrainSection, *, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; matrices decay, 1-D parameters do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        fused=device.type == "cuda",
    )


@torch.no_grad()
def evaluate_split(model: nn.Module, data: ExampleSet, *, max_rows: int, micro_batch: int, env: DistEnv, device: torch.device, dtype: str) -> float:
    """Mean masked loss over the first `max_rows` rows of `data`, shared by the site's ranks."""
    model.eval()
    rows = min(max_rows, len(data))
    start, count = even_split(rows, env.world_size, env.rank) if rows >= env.world_size else (0, rows if env.rank == 0 else 0)
    total, n = 0.0, 0.0
    for offset in range(start, start + count, micro_batch):
        tokens, mask = data.gather(range(offset, min(offset + micro_batch, start + count)))
        total += float(masked_loss_sum(model, tokens, mask, device=device, dtype=dtype))
        n += float(mask.sum())
    model.train()
    total, n = all_reduce_sum([total, n], device=device)
    return total / max(n, 1.0)


def site_stage_dir(run_dir: Path, site: SiteInfo | None) -> Path:
    """Where a site keeps checkpoints and metrics: the first site in the stage's directory itself
    (so the stage loads like a single-site one), the others in RUN/sites/NAME."""
    if site is None or site.index == 0:
        return run_dir
    return run_dir / "sites" / site.name


def run_finetune(cfg: FinetuneConfig, *, resume: bool = False, stop_after: int | None = None, progress: ProgressSink | None = None, prepared: bool = True) -> FinetuneResult:
    """Train the stage to `cfg.train.steps` (or `stop_after`, checkpointing there); collective over the site.

    `prepared`: the CLI already ran `prepare_finetune`; otherwise the main rank runs it first.
    Raises AtollError for a user's mistake, on every rank alike.
    """
    env = dist_env_from_environ()
    site = site_from_environ(env)
    device = pick_device(cfg.parallel.device, env)
    if device.type == "cpu":
        set_cpu_threads(cfg.parallel.threads, env)
    init_process_group(env, device=device, backend=pick_backend(cfg.parallel.backend, device), timeout_seconds=cfg.parallel.timeout_seconds)
    try:
        if not prepared:
            problem: str | None = None
            if env.is_main and (site is None or site.index == 0):
                try:
                    prepare_finetune(cfg, resume=resume)
                except AtollError as exc:
                    problem = str(exc)
            problem = broadcast_object(problem)  # type: ignore[assignment]
            if problem:
                raise AtollError(problem)
        return _finetune(cfg, env=env, device=device, site=site, resume=resume, stop_after=stop_after, progress=progress or NullProgress())
    finally:
        destroy_process_group()


def stage_steps(cfg: FinetuneConfig, site: SiteInfo | None) -> int:
    """Steps a site runs: the same number of rounds everywhere, each of the site's own H."""
    if site is None or cfg.sync.strategy == "ddp":
        return cfg.train.steps
    rounds = max(1, cfg.train.steps // cfg.sync.inner_steps)
    return rounds * cfg.sync.inner_steps_for(site.name)


def _build_model(cfg: FinetuneConfig, *, resume: bool, device: torch.device) -> nn.Module:
    run_dir = cfg.run.path
    mcfg = model_config_of(Stage(run_dir, cfg.finetune.method))
    torch.manual_seed(cfg.run.seed)  # identical adapters (and fresh weights) on every rank
    model: nn.Module = Transformer(mcfg)
    if not resume:  # on resume the checkpoint holds every weight
        _, state = load_stage_state(cfg.finetune.parent, step=read_lineage(run_dir)["parent"]["fingerprint"].get("step"))
        model.load_state_dict(state)
    if cfg.finetune.method == "lora":
        model = apply_lora(model, cfg.finetune.lora)
    return model.to(device)


def _finetune(cfg: FinetuneConfig, *, env: DistEnv, device: torch.device, site: SiteInfo | None, resume: bool, stop_after: int | None, progress: ProgressSink) -> FinetuneResult:
    t = cfg.train
    run_dir = cfg.run.path
    own_dir = site_stage_dir(run_dir, site)
    writes_stage = env.is_main and (site is None or site.index == 0)
    total_steps = stage_steps(cfg, site)
    if resume and latest_checkpoint(own_dir) is None:
        raise AtollError(f"--resume: {own_dir} has no complete checkpoint: start without --resume")

    model = _build_model(cfg, resume=resume, device=device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = wrap_model(model, shard="ddp", device=device, env=env)
    optimizer = make_optimizer(model, t, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps=t.warmup_steps, total_steps=total_steps, min_ratio=t.min_lr_ratio))
    sync = sync_from_environ(TrainableParameters(model), cfg.sync, site) if site is not None else None

    train_set = ExampleSet(run_dir / DATA_DIR, "train")
    val_set = ExampleSet(run_dir / DATA_DIR, "validation")
    data_seed = cfg.run.seed if site is None else cfg.run.seed + 7919 * (site.index + 1)
    stream = ExampleStream(len(train_set), global_batch=t.global_batch, seed=data_seed)
    start, count = even_split(t.global_batch, env.world_size, env.rank)

    step = 0
    tokens_seen = 0
    if resume:
        ckpt = latest_checkpoint(own_dir)
        assert ckpt is not None
        meta = load_checkpoint(ckpt.path, model=model, optimizer=optimizer, env=env, device=device)
        scheduler.load_state_dict(meta["scheduler"])
        stream.load_state_dict(meta["data"])
        step, tokens_seen = int(meta["step"]), int(meta.get("tokens_seen", 0))
        if sync is not None:
            sync.load_state_dict(meta["rank_state"]["sync"])
        if env.is_main:
            log.info("resumed %s from step %d", own_dir, step)
    else:
        torch.manual_seed(cfg.run.seed + 1 + env.rank)  # LoRA dropout: same stream whatever set-up consumed

    metrics = MetricsWriter(own_dir, enabled=env.is_main, resume_step=step if resume else None)
    end = min(total_steps, stop_after) if stop_after is not None else total_steps
    eval_rows = t.eval_batches * t.global_batch
    if env.is_main:
        progress.start(total=total_steps, completed=step, description=site.name if site else cfg.run.name)
        log.info("%s fine-tuning: %s trainable of %s parameters; %d rank(s) on %s; %d rows of %d tokens", cfg.finetune.method, f"{trainable:,}", f"{sum(p.numel() for p in model.parameters()):,}", env.world_size, device.type, len(train_set), train_set.seq_len)

    val_loss: float | None = None

    def record_stage(status: str) -> None:
        if not writes_stage:
            return
        if cfg.finetune.method == "lora":
            save_adapter(model, cfg.finetune.lora, run_dir / ADAPTER_DIR, base_model=str(cfg.finetune.parent))
        lineage = read_lineage(run_dir)
        lineage.update(steps=step, tokens=tokens_seen, status=status, val_loss=val_loss, trainable_params=trainable)
        if sync is not None:
            lineage["wan"] = {"sites": site.num_sites if site else 1, "bytes_sent_by_first_site": int(sync.metrics()["wan_bytes_sent"]), "strategy": cfg.sync.strategy, "codec": cfg.sync.codec}
        write_lineage(run_dir, lineage)

    def checkpoint() -> None:
        save_checkpoint(
            own_dir,
            step=step,
            model=model,
            optimizer=optimizer,
            extra={"scheduler": scheduler.state_dict(), "data": stream.state_dict(), "tokens_seen": tokens_seen},
            env=env,
            device=device,
            keep=t.keep_checkpoints,
            rank_state={"sync": sync.state_dict()} if sync is not None else None,
        )
        record_stage("finished" if step == total_steps else "running")

    speeds: list[float] = []
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        while step < end:
            t0 = time.perf_counter()
            indices = stream.next_indices()[start : start + count]
            tokens, mask = train_set.gather(indices)
            (global_targets,) = all_reduce_sum([float(mask.sum())], device=device)
            scale = env.world_size / max(global_targets, 1.0)
            loss_sum = 0.0
            chunks = list(zip(tokens.split(t.micro_batch), mask.split(t.micro_batch)))
            for i, (tok, msk) in enumerate(chunks):
                with _no_sync(model, skip=i < len(chunks) - 1):
                    loss = masked_loss_sum(model, tok, msk, device=device, dtype=cfg.parallel.dtype)
                    (loss * scale).backward()
                loss_sum += loss.item()
            committed = True
            if sync is not None and cfg.sync.strategy == "ddp":
                committed = sync.reduce_gradients(tokens=int(global_targets))
            if t.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
            else:
                grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            lr = optimizer.param_groups[0]["lr"]
            if committed:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(global_targets)
            if sync is not None:
                sync.after_step(step, tokens=int(global_targets))
                if step == total_steps:
                    sync.finish(step)
            elapsed = time.perf_counter() - t0
            speeds.append(t.global_batch * train_set.seq_len / elapsed)
            if step % t.log_every == 0 or step == end:
                (total,) = all_reduce_sum([loss_sum], device=device)
                train_loss = total / max(global_targets, 1.0)
                rec: dict[str, Any] = {"loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": speeds[-1], "tokens_seen": tokens_seen, "step_seconds": elapsed}
                if sync is not None:
                    rec.update(sync.metrics())
                metrics.log(step, rec)
                if env.is_main:
                    progress.update(completed=step, loss=train_loss, tokens_per_s=statistics.median(speeds[-20:]))
            if (t.eval_every and step % t.eval_every == 0) or step == total_steps:
                val_loss = evaluate_split(model, val_set, max_rows=eval_rows, micro_batch=t.micro_batch, env=env, device=device, dtype=cfg.parallel.dtype)
                metrics.log(step, {"val_loss": val_loss})
                if env.is_main:
                    log.info("step %d: held-out loss %.4f", step, val_loss)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == end:
                checkpoint()
        if sync is not None and step == total_steps:  # every site must now hold the same adapters
            metrics.log(step, {"trainable_checksum": param_checksum(TrainableParameters(model)), "wan_bytes_sent": int(sync.metrics()["wan_bytes_sent"])})
    finally:
        if env.is_main:
            progress.stop()
        metrics.close()
        if sync is not None:
            sync.close()
    return FinetuneResult(
        run_dir=run_dir,
        method=cfg.finetune.method,
        step=step,
        total_steps=total_steps,
        val_loss=val_loss,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        tokens_seen=tokens_seen,
        trainable_params=trainable,
        wan_bytes_sent=int(sync.metrics()["wan_bytes_sent"]) if sync is not None else None,
    )
