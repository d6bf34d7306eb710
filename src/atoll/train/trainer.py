"""The pre-training loop of one site: AdamW, warm-up + cosine, clipping, accumulation, eval, checkpoints.

Run by every rank (``python -m atoll.train`` under torchrun or `atoll.parallel.launch`). The
global batch of each step is fixed by the data stream, independent of the number of ranks; each
rank's loss is weighted by its share of the step's tokens, so the averaged gradient equals the
global-batch mean exactly whatever the split.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from atoll.config import RunConfig
from atoll.config.topology import load_topology
from atoll.data import BatchStream, TokenDataset, even_split, eval_batches
from atoll.errors import AtollError
from atoll.model import ModelConfig, Transformer
from atoll.model.hf import load_hf_model
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
from atoll.sync.engine import CrossSiteSync, param_checksum, sync_from_environ
from atoll.sync.transport import SiteInfo
from atoll.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from atoll.train.schedule import warmup_cosine
from atoll.train.setup import classify_init, prepare_run, read_model_json, site_config

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


def build_model(mcfg: ModelConfig, *, device: torch.device) -> Transformer:
    model = Transformer(mcfg)
    model.init_weights()
    return model.to(device)


def init_weights_from(model: Transformer, source: Path) -> None:
    """Overwrite fresh weights with a Hugging Face model's or an atoll run's."""
    src = classify_init(source)
    if src.kind == "hf":
        _, state = load_hf_model(source)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise AtollError(f"weights in {source} do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    else:
        ckpt = latest_checkpoint(source)
        if ckpt is None:
            raise AtollError(f"model.init_from {source} has no complete checkpoint: train it first")
        load_model_weights(ckpt.path, model)


def make_optimizer(model: nn.Module, cfg: RunConfig, *, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases (1-D parameters) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        fused=device.type == "cuda",
    )


def _no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not skip_sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def fsdp_no_sync() -> Iterator[None]:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def token_loss_sum(model: nn.Module, batch: torch.Tensor, *, device: torch.device, dtype: str) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a (B, T+1) batch, and the number of predicted tokens."""
    x = batch[:, :-1].to(device, non_blocking=True)
    y = batch[:, 1:].to(device, non_blocking=True)
    with _autocast(device, dtype):
        logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
    return loss, y.numel()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TokenDataset, cfg: RunConfig, *, env: DistEnv, device: torch.device) -> float:
    """Mean validation loss over fixed batches, summed over the site's ranks."""
    model.eval()
    total, count = 0.0, 0
    start, count_here = even_split(cfg.train.global_batch, env.world_size, env.rank)
    batches = eval_batches(dataset, global_batch=cfg.train.global_batch, max_batches=cfg.train.eval_batches, rank_start=start, rank_count=count_here)
    for batch in batches:
        for chunk in batch.split(cfg.train.micro_batch):
            loss, n = token_loss_sum(model, chunk, device=device, dtype=cfg.parallel.dtype)
            total += loss.item()
            count += n
    model.train()
    total, count = all_reduce_sum([total, float(count)], device=device)
    return total / max(count, 1.0)


def run_training(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None, progress: ProgressSink | None = None) -> TrainResult:
    """Train to `cfg.train.steps` (or `stop_after`, writing a checkpoint there); collective over the site.

    Raises AtollError for a user's mistake, on every rank alike.
    """
    env = dist_env_from_environ()
    site = site_from_environ(env)
    if site is not None:
        cfg = site_config(cfg, site.name)
    device = pick_device(cfg.parallel.device, env)
    if device.type == "cpu":
        set_cpu_threads(cfg.parallel.threads, env)
    init_process_group(env, device=device, backend=pick_backend(cfg.parallel.backend, device), timeout_seconds=cfg.parallel.timeout_seconds)
    try:
        return _train(cfg, env=env, device=device, site=site, resume=resume, stop_after=stop_after, progress=progress or NullProgress())
    finally:
        destroy_process_group()


def _prepare_everywhere(cfg: RunConfig, *, env: DistEnv, resume: bool) -> ModelConfig:
    """The main rank checks and writes the run directory; the others learn the outcome."""
    problem: str | None = None
    if env.is_main:
        try:
            prepare_run(cfg, resume=resume)
        except AtollError as exc:
            problem = str(exc)
    problem = broadcast_object(problem)  # type: ignore[assignment]
    if problem:
        raise AtollError(problem)
    return read_model_json(cfg.run.path)


