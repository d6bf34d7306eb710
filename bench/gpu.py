"""The GPU pass (issue 18, item 7): atoll's training step on one GPU, its MFU, and the planner's error.

    .venv/bin/python bench/gpu.py                 # on a CUDA machine: the grid -> bench/results/gpu.{json,md}
    .venv/bin/python bench/gpu.py --resume        # keep the records already written, run the rest
    .venv/bin/python bench/gpu.py --smoke         # the same code on CPU, tiny model, to /tmp (a minute)

What is timed is atoll's own step, built from the runtime's parts, not a separate kernel test:
the model (`atoll.model.Transformer`, SDPA attention), each decoder block compiled in place
(`parallel.compile`, `atoll.parallel.compiled`), bf16 autocast (`parallel.dtype`), activation
recompute (`parallel.recompute`), FSDP2 `fully_shard` of every block and of the model on a
one-rank mesh (zero 3, the order `atoll.parallel.dist.wrap_model` uses), the summed token loss
(`atoll.model.loss.token_loss_sum`) divided by the tokens, gradient clipping at 1.0, and AdamW
(`atoll.train.loop.make_optimizer`: fused on CUDA). The batches are random tokens, so data
loading is left out; the first `--warmup` steps (compilation, allocator growth) are not timed.

MFU = the planner's model FLOPs of a step (6N + 12·L·H·Q·T per token, no recompute counted) /
(median step seconds x the device's dense bf16 peak from atoll's catalog: 989 TFLOP/s for H100
and H200 SXM). The target is 45% on an H100/H200-class device. Beside each measurement the
planner's prediction for the same layout on the same catalog entry: step seconds
(`atoll.planner.step.estimate_step`) and peak memory (`atoll.planner.memory.estimate_memory`)
against `torch.cuda.max_memory_allocated`, each with its relative error.

Each configuration of the grid (`GRID`; `--only NAME`) runs in a process of its own, so that
compiled graphs and cached memory of one do not weigh on the next; its record is written as it
ends. Results name the device (`torch.cuda.get_device_name`) and the torch version.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SMOKE_OUT = Path("/tmp/atoll-gpu-smoke")
MFU_TARGET = 0.45

# name -> preset, sequence length, micro-batch, compile, recompute. Sized for one 80 GB H100:
# the 1B model with and without compile (what compile buys), the 3B model as the MFU candidate
# (larger matmuls) with selective recompute so its activations fit beside 16 B/parameter of
# fp32 weights, gradients and AdamW state.
GRID: dict[str, dict[str, Any]] = {
    "1b-compile": {"preset": "llama3.2-1b", "seq_len": 2048, "micro_batch": 8, "compile": True, "recompute": "none"},
    "1b-eager": {"preset": "llama3.2-1b", "seq_len": 2048, "micro_batch": 8, "compile": False, "recompute": "none"},
    "3b-compile": {
        "preset": "llama3.2-3b",
        "seq_len": 2048,
        "micro_batch": 4,
        "compile": True,
        "recompute": "selective",
    },
}
SMOKE = {"smoke": {"preset": "tiny", "seq_len": 64, "micro_batch": 2, "compile": True, "recompute": "selective"}}

# Catalog kind by the name CUDA reports, most specific first.
DEVICE_KINDS = (
    ("H200", "h200"),
    ("H100", "h100"),
    ("H800", "h800"),
    ("H20", "h20"),
    ("A800", "a800"),
    ("A100", "a100-80g"),
    ("L20", "l20"),
)


def catalog_kind(device_name: str) -> str:
    for marker, kind in DEVICE_KINDS:
        if marker in device_name:
            return kind
    raise SystemExit(f"no catalog entry for {device_name!r}: pass --kind with one of atoll's device kinds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(conf: dict[str, Any], *, device_type: str, steps: int, warmup: int, kind: str | None) -> dict[str, Any]:
    """Build and time one configuration in this process (the `--single` child)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, str(REPO / "src"))
    from atoll.config.schema import TrainSection
    from atoll.hardware import get_device
    from atoll.model import Transformer, get_preset
    from atoll.model.loss import token_loss_sum
    from atoll.parallel.compiled import compile_blocks
    from atoll.parallel.recompute import apply_recompute
    from atoll.planner.memory import estimate_memory
    from atoll.planner.shape import shape_from_config
    from atoll.planner.step import ATOLL_RUNTIME, Layout, estimate_step
    from atoll.train.loop import make_optimizer

    cuda = device_type == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    mesh = init_device_mesh(device_type, (1,))
    cfg = get_preset(conf["preset"])
    torch.manual_seed(0)
    with device:
        model = Transformer(cfg)
    apply_recompute(model, conf["recompute"])
    if conf["compile"]:
        compile_blocks(model, device)
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    optimizer = make_optimizer(model, TrainSection(lr=1e-4), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = "bf16" if cuda else "fp32"
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, cfg.vocab_size, (conf["micro_batch"], conf["seq_len"] + 1), generator=gen) for _ in range(4)
    ]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    seconds, losses = [], []
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        loss_sum, tokens = token_loss_sum(model, batches[i % len(batches)], device=device, dtype=dtype)
        (loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
        losses.append(float(loss_sum) / tokens)
    measured_memory = torch.cuda.max_memory_allocated() if cuda else None
    device_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    dist.destroy_process_group()

    kind = kind or (catalog_kind(device_name) if cuda else "cpu")
    spec = get_device(kind)
    shape = shape_from_config(cfg, name=conf["preset"])
    layout = Layout(tp=1, pp=1, dp=1, micro_batch=conf["micro_batch"], zero=3, recompute=conf["recompute"])
    runtime = ATOLL_RUNTIME if cuda else dataclasses.replace(ATOLL_RUNTIME, grad_bytes=spec.compute_bytes)
    est = estimate_step(
        shape, seq_len=conf["seq_len"], layout=layout, micro_batches=1, device=spec, per_node=1, runtime=runtime
    )
    mem = estimate_memory(
        shape,
        seq_len=conf["seq_len"],
        micro_batch=conf["micro_batch"],
        micro_batches=1,
        tp=1,
        pp=1,
        dp=1,
        zero=3,
        recompute=conf["recompute"],
        attention=runtime.attention,
        dropout=runtime.dropout,
        element_bytes=spec.compute_bytes,
        eager=runtime.eager_activations,
        capacity_bytes=spec.memory_bytes,
    )
    step_s = statistics.median(seconds)
    tokens_per_step = conf["micro_batch"] * conf["seq_len"]
    mfu = est.model_flops / (step_s * spec.peak_tflops * 1e12)
    return {
        **conf,
        "device": device_name,
        "kind": kind,
        "peak_tflops": spec.peak_tflops,
        "dtype": dtype,
        "zero": 3,
        "params": cfg.num_params(),
        "steps": steps,
        "warmup": warmup,
        "step_s": step_s,
        "step_s_all": seconds,
        "tokens_per_s": tokens_per_step / step_s,
        "model_flops_per_step": est.model_flops,
        "mfu": mfu,
        "mfu_target_met": mfu >= MFU_TARGET,
        "predicted_step_s": est.seconds,
        "predicted_step_error": est.seconds / step_s - 1,
        "predicted_mfu": est.mfu,
        "predicted_memory_gb": mem.total / 1e9,
        "measured_memory_gb": None if measured_memory is None else measured_memory / 1e9,
        "predicted_memory_error": None if measured_memory is None else mem.total / measured_memory - 1,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "torch": torch.__version__,
    }


def write(records: list[dict[str, Any]], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"command": command, "records": records}, indent=1) + "\n")
    lines = [
        "# One GPU: atoll's training step, MFU and the planner's error (bench/gpu.py)",
        "",
        f"Command: `{command}`. Autocast in the dtype shown (bf16 on CUDA), FSDP2 (zero 3) on a one-rank",
        "mesh, AdamW (fused on CUDA), random tokens; MFU against the catalog's dense bf16 peak (on CPU a",
        "placeholder: the smoke run checks the code, not the machine); median of the timed steps (the warm-up steps,",
        f"compilation included, are not timed). Target: MFU >= {MFU_TARGET:.0%} on an H100/H200-class device.",
        "",
        "| config | device | model | dtype | seq x batch | compile | recompute | step s | tokens/s | MFU | "
        "planner step s (error) | memory GB measured | planner GB (error) |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in records:
        mem = "-" if r["measured_memory_gb"] is None else f"{r['measured_memory_gb']:.1f}"
        mem_err = "" if r["predicted_memory_error"] is None else f" ({r['predicted_memory_error']:+.0%})"
        lines.append(
            f"| {r['name']} | {r['device']} ({r['kind']}) | {r['preset']} | {r['dtype']} | "
            f"{r['seq_len']} x {r['micro_batch']} | "
            f"{'yes' if r['compile'] else 'no'} | {r['recompute']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['mfu']:.1%}{'' if r['mfu_target_met'] else ' (missed)'} | "
            f"{r['predicted_step_s']:.3f} ({r['predicted_step_error']:+.0%}) | {mem} | "
            f"{r['predicted_memory_gb']:.1f}{mem_err} |"
        )
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=None, help="run these configurations of the grid only")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--kind", default=None, help="the device's catalog kind (default: from its CUDA name)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results; --smoke: /tmp)")
    ap.add_argument("--resume", action="store_true", help="keep OUT/gpu.json's records, run only the others")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 timed steps: checks the code")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one configuration, JSON out
    args = ap.parse_args()
    grid = SMOKE if args.smoke else GRID
    if args.single is not None:
        conf = dict(grid[args.single])
        rec = measure(
            conf, device_type="cpu" if args.smoke else "cuda", steps=args.steps, warmup=args.warmup, kind=args.kind
        )
        print("RECORD " + json.dumps({"name": args.single, **rec}), flush=True)
        return
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py needs a CUDA device (this machine has none); --smoke runs the code on CPU")
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    out = args.out or (SMOKE_OUT if args.smoke else RESULTS)
    names = args.only or list(grid)
    unknown = sorted(set(names) - set(grid))
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {sorted(grid)}")
    saved = out / "gpu.json"
    records = json.loads(saved.read_text())["records"] if args.resume and saved.exists() else []
    command = "python bench/gpu.py " + " ".join(sys.argv[1:])
    for name in names:
        if any(r["name"] == name for r in records):
            continue
        child = [sys.executable, __file__, "--single", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        child += ["--smoke"] if args.smoke else []
        child += ["--kind", args.kind] if args.kind else []
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        proc = subprocess.run(child, capture_output=True, text=True, env=env, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RECORD ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"{name}: exited {proc.returncode}; records so far are in {saved}")
        rec = json.loads(line[len("RECORD ") :])
        records.append(rec)
        write(records, out, command)
        print(
            f"{name}: {rec['step_s']:.3f} s/step, {rec['tokens_per_s']:,.0f} tokens/s, MFU {rec['mfu']:.1%}, "
            f"planner {rec['predicted_step_s']:.3f} s ({rec['predicted_step_error']:+.0%})",
            flush=True,
        )
    write(records, out, command)


if __name__ == "__main__":
    main()
