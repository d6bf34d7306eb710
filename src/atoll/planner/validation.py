"""Published measurements the planner is checked against, and how it predicts them.

Megatron-LM, SC'21 (Narayanan et al., arXiv 2104.04473), Table 1: GPT models from 1.7B to 1T
parameters on A100-80GB (8 per node, NVSwitch, 8 x 200 Gbit/s InfiniBand per node), sequence
2048, vocabulary 51,200, full recomputation, fp16. Micro-batch sizes, interleaving and the DDP
implementation per row are those of Megatron-LM's own script, examples/sc21/run_table_1.sh.
Calculon's column is its error on the same rows, as reported in shared/REFERENCES.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from atoll.hardware import DeviceSpec, get_device
from atoll.planner.cost import megatron_flops_per_iteration
from atoll.planner.shape import PLANNER_PRESETS, ModelShape
from atoll.planner.step import MEGATRON_2021, Layout, StepEstimate, estimate_step


@dataclass(frozen=True)
class MegatronRow:
    """One row of Table 1 and the layout Megatron-LM's script uses for it."""

    model: str
    """Planner preset of the shape (gpt-1.7b ... gpt-1t)."""
    params_b: float
    gpus: int
    batch: int
    tp: int
    pp: int
    micro_batch: int
    interleave: int
    torch_ddp: bool
    """``--DDP-impl torch`` (gradient all-reduce overlapped with backward) or ``local`` (after it)."""
    published_tflops: float


MEGATRON_TABLE1: tuple[MegatronRow, ...] = (
    MegatronRow("gpt-1.7b", 1.7, 32, 512, 1, 1, 16, 1, True, 137.0),
    MegatronRow("gpt-3.6b", 3.6, 64, 512, 2, 1, 16, 1, True, 138.0),
    MegatronRow("gpt-7.5b", 7.5, 128, 512, 4, 1, 16, 1, True, 142.0),
    MegatronRow("gpt-18b", 18.4, 256, 1024, 8, 1, 8, 1, True, 135.0),
    MegatronRow("gpt-39b", 39.1, 512, 1536, 8, 2, 4, 1, False, 138.0),
    MegatronRow("gpt-76b", 76.1, 1024, 1792, 8, 4, 2, 3, False, 140.0),
    MegatronRow("gpt-145b", 145.6, 1536, 2304, 8, 8, 2, 2, False, 148.0),
    MegatronRow("gpt-310b", 310.1, 1920, 2160, 8, 16, 1, 2, False, 155.0),
    MegatronRow("gpt-530b", 529.6, 2520, 2520, 8, 35, 1, 3, False, 163.0),
    MegatronRow("gpt-1t", 1008.0, 3072, 3072, 8, 64, 1, 1, False, 163.0),
)

CALCULON_ERRORS = {"average": 0.117, "worst": 0.217, "worst_row": "gpt-1.7b"}
"""Calculon (SC'23) on the same ten rows: overestimates every row (shared/REFERENCES.md)."""

SEQ_LEN = 2048


@dataclass(frozen=True)
class RowPrediction:
    row: MegatronRow
    layout: Layout
    step: StepEstimate
    tflops_per_gpu: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction: (predicted - published) / published."""
        return (self.tflops_per_gpu - self.row.published_tflops) / self.row.published_tflops


def megatron_layout(row: MegatronRow) -> Layout:
    """The row's layout as Megatron-LM ran it: data parallelism fills the remaining GPUs."""
    dp = row.gpus // (row.tp * row.pp)
    return Layout(tp=row.tp, pp=row.pp, dp=dp, vp=row.interleave, micro_batch=row.micro_batch, zero=0, recompute="full")


def predict_row(row: MegatronRow, *, device: DeviceSpec | None = None, layout: Layout | None = None) -> RowPrediction:
    """Predict the row's TFLOP/s per GPU with the planner's model (A100-80GB from the catalog)."""
    dev = device or get_device("a100-80g")
    shape: ModelShape = PLANNER_PRESETS[row.model]
    lay = layout or megatron_layout(row)
    micro_batches = row.batch // (lay.dp * lay.micro_batch)
    runtime = dataclasses.replace(MEGATRON_2021, overlap_grad_reduce=row.torch_ddp)
    step = estimate_step(
        shape, seq_len=SEQ_LEN, layout=lay, micro_batches=micro_batches, device=dev, per_node=8, runtime=runtime
    )
    flops = megatron_flops_per_iteration(
        batch=row.batch, seq_len=SEQ_LEN, layers=shape.num_layers, hidden=shape.dim, vocab=shape.vocab_size
    )
    return RowPrediction(row=row, layout=lay, step=step, tflops_per_gpu=flops / (step.seconds * lay.devices) / 1e12)
