"""The device catalog: what each accelerator can do, on paper and in practice.

A `DeviceSpec` holds a chip's datasheet figures (peak dense bf16/fp16 FLOP/s, memory, memory
bandwidth, intra-node link, collective backend) and the fractions of them that real kernels
reach (`matmul_efficiency`, ...). The planner multiplies the two; `atoll calibrate` (or a user's
hardware YAML) replaces the fractions with measurements. Every built-in figure has its public
source in docs/hardware.md; figures that sources disagree on carry `disputed=True`.

Pure Python: no torch, so the planner runs anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from atoll.errors import AtollError

Backend = Literal["nccl", "hccl", "cncl", "gloo"]
Confidence = Literal["datasheet", "vendor", "press", "spec-sites", "assumed", "measured"]

_POSITIVE = (
    "peak_tflops",
    "memory_gb",
    "memory_bw_tbs",
    "intra_node_gbs",
    "nic_gbps",
    "compute_bytes",
    "usd_per_hour",
    "mtbf_hours",
)
_FRACTIONS = (
    "matmul_efficiency",
    "attention_efficiency",
    "memory_efficiency",
    "link_efficiency",
    "nic_efficiency",
)


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator kind. Immutable; derive variants with `dataclasses.replace`.

    Construction validates every field and raises `AtollError` naming the bad one.
    """

    kind: str
    """Catalog key used in topology files (``a800``, ``ascend-910b``, ...)."""
    name: str
    """Human-readable product name."""
    vendor: str
    backend: Backend
    """Collective library inside a site. Different backends cannot share one process group."""
    peak_tflops: float
    """Dense bf16/fp16 tensor peak, TFLOP/s (fp32 for `cpu`, which trains in fp32)."""
    memory_gb: float
    """Device memory, GB (1e9 bytes)."""
    memory_bw_tbs: float
    """Device memory bandwidth, TB/s."""
    intra_node_gbs: float
    """Device-to-device bandwidth inside a node, GB/s per direction per device."""
    nic_gbps: float = 200.0
    """Network bandwidth between nodes, Gbit/s per device (a cluster property; typical value)."""
    compute_bytes: int = 2
    """Bytes per element of the compute dtype (2: bf16/fp16; 4: fp32 on CPU)."""
    matmul_efficiency: float = 0.6
    """Sustained fraction of `peak_tflops` that large matrix multiplies reach."""
    attention_efficiency: float = 0.5
    """Fraction of `peak_tflops` a fused (flash) attention kernel reaches."""
    memory_efficiency: float = 0.85
    """Fraction of `memory_bw_tbs` that bandwidth-bound kernels reach."""
    link_efficiency: float = 0.75
    """Fraction of `intra_node_gbs` an intra-node all-reduce reaches (bus bandwidth)."""
    nic_efficiency: float = 0.85
    """Fraction of `nic_gbps` a cross-node collective reaches."""
    usd_per_hour: float = 1.0
    """Price of one device-hour (illustrative; set your own for the cost objective)."""
    mtbf_hours: float = 50_000.0
    """Mean time between failures of one device (interruptions of the job it runs)."""
    confidence: Confidence = "datasheet"
    """Where the datasheet figures come from (see docs/hardware.md)."""
    disputed: bool = False
    """True when public sources disagree on a figure; the planner says so in its output."""
    efficiency_source: str = "assumed"
    """Where the efficiency fractions come from: ``assumed``, a citation, or ``calibrated``."""

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise AtollError(f"hardware {self.kind!r}: {name} must be a positive number, got {value!r}")
        for name in _FRACTIONS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise AtollError(f"hardware {self.kind!r}: {name} must be a fraction in (0, 1], got {value!r}")
        if self.compute_bytes not in (1, 2, 4):
            raise AtollError(f"hardware {self.kind!r}: compute_bytes must be 1, 2 or 4, got {self.compute_bytes!r}")
        if self.backend not in ("nccl", "hccl", "cncl", "gloo"):
            raise AtollError(f"hardware {self.kind!r}: backend must be nccl, hccl, cncl or gloo, got {self.backend!r}")

    # Derived rates in SI units, so callers never juggle prefixes.
    @property
    def peak_flops(self) -> float:
        """Peak FLOP/s."""
        return self.peak_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def matmul_flops(self) -> float:
        """Sustained FLOP/s of large matrix multiplies."""
        return self.peak_flops * self.matmul_efficiency

    @property
    def memory_bytes_per_s(self) -> float:
        """Achieved bytes/s of bandwidth-bound kernels."""
        return self.memory_bw_tbs * 1e12 * self.memory_efficiency

    @property
    def intra_node_bytes_per_s(self) -> float:
        """All-reduce bus bandwidth among devices of one node, bytes/s."""
        return self.intra_node_gbs * 1e9 * self.link_efficiency

    @property
    def nic_bytes_per_s(self) -> float:
        """Achieved cross-node bandwidth of one device, bytes/s."""
        return self.nic_gbps / 8 * 1e9 * self.nic_efficiency


