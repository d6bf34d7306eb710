"""The scenario ratio helpers (scaling a real WAN deployment down to the lab) and the lab verbs."""

from __future__ import annotations

import argparse

import pytest

from atoll.errors import AtollError
from atoll.lab.emulate import (
    SCENARIOS,
    bandwidth_for_ratio,
    get_scenario,
    scenario_ratio,
    step_seconds_from_compute,
)


def test_worked_example_from_references() -> None:
    s = get_scenario("diloco-107b-1gbps")
    assert s.model_bytes == pytest.approx(214e9)
    assert s.send_seconds == pytest.approx(1712)
    assert s.step_seconds == pytest.approx(6 * 107e9 * 0.5e6 / (80 * 312e12 * 0.4))
    assert s.step_seconds == pytest.approx(32, abs=0.5)
    assert s.ratio == pytest.approx(53, abs=0.5)
    assert scenario_ratio(107e9, 2, 1000, s.step_seconds) == pytest.approx(s.ratio)
    text = s.assumptions()
    for figure in ("107", "bf16", "1,000 Mbit/s", "80 devices", "312 TFLOP/s", "40% MFU", "500,000 tokens", "R = 53"):
        assert figure in text, figure


def test_lab_bandwidth_for_the_5m_model() -> None:
    # 5M parameters in fp32 = 20 MB at ~0.9 s per step: R = 53 needs ~3.4 Mbit/s.
    mbps = get_scenario("diloco-107b-1gbps").lab_mbps(20e6, 0.9)
    assert mbps == pytest.approx(3.4, rel=0.03)
    assert bandwidth_for_ratio(20e6, 0.9, 53) == pytest.approx(20e6 * 8 / (53 * 0.9) / 1e6)
    # Round trip: that link gives the small model the same R.
    assert scenario_ratio(5e6, 4, mbps, 0.9) == pytest.approx(get_scenario("diloco-107b-1gbps").ratio)


def test_fp32_exchange_doubles_r() -> None:
    assert SCENARIOS["diloco-107b-1gbps-fp32"].ratio == pytest.approx(2 * SCENARIOS["diloco-107b-1gbps"].ratio)


def test_intellect1_has_another_ratio_at_int8_width() -> None:
    s = get_scenario("intellect-1")
    assert s.bytes_per_param == 1  # its int8 all-reduce
    assert s.send_seconds == pytest.approx(10e9 * 8 / 1e9)
    assert s.step_seconds == pytest.approx(6 * 10e9 * 0.5e6 / (8 * 989e12 * 0.38))
    assert s.ratio == pytest.approx(8.0, abs=0.1)
    assert s.ratio < SCENARIOS["diloco-107b-1gbps"].ratio / 5
    assert "arXiv:2412.01152" in s.assumptions() and "assumed" in s.assumptions()


def test_scenario_errors_name_the_fix() -> None:
    with pytest.raises(AtollError, match="known: diloco-107b-1gbps"):
        get_scenario("nope")
    with pytest.raises(AtollError):
        bandwidth_for_ratio(1, 1, 0)
    with pytest.raises(AtollError):
        step_seconds_from_compute(1, 1, num_devices=1, device_flops=1, mfu=1.5)


# ---------------------------------------------------------------- CLI wiring


def test_lab_verbs_are_registered() -> None:
    from atoll.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["lab", "clean", "--all"])
    assert args.all and not args.allow_overrides and callable(args.func)
    assert callable(parser.parse_args(["lab", "check"]).func)
    with pytest.raises(SystemExit):
        parser.parse_args(["lab"])
    assert isinstance(parser, argparse.ArgumentParser)
