"""bench/gpu.py without a GPU: the device's catalog entry by its CUDA name, and the results table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import gpu  # noqa: E402


@pytest.mark.parametrize(
    ("name", "kind"),
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100-80g")],
)
def test_the_catalog_entry_comes_from_the_cuda_name(name: str, kind: str) -> None:
    assert gpu.catalog_kind(name) == kind


def test_an_unknown_device_asks_for_its_kind() -> None:
    with pytest.raises(SystemExit, match="--kind"):
        gpu.catalog_kind("Some Future Accelerator")


def test_results_name_the_device_and_say_a_missed_target(tmp_path: Path) -> None:
    rec = {
        "name": "1b-compile",
        "device": "NVIDIA H100 80GB HBM3",
        "kind": "h100",
        "preset": "llama3.2-1b",
        "dtype": "bf16",
        "seq_len": 2048,
        "micro_batch": 8,
        "compile": True,
        "recompute": "none",
        "step_s": 0.5,
        "tokens_per_s": 32768.0,
        "mfu": 0.40,
        "mfu_target_met": False,
        "predicted_step_s": 0.45,
        "predicted_step_error": -0.1,
        "measured_memory_gb": 40.0,
        "predicted_memory_gb": 44.0,
        "predicted_memory_error": 0.1,
    }
    gpu.write([rec], tmp_path, "python bench/gpu.py")
    row = (tmp_path / "gpu.md").read_text().splitlines()[-1]
    assert "NVIDIA H100 80GB HBM3 (h100)" in row and "40.0% (missed)" in row and "0.450 (-10%)" in row
    assert json.loads((tmp_path / "gpu.json").read_text())["records"] == [rec]
