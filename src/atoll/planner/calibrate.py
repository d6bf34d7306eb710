"""Calibrating the planner on this machine (what `atoll calibrate` runs, see atoll.planner.commands).

The planner predicts a step from a device's peak FLOP/s and its sustained efficiencies. The
catalog's efficiencies are typical figures; a measurement replaces them. `calibrate` measures
this machine's matmul peak, times real training steps of a model (forward, backward, AdamW) on
one device, and fits the one free parameter, the matmul (and attention) efficiency, so that the
planner's estimate of that step equals the measurement. The result is a hardware YAML that
`atoll plan --hardware FILE` (or ``ATOLL_HARDWARE=FILE``) merges into the catalog.

    atoll calibrate --model demo --out hardware.yaml
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

from atoll.errors import AtollError
from atoll.hardware import DeviceSpec, get_device
from atoll.planner.shape import ModelShape
from atoll.planner.step import ATOLL_RUNTIME, Layout, StepEstimate, estimate_step

log = logging.getLogger(__name__)

EFFICIENCY_RANGE = (0.005, 1.0)


def predict_step(
    shape: ModelShape, device: DeviceSpec, *, seq_len: int, micro_batch: int, micro_batches: int = 1, ranks: int = 1
) -> StepEstimate:
    """The planner's step on `ranks` data-parallel devices of one node (fp32 gradients on CPU)."""
    runtime = dataclasses.replace(ATOLL_RUNTIME, grad_bytes=device.compute_bytes)
    layout = Layout(tp=1, pp=1, dp=ranks, micro_batch=micro_batch, zero=0)
    return estimate_step(
        shape,
        seq_len=seq_len,
        layout=layout,
        micro_batches=micro_batches,
        device=device,
        per_node=ranks,
        runtime=runtime,
    )


def fit_efficiency(
    shape: ModelShape,
    device: DeviceSpec,
    *,
    measured_step_s: float,
    seq_len: int,
    micro_batch: int,
    micro_batches: int = 1,
    ranks: int = 1,
) -> float:
    """The matmul (= attention) efficiency at which the planner predicts `measured_step_s`.

    Bisection: the predicted time falls as the efficiency rises. Raises `AtollError` when no
    efficiency in (0.005, 1] explains the measurement (the peak is wrong for this device).
    """
    if not measured_step_s > 0:
        raise AtollError(f"the measured step time must be positive (got {measured_step_s})")

    def seconds(eff: float) -> float:
        dev = dataclasses.replace(device, matmul_efficiency=eff, attention_efficiency=eff)
        return predict_step(
            shape, dev, seq_len=seq_len, micro_batch=micro_batch, micro_batches=micro_batches, ranks=ranks
        ).seconds

    lo, hi = EFFICIENCY_RANGE
    if seconds(hi) > measured_step_s:
        raise AtollError(
            f"a step measured at {measured_step_s:.4g} s is faster than {device.peak_tflops:.4g} TFLOP/s "
            "could run it at 100% "
            "efficiency: the peak is too low (measure it again, or give the device's real peak)"
        )
    if seconds(lo) < measured_step_s:
        raise AtollError(
            f"a step measured at {measured_step_s:.4g} s is below {lo:.1%} efficiency: the device was "
            "busy, or the peak is wrong"
        )
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if seconds(mid) < measured_step_s else (mid, hi)
    return (lo + hi) / 2


def time_train_steps(
    model_preset: str, *, seq_len: int, micro_batch: int, steps: int, warmup: int = 2, seed: int = 0
) -> list[float]:
    """Seconds of `steps` training steps (forward, backward, AdamW) of a preset on the CPU, on
    random tokens, after `warmup` untimed ones. Uses torch's current thread count."""
    import torch

    from atoll.model import Transformer
    from atoll.model.config import get_preset
    from atoll.model.loss import token_loss_sum

    torch.manual_seed(seed)
    mcfg = get_preset(model_preset)
    model = Transformer(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, mcfg.vocab_size, (micro_batch, seq_len + 1))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, count = token_loss_sum(model, tokens, device=torch.device("cpu"), dtype="fp32")
        (loss / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class Calibration:
    kind: str
    base: str
    peak_flops: float
    step_s: float
    efficiency: float
    catalog_step_s: float
    model: str
    seq_len: int
    micro_batch: int
    threads: int

    def hardware_yaml(self) -> dict[str, Any]:
        """The hardware file `atoll plan --hardware` merges (see atoll.hardware.registry)."""
        eff = round(self.efficiency, 4)
        return {
            "devices": {
                self.kind: {
                    "base": self.base,
                    "name": f"{self.base} calibrated ({self.threads} threads)",
                    "peak_tflops": round(self.peak_flops / 1e12, 6),
                    "matmul_efficiency": eff,
                    "attention_efficiency": eff,
                    "confidence": "measured",
                }
            }
        }


def calibrate_cpu(
    *, model: str, seq_len: int, micro_batch: int, steps: int, threads: int, kind: str = "cpu"
) -> Calibration:
    """Measure this CPU: matmul peak with `threads` threads, a training step of `model`, the fit."""
    import torch

    from atoll.hardware.measure import matmul_peak_flops
    from atoll.model.config import get_preset
    from atoll.planner.shape import shape_from_config

    before = torch.get_num_threads()
    try:
        peak = matmul_peak_flops(threads=threads)
        step_s = statistics.median(time_train_steps(model, seq_len=seq_len, micro_batch=micro_batch, steps=steps))
    finally:
        torch.set_num_threads(before)
    base = get_device("cpu")
    device = dataclasses.replace(base, peak_tflops=peak / 1e12)
    shape = shape_from_config(get_preset(model), name=model)
    eff = fit_efficiency(shape, device, measured_step_s=step_s, seq_len=seq_len, micro_batch=micro_batch)
    catalog_s = predict_step(shape, device, seq_len=seq_len, micro_batch=micro_batch).seconds
    return Calibration(
        kind=kind,
        base="cpu",
        peak_flops=peak,
        step_s=step_s,
        efficiency=eff,
        catalog_step_s=catalog_s,
        model=model,
        seq_len=seq_len,
        micro_batch=micro_batch,
        threads=threads,
    )
