"""Checkpoints with `torch.distributed.checkpoint`, complete or absent.

Layout of one checkpoint, ``RUN/checkpoints/step_00000100/``:

- the DCP files (``.metadata`` and one ``*.distcp`` per writer) with model and optimizer state,
  sharded as the model is (DDP: replicated; FSDP2 and tensor parallelism: each rank its shards;
  pipeline stages: each rank its layers), all under the whole model's parameter names (the
  optimizer's too, flattened), so any layout loads any other's;
- ``rank{r}.pt``: each rank's own state: its CPU (and CUDA) generator state, and what the
  caller passes as `rank_state` (e.g. the cross-site sync state of that rank's shard);
- ``meta.json``, written last: step, scheduler and data-loader state, and the sha256 of every
  other file. A directory is written as ``step_N.tmp`` and renamed to ``step_N`` only once
  ``meta.json`` is in it, so a crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from atoll.errors import AtollError
from atoll.parallel.dist import DistEnv, barrier, broadcast_object
from atoll.rundir.layout import CHECKPOINTS_DIR

# torch.distributed.checkpoint is imported where a checkpoint is written or read (it costs most
# of a second): listing and verifying checkpoints, as a launcher does before starting ranks, and
# a config check that fails do not need it.
log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"
# The optimizer's state and hyper-parameters stored per parameter name, not per parameter group:
# a pipeline stage's ranks hold different parameters in each group (decay / no decay), so only
# names make the state load into another layout. Checkpoints say so in meta.json ("optim_flat");
# older ones without the key are read as they were written.
FLAT = {"flatten_optimizer_state_dict": True}  # torch's StateDictOptions


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints (those with meta.json), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / META).is_file():
            found.append(CheckpointInfo(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> CheckpointInfo | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AtollError(
            f"checkpoint {ckpt} is corrupt ({META} unreadable: {exc}): delete {ckpt} to resume from the "
            "previous checkpoint"
        ) from None
    if not isinstance(meta, dict) or "step" not in meta or "files" not in meta:
        raise AtollError(
            f"checkpoint {ckpt} is corrupt ({META} lacks step/files): delete {ckpt} to resume from the "
            "previous checkpoint"
        )
    return meta


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check every file against the sha256 in meta.json; returns the meta. Raises AtollError."""
    meta = read_meta(ckpt)
    for name, digest in meta["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise AtollError(
                f"checkpoint {ckpt} is incomplete ({name} is missing): delete {ckpt} to resume from the "
                "previous checkpoint"
            )
        if _sha256(f) != digest:
            raise AtollError(
                f"checkpoint {ckpt} is corrupt ({name} does not match its sha256): delete {ckpt} to resume "
                "from the previous checkpoint"
            )
    return meta


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    env: DistEnv,
    device: torch.device,
    keep: int,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint of `step` (collective: every rank of the site calls it).

    `extra` must be JSON-serializable (scheduler and data-loader state, counters); it goes into
    meta.json. Older checkpoints beyond `keep` are removed once the new one is complete.
    """
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(**FLAT))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"rng": _rng_state(device), "state": rank_state or {}}, tmp / f"rank{env.rank}.pt")
    barrier()
    if env.is_main:
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"step": step, "world_size": env.world_size, "files": files, "optim_flat": True, **extra}
        meta_tmp = tmp / (META + ".tmp")
        meta_tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(meta_tmp, tmp / META)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        log.info("checkpoint written: %s", final)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    ckpt: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    env: DistEnv,
    device: torch.device,
) -> dict[str, Any]:
    """Restore model (and optimizer, RNG) state in place; returns meta.json's content.

    Collective. The main rank verifies the files first; every rank raises AtollError if they are
    corrupt, so no state is half-loaded.
    """
    problem: str | None = None
    if env.is_main:
        try:
            verify_checkpoint(ckpt)
        except AtollError as exc:
            problem = str(exc)
    problem = broadcast_object(problem)  # type: ignore[assignment]
    if problem:
        raise AtollError(problem)
    meta = read_meta(ckpt)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(**FLAT) if meta.get("optim_flat") else None
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(ckpt))
    except Exception as exc:  # DCP raises many types for unreadable or mismatched files
        raise AtollError(
            f"checkpoint {ckpt} cannot be loaded into this model ({type(exc).__name__}: "
            f"{_first_line(exc)}): check model.* matches the run that wrote it"
        ) from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
        )
        rank_file = ckpt / f"rank{env.rank}.pt"
        if rank_file.is_file() and meta.get("world_size") == env.world_size:
            saved = torch.load(rank_file, weights_only=False)
            _set_rng_state(saved["rng"], device)
            meta["rank_state"] = saved["state"]
        elif env.is_main:
            log.warning(
                "checkpoint %s was written by %s ranks, this run has %d: RNG state not restored",
                ckpt,
                meta.get("world_size"),
                env.world_size,
            )
    return meta


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    """Load only the model's weights from a checkpoint, in a single process (export, init_from)."""
    verify_checkpoint(ckpt)
    import torch.distributed.checkpoint as dcp

    sd = model.state_dict()
    try:
        dcp.load({"model": sd}, checkpoint_id=str(ckpt), no_dist=not dist.is_initialized())
    except Exception as exc:
        raise AtollError(
            f"checkpoint {ckpt} cannot be loaded into this model ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    model.load_state_dict(sd)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