def _a100_like(kind: str, name: str, *, intra: float, confidence: Confidence) -> DeviceSpec:
    return DeviceSpec(
        kind=kind,
        name=name,
        vendor="NVIDIA",
        backend="nccl",
        peak_tflops=312.0,
        memory_gb=80.0,
        memory_bw_tbs=2.039,
        intra_node_gbs=intra,
        nic_gbps=200.0,
        # Sustained GEMM: 86.9% (MAMF, stas00/ml-engineering) x 0.845 (sustained / burst ratio
        # measured with the same tool on H200 and B200). See docs/hardware.md.
        matmul_efficiency=0.734,
        attention_efficiency=0.55,
        memory_efficiency=0.85,
        link_efficiency=0.78,
        nic_efficiency=0.9,
        usd_per_hour=1.6,
        confidence=confidence,
        efficiency_source="MAMF x sustained ratio (docs/hardware.md)",
    )


def _hopper(kind: str, name: str, *, intra: float, confidence: Confidence, disputed: bool = False) -> DeviceSpec:
    return DeviceSpec(
        kind=kind,
        name=name,
        vendor="NVIDIA",
        backend="nccl",
        peak_tflops=989.0,
        memory_gb=80.0,
        memory_bw_tbs=3.35,
        intra_node_gbs=intra,
        nic_gbps=400.0,
        # Sustained GEMM (MSMF) measured on H200, the same GH100 compute die: 702.9 / 989.
        matmul_efficiency=0.71,
        attention_efficiency=0.5,
        memory_efficiency=0.85,
        link_efficiency=0.78,
        nic_efficiency=0.9,
        usd_per_hour=2.5,
        confidence=confidence,
        disputed=disputed,
        efficiency_source="MSMF on H200 (docs/hardware.md)",
    )


