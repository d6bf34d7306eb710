"""`atoll calibrate`: the efficiency fit, its errors, and the hardware file the planner reads back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from atoll.errors import AtollError
from atoll.hardware import get_device
from atoll.hardware.registry import reset_catalog, use_hardware_file
from atoll.model.config import get_preset
from atoll.planner.calibrate import fit_efficiency, predict_step
from atoll.planner.shape import shape_from_config


@pytest.fixture
def catalog() -> object:
    reset_catalog()
    yield
    reset_catalog()


def demo_shape() -> object:
    return shape_from_config(get_preset("demo"), name="demo")


@pytest.mark.parametrize("true_eff", [0.05, 0.33, 0.9])
def test_fit_recovers_the_efficiency_that_produced_a_step(true_eff: float) -> None:
    cpu = dataclasses.replace(get_device("cpu"), peak_tflops=0.035)
    dev = dataclasses.replace(cpu, matmul_efficiency=true_eff, attention_efficiency=true_eff)
    measured = predict_step(demo_shape(), dev, seq_len=256, micro_batch=8).seconds
    assert fit_efficiency(demo_shape(), cpu, measured_step_s=measured, seq_len=256, micro_batch=8) == pytest.approx(
        true_eff, rel=1e-6
    )


def test_a_step_faster_than_the_peak_allows_is_refused_with_the_reason() -> None:
    cpu = dataclasses.replace(get_device("cpu"), peak_tflops=0.001)
    with pytest.raises(AtollError, match="peak is too low"):
        fit_efficiency(demo_shape(), cpu, measured_step_s=1e-4, seq_len=256, micro_batch=8)
    with pytest.raises(AtollError, match="positive"):
        fit_efficiency(demo_shape(), cpu, measured_step_s=0.0, seq_len=256, micro_batch=8)


def test_cli_writes_a_hardware_file_the_planner_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], catalog: object
) -> None:
    from atoll.cli import main

    out = tmp_path / "hw.yaml"
    with pytest.raises(SystemExit) as done:
        main(
            [
                "calibrate",
                "--model",
                "tiny",
                "--seq-len",
                "32",
                "--micro-batch",
                "2",
                "--steps",
                "2",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
    assert done.value.code in (0, None)
    assert "fitted efficiency" in capsys.readouterr().out
    entry = yaml.safe_load(out.read_text())["devices"]["cpu"]
    assert entry["base"] == "cpu" and entry["peak_tflops"] > 0 and 0 < entry["matmul_efficiency"] <= 1
    use_hardware_file(out)
    cpu = get_device("cpu")
    assert (
        cpu.matmul_efficiency == entry["matmul_efficiency"]
        and cpu.peak_tflops == entry["peak_tflops"]
        and cpu.confidence == "measured"
    )


def test_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from atoll.cli import main

    with pytest.raises(SystemExit) as done:
        main(["calibrate", "--steps", "0"])
    assert done.value.code == 2 and "--steps must be at least 1" in capsys.readouterr().err
