"""torchft's own `DiLoCo`, plain or streaming, driven directly on atoll's setup: the peer of bench/wan.py.

One process per rank of every site, started by atoll's multi-site launcher like `atoll.train`
ranks (same environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT of the site's store, ATOLL_SITE,
ATOLL_SITE_INDEX, ATOLL_NUM_SITES, ATOLL_SITE_ADDR, ATOLL_TOPOLOGY, ATOLL_WAN_MODE,
TORCHFT_LIGHTHOUSE, ATOLL_PROCS_ON_HOST):

    python bench/torchft_peer.py CONFIG.yaml [--section.key=value ...]
    launch_sites([CONFIG, *overrides], ..., module="bench.torchft_peer")  # cwd or PYTHONPATH: the repo root

It trains what atoll's `diloco` or `streaming` strategy trains for the same config: the same model
(preset + the data's vocabulary, seeded with run.seed), the same per-site data streams (seed
run.seed + 7919 * (site_index + 1)), the same AdamW + warm-up/cosine inner optimizer, clipping,
H = sync.inner_steps inner steps per round, the same number of rounds, outer SGD (outer_lr,
outer_momentum, nesterov), the same validation batches. The outer loop is torchft 0.2.0's
`torchft.local_sgd.DiLoCo` on a torchft `Manager` + `ProcessGroupGloo` per rank (one replica
group per site), not atoll's engine. With `sync.strategy=streaming` it is torchft's streaming
DiLoCo: atoll's `sync.fragments` fragments (the same layers in each, `split_fragments`), one
synced every H / fragments steps in turn, each allreduce overlapping `sync.overlap_steps` (tau)
inner steps (`fragment_sync_delay`), then the global fragment taken as it is
(`fragment_update_alpha` 0; atoll keeps the tau steps' local progress on top of it). torchft
needs H divisible by the fragments and tau below H / fragments. Differences that are torchft's,
not this script's: every rank of a site exchanges the whole model (no sharded exchange), fp32
pseudo-gradients (no codec: torchft quantizes only on CUDA with Triton), an unweighted mean over
sites.

The WAN: in the netns lab the kernel shapes bandwidth; elsewhere torchft's traffic is not shaped,
so the manager's allreduce is wrapped to count bytes ((M-1) x tensor bytes per allreduce, as
atoll's transport counts its all-gathers) and to pay `WanModel(topology, ATOLL_WAN_MODE)` exactly
as atoll's `TorchftTransport` does: the emulated cost minus the time the round's quorum and
allreduce already took, or (netns) the added latency.

Rank 0 of each site writes RUN_DIR/sites/SITE/metrics.jsonl in the trainer's format. Exit code 0
on success, 2 for a configuration mistake (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import re
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run as a script from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from atoll.config import RunConfig, load_config  # noqa: E402
from atoll.config.topology import load_topology  # noqa: E402
from atoll.data import BatchStream, TokenDataset, even_split  # noqa: E402
from atoll.errors import AtollError  # noqa: E402
from atoll.model.loss import token_loss_sum  # noqa: E402
from atoll.parallel.dist import (  # noqa: E402
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    destroy_process_group,
    dist_env_from_environ,
    init_process_group,
    pick_device,
    set_cpu_threads,
    wrap_model,
)
from atoll.report.metrics import MetricsWriter  # noqa: E402
from atoll.rundir.layout import read_model_json  # noqa: E402
from atoll.sync.site_env import SiteEnv  # noqa: E402
from atoll.sync.tensors import param_checksum  # noqa: E402
from atoll.sync.transport import ByteCounter, SiteInfo, WanModel  # noqa: E402
from atoll.train.loop import make_optimizer, site_steps  # noqa: E402
from atoll.train.schedule import warmup_cosine  # noqa: E402
from atoll.train.setup import prepare_run, site_config  # noqa: E402
from atoll.train.trainer import build_model, evaluate, init_weights_from  # noqa: E402

log = logging.getLogger("atoll.bench.torchft_peer")

EXIT_USER_ERROR = 2


# ---------------------------------------------------------------- the WAN around torchft's allreduce


def make_wan_manager(wan: WanModel, **manager_kwargs: Any) -> Any:
    """A torchft `Manager` whose allreduces are counted and pay the modelled WAN (see module doc)."""
    from torch.distributed.distributed_c10d import ReduceOp
    from torchft import Manager

    class WanManager(Manager):
        def __init__(self) -> None:
            super().__init__(**manager_kwargs)
            self.wan = wan
            self.counter = ByteCounter()
            self.round_start: float | None = None

        def start_quorum(self, *args: Any, **kwargs: Any) -> None:
            # atoll's transport times an exchange from its quorum: the same accounting here.
            self.round_start = time.perf_counter()
            super().start_quorum(*args, **kwargs)

        def allreduce(
            self, tensor: torch.Tensor, should_quantize: bool = False, reduce_op: ReduceOp = ReduceOp.AVG
        ) -> Any:
            t0 = self.round_start if self.round_start is not None else time.perf_counter()
            self.round_start = None
            work = super().allreduce(tensor, should_quantize=should_quantize, reduce_op=reduce_op)
            if self.errored():  # torchft returned a no-op work: nothing crossed the WAN
                return work
            return _WanWork(
                self, work, nbytes=tensor.numel() * tensor.element_size(), sites=self.num_participants(), t0=t0
            )

    return WanManager()


class _WanWork(dist._Work):  # type: ignore[misc,name-defined]
    """torchft's work, plus the WAN's cost and byte count when it is waited for."""

    def __init__(self, manager: Any, work: Any, *, nbytes: int, sites: int, t0: float) -> None:
        super().__init__()
        self._manager = manager
        self._work = work
        self._nbytes = nbytes
        self._sites = sites
        self._t0 = t0
        self._paid = False

    def wait(self, timeout: timedelta | None = None) -> bool:
        ok = bool(self._work.wait(timeout)) if timeout is not None else bool(self._work.wait())
        if ok and not self._paid and self._manager.errored() is None:
            self._paid = True
            wan: WanModel = self._manager.wan
            extra = wan.extra_seconds(self._nbytes, num_sites=self._sites)
            elapsed = time.perf_counter() - self._t0
            if wan.mode == "emulated":
                time.sleep(max(0.0, extra - elapsed))
            elif extra > 0:  # netns: the kernel shapes bandwidth; latency is added here
                time.sleep(extra)
            volume = self._nbytes * (self._sites - 1)
            self._manager.counter.add(sent=volume, received=volume, seconds=time.perf_counter() - self._t0)
        return ok

    def get_future(self) -> Any:
        return self._work.get_future()

    def synchronize(self) -> None:
        self._work.synchronize()

    def block_current_stream(self, timeout: timedelta | None = None) -> None:
        self._work.block_current_stream()


# ---------------------------------------------------------------- one rank


class _SyncTimer:
    """Splits `optimizer.step()` into AdamW's update and the DiLoCo sync its post-hook runs.

    Registered on the inner optimizer before DiLoCo's hooks, so it runs first.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.update_done = 0.0
        self.handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.update_done = time.perf_counter()