def site_from_environ(env: DistEnv) -> SiteInfo | None:
    """This rank's site, when the multi-site launcher started it (ATOLL_SITE and friends)."""
    if "ATOLL_SITE" not in os.environ:
        return None
    return SiteInfo(
        name=os.environ["ATOLL_SITE"],
        index=int(os.environ["ATOLL_SITE_INDEX"]),
        num_sites=int(os.environ["ATOLL_NUM_SITES"]),
        local_rank=env.local_rank,
        local_world_size=env.local_world_size,
    )


def _make_sync(cfg: RunConfig, model: nn.Module, site: SiteInfo) -> tuple[CrossSiteSync, float]:
    """The cross-site half of the step, and the site's emulated slowdown factor."""
    topology = load_topology(Path(os.environ["ATOLL_TOPOLOGY"]))
    slowdown = max(d.slowdown for d in topology.site(site.name).devices)
    return sync_from_environ(model, cfg.sync, site), slowdown


def site_steps(cfg: RunConfig, site: str | None) -> int:
    """Inner steps a site runs: the same number of rounds everywhere, each of the site's own H."""
    if site is None or cfg.sync.strategy == "ddp":
        return cfg.train.steps
    rounds = max(1, cfg.train.steps // cfg.sync.inner_steps)
    return rounds * cfg.sync.inner_steps_for(site)


def _train(cfg: RunConfig, *, env: DistEnv, device: torch.device, site: SiteInfo | None, resume: bool, stop_after: int | None, progress: ProgressSink) -> TrainResult:
    t = cfg.train
    run_dir = cfg.run.path
    mcfg = _prepare_everywhere(cfg, env=env, resume=resume)
    total_steps = site_steps(cfg, site.name if site else None)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(mcfg, device=device)
    if cfg.model.init_from is not None and not resume:
        init_weights_from(model, cfg.model.init_from)
    model = wrap_model(model, shard=cfg.parallel.shard, device=device, env=env)
    optimizer = make_optimizer(model, cfg, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=t.warmup_steps, total_steps=total_steps, min_ratio=t.min_lr_ratio)
    )
    # Each site trains on its own stream: the shards the data's placement gives it (all of them
    # without a site map), in an order of its own. Validation is the whole held-out split on
    # every site, so that the sites' losses measure the one model on the same data.
    train_ds = TokenDataset(cfg.data.dir, "train", seq_len=cfg.data.seq_len, site=site.name if site else None)
    val_ds = TokenDataset(cfg.data.dir, "validation", seq_len=cfg.data.seq_len)
    start, count = even_split(t.global_batch, env.world_size, env.rank)
    stream = BatchStream(train_ds, global_batch=t.global_batch, seed=cfg.run.seed, rank_start=start, rank_count=count)

    sync: CrossSiteSync | None = None
    slowdown = 1.0
    if site is not None:
        sync, slowdown = _make_sync(cfg, model, site)
    global_tokens = t.global_batch * cfg.data.seq_len

    step = 0
    tokens_seen = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        assert ckpt is not None  # prepare_run checked
        meta = load_checkpoint(ckpt.path, model=model, optimizer=optimizer, env=env, device=device)
        scheduler.load_state_dict(meta["scheduler"])
        stream.load_state_dict(meta["data"])
        step = int(meta["step"])
        tokens_seen = int(meta.get("tokens_seen", 0))
        if sync is not None:
            sync.load_state_dict(meta["rank_state"]["sync"])
        if env.is_main:
            log.info("resumed %s from step %d", run_dir, step)
    else:
        # Seed again so the RNG stream after set-up does not depend on what set-up consumed.
        torch.manual_seed(cfg.run.seed + 1 + env.rank)

    metrics = MetricsWriter(run_dir, enabled=env.is_main, resume_step=step if resume else None)
    end = min(total_steps, stop_after) if stop_after is not None else total_steps
    if env.is_main:
        progress.start(total=total_steps, completed=step, description=site.name if site else cfg.run.name)
        log.info("model %s: %.2fM parameters; %d rank(s) on %s; global batch %d x %d tokens", cfg.model.preset or "init", mcfg.num_params() / 1e6, env.world_size, device.type, t.global_batch, cfg.data.seq_len)
        if site is not None:
            log.info("site %s reads %d train shard(s), %s tokens", site.name, len(train_ds.shards), f"{train_ds.num_tokens:,}")
    if site is not None and not resume:  # which data this site trained on, for reports and tests
        metrics.log(step, {"train_shards": [s.file for s in train_ds.shards], "train_tokens": train_ds.num_tokens})

    def checkpoint() -> None:
        save_checkpoint(
            run_dir,
            step=step,
            model=model,
            optimizer=optimizer,
            extra={"scheduler": scheduler.state_dict(), "data": stream.state_dict(), "tokens_seen": tokens_seen},
            env=env,
            device=device,
            keep=t.keep_checkpoints,
            rank_state={"sync": sync.state_dict()} if sync is not None else None,
        )

    speeds: list[float] = []
    val_loss: float | None = None
    compute_seconds = 0.0
    wall_start = time.perf_counter()
    model.train()
    try:
        while step < end:
            t0 = time.perf_counter()
            batch = stream.next_batch()
            chunks = batch.split(t.micro_batch)
            loss_sum = 0.0
            for i, chunk in enumerate(chunks):
                with _no_sync(model, skip_sync=i < len(chunks) - 1):
                    loss, _ = token_loss_sum(model, chunk, device=device, dtype=cfg.parallel.dtype)
                    (loss * (env.world_size / global_tokens)).backward()
                loss_sum += loss.item()
            compute = time.perf_counter() - t0
            if slowdown > 1.0:  # emulate a slower chip: compute, then sleep
                time.sleep((slowdown - 1.0) * compute)
                compute *= slowdown
            committed = True
            if sync is not None and cfg.sync.strategy == "ddp":
                committed = sync.reduce_gradients(tokens=global_tokens)
            t1 = time.perf_counter()
            if t.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
            else:
                grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
            lr = optimizer.param_groups[0]["lr"]
            if committed:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            compute += time.perf_counter() - t1
            compute_seconds += compute
            step += 1
            tokens_seen += global_tokens
            if sync is not None:
                sync.after_step(step, tokens=global_tokens)
                if step == total_steps:
                    sync.finish(step)
            elapsed = time.perf_counter() - t0
            tps = global_tokens / elapsed
            speeds.append(tps)

            if step % t.log_every == 0 or step == end:
                (total,) = all_reduce_sum([loss_sum], device=device)
                train_loss = total / global_tokens
                record = {"loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "tokens_seen": tokens_seen, "step_seconds": elapsed}
                if sync is not None:
                    wall = time.perf_counter() - wall_start
                    record.update(sync.metrics())
                    # Each rank sends only the parameters it owns: the site's traffic is the sum.
                    sent, received = all_reduce_sum([record["wan_bytes_sent"], record["wan_bytes_received"]], device=device)
                    record.update(wan_bytes_sent=int(sent), wan_bytes_received=int(received))
                    record.update({"compute_seconds": compute_seconds, "wall_seconds": wall, "compute_utilization": compute_seconds / wall, "params_checksum": param_checksum(model)})
                metrics.log(step, record)
                if env.is_main:
                    progress.update(completed=step, loss=train_loss, tokens_per_s=statistics.median(speeds[-20:]))
            if (t.eval_every and step % t.eval_every == 0) or step == total_steps:
                val_loss = evaluate(model, val_ds, cfg, env=env, device=device)
                metrics.log(step, {"val_loss": val_loss})
                if env.is_main:
                    log.info("step %d: validation loss %.4f", step, val_loss)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == end:
                checkpoint()
        if sync is not None and step == total_steps:
            metrics.log(step, {"sync_applied": sync.applied_log, "params_checksum": param_checksum(model)})
    finally:
        if env.is_main:
            progress.stop()
        metrics.close()
        if sync is not None:
            sync.close()
    return TrainResult(
        run_dir=run_dir,
        step=step,
        val_loss=val_loss,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        tokens_seen=tokens_seen,
        stopped_early=step < total_steps,
    )