BUILTIN: dict[str, DeviceSpec] = {
    spec.kind: spec
    for spec in (
        _a100_like("a100-80g", "NVIDIA A100 SXM 80GB", intra=300.0, confidence="datasheet"),
        _a100_like("a800", "NVIDIA A800 SXM 80GB", intra=200.0, confidence="press"),
        _hopper("h100", "NVIDIA H100 SXM 80GB", intra=450.0, confidence="datasheet"),
        _hopper("h800", "NVIDIA H800 SXM 80GB", intra=200.0, confidence="press", disputed=True),
        # The H100's GH100 compute die with 141 GB of HBM3e at 4.8 TB/s (NVIDIA datasheet).
        dataclasses.replace(
            _hopper("h200", "NVIDIA H200 SXM 141GB", intra=450.0, confidence="datasheet"),
            memory_gb=141.0,
            memory_bw_tbs=4.8,
        ),
        DeviceSpec(
            kind="h20",
            name="NVIDIA H20 96GB",
            vendor="NVIDIA",
            backend="nccl",
            peak_tflops=148.0,
            memory_gb=96.0,
            memory_bw_tbs=4.0,
            intra_node_gbs=450.0,
            nic_gbps=400.0,
            matmul_efficiency=0.71,
            attention_efficiency=0.5,
            link_efficiency=0.78,
            nic_efficiency=0.9,
            usd_per_hour=1.0,
            confidence="spec-sites",
            efficiency_source="assumed equal to H100",
        ),
        DeviceSpec(
            kind="l20",
            name="NVIDIA L20 48GB",
            vendor="NVIDIA",
            backend="nccl",
            peak_tflops=119.5,
            memory_gb=48.0,
            memory_bw_tbs=0.864,
            intra_node_gbs=32.0,
            nic_gbps=100.0,
            matmul_efficiency=0.6,
            attention_efficiency=0.45,
            link_efficiency=0.7,
            nic_efficiency=0.85,
            usd_per_hour=0.6,
            confidence="spec-sites",
        ),
        DeviceSpec(
            kind="ascend-910b",
            name="Huawei Ascend 910B",
            vendor="Huawei",
            backend="hccl",
            peak_tflops=313.0,
            memory_gb=64.0,
            memory_bw_tbs=1.6,
            intra_node_gbs=196.0,
            nic_gbps=200.0,
            matmul_efficiency=0.55,
            attention_efficiency=0.4,
            link_efficiency=0.7,
            nic_efficiency=0.85,
            usd_per_hour=1.2,
            confidence="press",
            disputed=True,
        ),
        DeviceSpec(
            kind="ascend-910c",
            name="Huawei Ascend 910C",
            vendor="Huawei",
            backend="hccl",
            peak_tflops=780.0,
            memory_gb=128.0,
            memory_bw_tbs=3.2,
            intra_node_gbs=196.0,
            nic_gbps=400.0,
            matmul_efficiency=0.55,
            attention_efficiency=0.4,
            link_efficiency=0.7,
            nic_efficiency=0.85,
            usd_per_hour=2.0,
            confidence="press",
            disputed=True,
        ),
        DeviceSpec(
            kind="mlu370",
            name="Cambricon MLU370-X8",
            vendor="Cambricon",
            backend="cncl",
            peak_tflops=96.0,
            memory_gb=48.0,
            memory_bw_tbs=0.614,
            intra_node_gbs=100.0,
            nic_gbps=100.0,
            matmul_efficiency=0.5,
            attention_efficiency=0.35,
            link_efficiency=0.7,
            nic_efficiency=0.85,
            usd_per_hour=0.5,
            confidence="vendor",
        ),
        # One CPU rank of the lab. Its peak is a placeholder of the right order for one modern
        # core pair in fp32; bench/planner.py replaces it with this machine's measured matmul
        # peak (bench/results/throughput.json) before predicting lab runs.
        DeviceSpec(
            kind="cpu",
            name="CPU rank (fp32, lab)",
            vendor="any",
            backend="gloo",
            peak_tflops=0.1,
            memory_gb=16.0,
            memory_bw_tbs=0.02,
            intra_node_gbs=2.0,
            nic_gbps=10.0,
            compute_bytes=4,
            matmul_efficiency=0.7,
            attention_efficiency=0.3,
            memory_efficiency=0.6,
            link_efficiency=0.5,
            nic_efficiency=0.8,
            usd_per_hour=0.05,
            confidence="assumed",
        ),
    )
}

ALIASES: dict[str, str] = {"a100": "a100-80g", "910b": "ascend-910b", "910c": "ascend-910c", "mlu370-x8": "mlu370"}


def replace_fields(spec: DeviceSpec, **fields: object) -> DeviceSpec:
    """A copy of `spec` with `fields` changed; raises `AtollError` for an unknown field name."""
    known = {f.name for f in dataclasses.fields(DeviceSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise AtollError(
            f"hardware {spec.kind!r}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
        )
    return dataclasses.replace(spec, **fields)  # type: ignore[arg-type]
