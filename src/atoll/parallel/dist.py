"""Intra-site process groups: who am I, which device, how the model is replicated or sharded.

A site's ranks are started by `torchrun` or by `atoll.parallel.launch`; both set RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A process started without
them is a single rank with no process group at all.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from atoll.errors import AtollError
from atoll.parallel.compiled import compile_blocks
from atoll.parallel.layout import Layout
from atoll.parallel.recompute import apply_recompute

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in its site."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # True when a launcher set the environment (a process group is used)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env_from_environ() -> DistEnv:
    """Read the launcher's environment variables; a bare process is rank 0 of 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    world = int(os.environ["WORLD_SIZE"])
    return DistEnv(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        launched=True,
    )


# A device catalog's collective backend -> the torch device type its chips appear as.
BACKEND_DEVICE = {"nccl": "cuda", "hccl": "npu", "gloo": "cpu"}
NPU_PACKAGE = "torch_npu"


def npu_available() -> bool:
    """Whether Ascend NPUs can be used: `torch_npu` imports (it registers torch.npu) and sees one."""
    try:
        import torch_npu  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


def pick_device(requested: str, env: DistEnv, *, site_backend: str | None = None) -> torch.device:
    """This rank's device. `auto` follows the site's devices (`site_backend`, from the catalog:
    nccl -> CUDA, hccl -> an Ascend NPU through torch_npu, gloo -> the CPU) when this machine has
    them, else the CPU (a lab run of a topology on CPUs); without a site, CUDA when present.

    Raises `AtollError` for `npu` without torch_npu (naming the package) or `cuda` without CUDA.
    """
    if requested == "auto":
        wanted = BACKEND_DEVICE.get(site_backend or "", "cuda")
        if wanted == "npu" and npu_available():
            requested = "npu"
        elif wanted == "npu":
            log.warning(
                "the site's devices are Ascend NPUs but %s is not importable here: training on the CPU", NPU_PACKAGE
            )
            requested = "cpu"
        else:
            requested = "cuda" if wanted == "cuda" and torch.cuda.is_available() else "cpu"
    if requested == "npu":
        if not npu_available():
            raise AtollError(
                f"parallel.device is 'npu' but {NPU_PACKAGE} is not importable or sees no NPU: install "
                f"{NPU_PACKAGE} (Huawei's PyTorch adapter, matching this torch) and CANN, or use --parallel.device=cpu"
            )
        device = torch.device("npu", env.local_rank % torch.npu.device_count())  # type: ignore[attr-defined]
        torch.npu.set_device(device)  # type: ignore[attr-defined]
        return device
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise AtollError("parallel.device is 'cuda' but no CUDA device is visible: use --parallel.device=cpu")
    device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def inference_device(requested: str, *, threads: int = 0) -> torch.device:
    """The device of a single process that only runs the model (`atoll eval`, `generate`, `serve`).

    `requested` is the verbs' ``--device`` (auto, cpu or cuda); `threads` > 0 also sets the CPU
    threads torch uses. Raises `AtollError` for a negative `threads` or cuda without a CUDA device.
    """
    if threads < 0:
        raise AtollError("--threads must be 0 (torch's default) or positive")
    if threads:
        torch.set_num_threads(threads)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise AtollError("--device cuda but no CUDA device is visible: use --device cpu")
    return torch.device(requested)


def pick_backend(requested: str, device: torch.device) -> str:
    """The site's collective library: NCCL on CUDA, HCCL on Ascend NPUs, gloo on the CPU."""
    if requested == "auto":
        return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")
    wanted = {"nccl": "cuda", "hccl": "npu"}.get(requested)
    if wanted is not None and device.type != wanted:
        raise AtollError(
            f"parallel.backend is {requested!r} but the device is {device.type}: use --parallel.backend=auto"
        )
    return requested