def _no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager[None]:
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()  # type: ignore[operator]


def params_sha256(model: nn.Module) -> str:
    """A digest of every parameter's bytes: equal on two sites only if their parameters are bitwise equal."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check(cfg: RunConfig, site: SiteInfo, env: DistEnv) -> None:
    s = cfg.sync
    if s.round_seconds is not None:
        raise AtollError(
            "sync.round_seconds has no equivalent in torchft's DiLoCo (it syncs every sync_every steps): "
            "unset it for the peer"
        )
    if cfg.parallel.shard != "ddp":
        raise AtollError("the torchft peer replicates the model inside a site: use parallel.shard=ddp")
    if s.strategy not in ("diloco", "streaming"):
        raise AtollError(
            f"sync.strategy={s.strategy}: the torchft peer runs torchft's DiLoCo (diloco) or its streaming "
            "DiLoCo (streaming); set one of them"
        )
    if s.strategy == "streaming":
        frags = s.fragments
        if s.inner_steps % frags != 0 or s.overlap_steps >= s.inner_steps // frags:
            raise AtollError(
                f"torchft's streaming DiLoCo needs sync.inner_steps ({s.inner_steps}) divisible by sync.fragments "
                f"({frags}) and sync.overlap_steps ({s.overlap_steps}) below inner_steps / fragments: change them"
            )
    if env.is_main and s.codec != "none":
        log.info("site %s: sync.codec=%s is atoll's; the peer exchanges fp32", site.name, s.codec)
    if env.is_main and s.site_inner_steps:
        log.warning(
            "sync.site_inner_steps: torchft averages the sites' pseudo-gradients unweighted "
            "(atoll weights them by tokens)"
        )


def model_fragments(model: nn.Module, num_fragments: int) -> list[nn.Module]:
    """atoll's streaming fragments (`split_fragments`, sequential) as modules for torchft's DiLoCo:
    each holds the decoder layers (and the embedding, final norm and head) its fragment names, so
    both systems exchange the same parameters at each fragment's turn."""
    from atoll.sync.fragments import split_fragments

    names = [n for n, _ in model.named_parameters()]
    layers = len({m.group(1) for n in names if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", n))})
    out = []
    for frag in split_fragments(names, num_fragments=min(num_fragments, layers)):
        holder = nn.Module()
        for path in dict.fromkeys(_module_path(n) for n in frag):
            holder.add_module(path.replace(".", "_"), model.get_submodule(path))
        out.append(holder)
    return out


def _module_path(name: str) -> str:
    """The module a parameter belongs to at fragment granularity: `layers.N` or a top-level module."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def _prepare(cfg: RunConfig, env: DistEnv) -> None:
    """The site's main rank checks the data and writes the run directory (as the trainer does)."""
    problem: str | None = None
    if env.is_main:
        try:
            prepare_run(cfg, resume=False)
            (cfg.run.path / "metrics.jsonl").unlink(missing_ok=True)  # no resume: a rerun starts a fresh record
        except AtollError as exc:
            problem = str(exc)
    problem = broadcast_object(problem)  # type: ignore[assignment]
    if problem:
        raise AtollError(problem)


def run_peer(cfg: RunConfig) -> float | None:
    """Train this rank of its site with torchft's DiLoCo; returns the final validation loss."""
    env = dist_env_from_environ()
    site_env = SiteEnv.from_environ()
    site = site_env.site_info(local_rank=env.local_rank, local_world_size=env.local_world_size) if site_env else None
    if site is None or "MASTER_PORT" not in os.environ:
        raise AtollError(
            "run the torchft peer under atoll's multi-site launcher (atoll.sync.launch.launch_sites): "
            "ATOLL_SITE, TORCHFT_LIGHTHOUSE and MASTER_PORT are not set"
        )
    cfg = site_config(cfg, site.name)
    _check(cfg, site, env)
    device = pick_device(cfg.parallel.device, env)
    if device.type != "cpu":
        raise AtollError(
            "the torchft peer runs on the CPU (gloo, no pinned memory): "
            "set --parallel.device=cpu for it and for atoll's runs it is compared with"
        )
    set_cpu_threads(cfg.parallel.threads, env)
    store = None
    if env.world_size > 1:
        init_process_group(env, device=device, backend="gloo", timeout_seconds=cfg.parallel.timeout_seconds)
    else:  # no process group in a one-rank site, but torchft's Manager needs the site's TCPStore
        store = dist.TCPStore(
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ["MASTER_PORT"]),
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=cfg.parallel.timeout_seconds),
        )
    try:
        return _train(cfg, env=env, site=site, device=device)
    finally:
        destroy_process_group()
        del store