def set_cpu_threads(requested: int, env: DistEnv) -> int:
    """Split the machine's cores between the processes on it unless the user chose a number.

    The processes are the site's local ranks, or every site's when a multi-site launcher runs
    several sites on one machine (ATOLL_PROCS_ON_HOST).
    """
    sharing = int(os.environ.get("ATOLL_PROCS_ON_HOST", env.local_world_size))
    threads = requested or max(1, (os.cpu_count() or 1) // sharing)
    torch.set_num_threads(threads)
    return threads


def init_process_group(env: DistEnv, *, device: torch.device, backend: str, timeout_seconds: float) -> None:
    """Join the site's process group (blocks until every rank has joined or the timeout)."""
    if not env.launched or dist.is_initialized():
        return
    dist.init_process_group(
        backend=backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_seconds),
        device_id=device if device.type == "cuda" else None,
    )
    log.debug("rank %d/%d joined a %s process group", env.rank, env.world_size, backend)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(
    model: nn.Module,
    *,
    device: torch.device,
    env: DistEnv,
    shard: str = "ddp",
    layout: Layout | None = None,
    mesh: DeviceMesh | None = None,
    compile: bool = False,
) -> nn.Module:
    """The model as the site's layout runs it; collective over the site.

    In order: tensor parallelism over ``mesh["tp"]`` (`atoll.parallel.tensor`), activation
    recompute (`atoll.parallel.recompute`), with `compile` each block compiled in place
    (`atoll.parallel.compiled`), then the data-parallel wrapping over the dp ranks:
    zero 0 replicates (DDP; with tp > 1 the model is left as is and the step runner averages the
    gradients over ``mesh["dp"]`` itself, since DDP does not take DTensor parameters), zero 1 and
    2 shard with FSDP2 (one unit per decoder layer) keeping parameters unsharded from forward to
    backward, zero 3 reshards after forward; with one replica (dp 1) there is nothing to shard
    over: zero is then read as 0. Without `layout`, `shard` (ddp or fsdp) on every rank
    of the site, as fine-tuning uses it. `mesh` is `atoll.parallel.layout.build_mesh`'s, needed
    when a replica spans ranks. With pipeline stages (pp > 1) only tensor parallelism and
    recompute are applied here: FSDP2 wraps each stage after the pipeline runner builds them.
    """
    if layout is None:
        layout = Layout(dp=env.world_size, zero=3 if shard == "fsdp" else 0)
    if layout.tp > 1:
        from atoll.parallel.tensor import parallelize

        assert mesh is not None, "tensor parallelism needs the site's mesh"
        parallelize(model, mesh["tp"], sequence_parallel=layout.sequence_parallel)
    apply_recompute(model, layout.recompute)
    if compile:
        compile_blocks(model, device)
    if not dist.is_initialized() or layout.pp > 1:
        # A pipeline stage's part is sharded per stage once its runner has built them
        # (`atoll.parallel.pipeline.shard_stages`); with zero 0 the runner averages over dp.
        return model
    dp_mesh = mesh["dp"] if mesh is not None else None
    if layout.zero > 0 and layout.dp > 1:
        from torch.distributed.fsdp import fully_shard

        reshard = layout.zero == 3
        for layer in getattr(model, "layers", []):
            fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
        return model
    if layout.split:
        return model  # replicas average their gradients in the step runner (zero 0), or dp is 1
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def average_gradients(params: list[nn.Parameter], *, group: dist.ProcessGroup, size: int) -> None:
    """Average the gradients' local tensors over `group` (`size` ranks) in one flat all-reduce:
    what DDP does, for parameters DDP cannot take (tensor-parallel DTensors). Blocks."""
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [_local(p.grad) for p in params]  # type: ignore[arg-type]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard


def all_reduce_sum(values: list[float], *, device: torch.device) -> list[float]:
    """Sum a few scalars over the site (identity without a process group)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, *, device: torch.device) -> float:
    """The largest of one scalar over the site (identity without a process group)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean_gradients(params: list[nn.Parameter], *, world_size: int) -> None:
    """Average the parameters' gradients over the site in one flat all-reduce, as DDP would (a
    rank whose loss missed a parameter adds zeros). Blocks; identity without a process group."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # type: ignore[union-attr]
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()  # type: ignore[union-attr]
        g.copy_(flat[offset : offset + n].view_as(g))  # type: ignore[union-attr]
        offset += n


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, *, src: int = 0) -> object:
    """Rank `src`'s object on every rank (identity without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