def _train(cfg: RunConfig, *, env: DistEnv, site: SiteInfo, device: torch.device) -> float | None:
    from torchft.local_sgd import DiLoCo
    from torchft.process_group import ProcessGroupGloo

    t = cfg.train
    _prepare(cfg, env)
    mcfg = read_model_json(cfg.run.path)
    total_steps = site_steps(cfg.train.steps, cfg.sync, site.name)  # rounds x H, as atoll's diloco
    H = cfg.sync.inner_steps_for(site.name)
    site_env = SiteEnv.from_environ()
    assert site_env is not None  # run_peer checked
    topology = load_topology(site_env.topology)
    slowdown = max(d.slowdown for d in topology.site(site.name).devices)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank of every site
    model = build_model(mcfg, device=device)
    if cfg.model.init_from is not None:
        init_weights_from(model, cfg.model.init_from)
    net = wrap_model(model, shard="ddp", device=device, env=env)  # DDP inside the site when it has several ranks
    optimizer = make_optimizer(net, cfg.train, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, warmup_steps=t.warmup_steps, total_steps=total_steps, min_ratio=t.min_lr_ratio),
    )
    timer = _SyncTimer(optimizer)  # before DiLoCo's hooks

    s = cfg.sync
    timeout = timedelta(seconds=s.timeout_seconds)
    pg = ProcessGroupGloo(timeout=timeout)
    manager = make_wan_manager(
        WanModel(topology, mode=site_env.wan_mode),
        pg=pg,
        load_state_dict=None,
        state_dict=None,
        min_replica_size=s.min_sites or site.num_sites,
        use_async_quorum=False,  # DiLoCo demands it
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=timedelta(seconds=max(60.0, s.timeout_seconds / 10)),
        rank=env.rank,
        world_size=env.world_size,
        store_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        store_port=int(os.environ["MASTER_PORT"]),
        lighthouse_addr=site_env.lighthouse,
        replica_id=site.name,
        hostname=site_env.address,
        init_sync=False,  # every site seeds its weights identically
    )
    nesterov = s.nesterov and s.outer_momentum > 0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    streaming = s.strategy == "streaming"
    fragments = model_fragments(model, s.fragments) if streaming else [model]
    # One outer SGD per fragment (torchft steps a fragment's optimizer at its turn; momentum stays per fragment).
    outers = [
        torch.optim.SGD(f.parameters(), lr=s.outer_lr, momentum=s.outer_momentum, nesterov=nesterov) for f in fragments
    ]
    diloco = DiLoCo(
        manager,
        fragments,
        optimizer,
        outers if streaming else outers[0],
        sync_every=H,
        backup_device=torch.device("cpu"),
        pin_memory=False,  # no CUDA
        # One flat allreduce per round (atoll sends one payload per round), in a bucket that holds
        # the whole model: 0.2.0's bucketing skips tensors when a model spans several buckets.
        use_bucketization=True,
        bucket_cap_mb=model_bytes / 2**20 + 1,
        # Streaming: a fragment's allreduce overlaps tau inner steps (atoll's overlap_steps); alpha 0,
        # torchft's default, takes the global fragment as it is (atoll adds the tau steps' progress on top).
        fragment_sync_delay=s.overlap_steps if streaming else 0,
        fragment_update_alpha=0.0,
    )
    syncs_per_round = len(fragments)

    train_ds = TokenDataset(cfg.data.dir, "train", seq_len=cfg.data.seq_len)
    val_ds = TokenDataset(cfg.data.dir, "validation", seq_len=cfg.data.seq_len)
    start, count = even_split(t.global_batch, env.world_size, env.rank)
    stream = BatchStream(
        train_ds,
        global_batch=t.global_batch,
        seed=cfg.run.seed + 7919 * (site.index + 1),
        rank_start=start,
        rank_count=count,
    )
    global_tokens = t.global_batch * cfg.data.seq_len
    torch.manual_seed(cfg.run.seed + 1 + env.rank)  # as the trainer, after set-up

    metrics = MetricsWriter(cfg.run.path, enabled=env.is_main)
    if env.is_main:
        log.info(
            "site %s: torchft %s DiLoCo, %d fragment(s), model %.2fM parameters, %d rank(s), H=%d, %d steps, WAN %s",
            site.name,
            "streaming" if streaming else "plain",
            len(fragments),
            mcfg.num_params() / 1e6,
            env.world_size,
            H,
            total_steps,
            manager.wan.mode,
        )
    step = tokens_seen = 0
    val_loss: float | None = None
    compute_seconds = sync_seconds = 0.0
    site_sent = 0  # bytes the site's ranks sent, summed at each record
    speeds: list[float] = []
    net.train()
    wall_start = time.perf_counter()
    try:
        with diloco:
            while step < total_steps:
                t0 = time.perf_counter()
                chunks = stream.next_batch().split(t.micro_batch)
                loss_sum = 0.0
                for i, chunk in enumerate(chunks):
                    with _no_sync(net, i < len(chunks) - 1):
                        loss, _ = token_loss_sum(net, chunk, device=device, dtype=cfg.parallel.dtype)
                        (loss * (env.world_size / global_tokens)).backward()
                    loss_sum += loss.item()
                compute = time.perf_counter() - t0
                if slowdown > 1.0:  # emulate a slower chip, as the trainer does
                    time.sleep((slowdown - 1.0) * compute)
                    compute *= slowdown
                t1 = time.perf_counter()
                if t.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip))
                else:
                    grad_norm = float(
                        torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])
                    )
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()  # AdamW; every H steps torchft's post-hook runs the outer sync
                t2 = time.perf_counter()
                sync_seconds += t2 - timer.update_done
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                compute += (timer.update_done - t1) + (time.perf_counter() - t2)
                compute_seconds += compute
                step += 1
                tokens_seen += global_tokens
                elapsed = time.perf_counter() - t0
                speeds.append(global_tokens / elapsed)

                if step % t.log_every == 0 or step == total_steps:
                    c = manager.counter
                    total, sent, received = all_reduce_sum([loss_sum, float(c.sent), float(c.received)], device=device)
                    site_sent = int(sent)
                    wall = time.perf_counter() - wall_start
                    train_loss = total / global_tokens
                    metrics.log(step, {
                        "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                        "tokens_per_s": global_tokens / elapsed, "tokens_seen": tokens_seen, "step_seconds": elapsed,
                        "wan_bytes_sent": int(sent), "wan_bytes_received": int(received),
                        "wan_exchanges": c.exchanges, "wan_seconds": c.seconds,
                        "wan_failed": step * syncs_per_round // H - manager.current_step(),
                        "sync_wait_seconds": sync_seconds, "sync_rejected": 0,
                        "compute_seconds": compute_seconds, "wall_seconds": wall,
                        "compute_utilization": compute_seconds / wall, "params_checksum": param_checksum(model),
                    })  # fmt: skip
                if (t.eval_every and step % t.eval_every == 0) or step == total_steps:
                    val_loss = evaluate(net, val_ds, cfg, env=env, device=device)
                    metrics.log(step, {"val_loss": val_loss})
                    if env.is_main:
                        log.info("site %s step %d: validation loss %.4f", site.name, step, val_loss)
        metrics.log(
            step,
            {
                "torchft_commits": manager.current_step(),
                "params_checksum": param_checksum(model),
                "params_sha256": params_sha256(model),
            },
        )
        if env.is_main and speeds:
            log.info(
                "site %s: done, %d outer rounds committed, %.2f MB sent over the WAN, %.0f tokens/s (median)",
                site.name,
                manager.current_step(),
                site_sent / 1e6,
                statistics.median(speeds),
            )
    finally:
        metrics.close()
        timer.handle.remove()
        manager.shutdown(wait=False)
    return val_loss


# ---------------------------------------------------------------- entry


def _setup_logging(rank: int, site: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[torchft-peer {site} rank {rank}] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("atoll").setLevel(logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING))
    logging.getLogger("torchft").setLevel(logging.ERROR)  # per-quorum chatter and CUDA-only warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/torchft_peer.py", description="One rank of torchft's DiLoCo on atoll's multi-site setup."
    )
    parser.add_argument("config", type=Path, help="run config YAML (the one atoll's runs use)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--no-progress", action="store_true", help="accepted for the launcher's sake: the peer draws no progress bar"
    )
    args, extra = parser.parse_known_args(argv)
    _setup_logging(int(os.environ.get("RANK", "0")), os.environ.get("ATOLL_SITE", "?"), args.verbose)
    try:
        cfg = load_config(RunConfig, args.config, extra)
        val = run_peer(cfg)
    except AtollError as exc:
        print(f"torchft_peer: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0 if val is None or math.isfinite(val) else 1


if __name__ == "__main__":
    sys.exit(main())
