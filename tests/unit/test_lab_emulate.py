"""LinkEmulator (delay math, pacing across calls and threads) and the scenario ratio helpers."""

from __future__ import annotations

import argparse
import threading
import time

import pytest

from atoll.config.topology import LinkSpec
from atoll.errors import AtollError
from atoll.lab.emulate import (
    SCENARIOS,
    LinkEmulator,
    bandwidth_for_ratio,
    get_scenario,
    scenario_ratio,
    step_seconds_from_compute,
)


class FakeClock:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def fake(uplink: float, downlink: float | None = None, latency_ms: float = 0.0, *, shape: bool = True) -> tuple[LinkEmulator, FakeClock]:
    clock = FakeClock()
    return LinkEmulator(uplink, downlink, latency_ms, shape_bandwidth=shape, clock=clock, sleep=clock.sleep), clock


def test_delay_is_bytes_over_bandwidth_plus_latency() -> None:
    link = LinkEmulator(8, latency_ms=10, shape_bandwidth=True)
    assert link.delay_seconds(1_000_000) == pytest.approx(1.0 + 0.010)
    assert link.delay_seconds(0) == pytest.approx(0.010)


def test_delay_to_a_peer_uses_the_narrower_side_and_both_latencies() -> None:
    a = LinkEmulator(100, 100, 15, shape_bandwidth=True)
    b = LinkEmulator(40, 20, 25, shape_bandwidth=True)
    assert a.delay_seconds(2_500_000, b) == pytest.approx(2_500_000 * 8 / 20e6 + 0.040)  # b's downlink
    assert b.delay_seconds(2_500_000, a) == pytest.approx(2_500_000 * 8 / 40e6 + 0.040)  # b's uplink
    assert a.path_mbps(b) == 20 and b.path_mbps(a) == 40


def test_transmit_paces_back_to_back_calls_exactly() -> None:
    link, clock = fake(8)  # 1 MB per second
    for _ in range(5):
        link.transmit(1_000_000)
    assert clock.now == pytest.approx(5.0)
    assert link.bytes_sent == 5_000_000


def test_transmit_overlaps_latency_but_not_bandwidth() -> None:
    # Three senders reserving at the same instant (the clock stands still): the second message
    # starts when the first has left (1 s), not when it has arrived (1.5 s).
    waits: list[float] = []
    link = LinkEmulator(8, latency_ms=500, shape_bandwidth=True, clock=lambda: 0.0, sleep=waits.append)
    for _ in range(3):
        link.transmit(1_000_000)
    assert waits == pytest.approx([1.5, 2.5, 3.5])


def test_an_idle_link_builds_no_credit() -> None:
    link, clock = fake(8)
    link.transmit(1_000_000)
    clock.now += 10.0  # idle
    before = clock.now
    link.transmit(1_000_000)
    assert clock.now - before == pytest.approx(1.0)


def test_netns_mode_adds_only_latency() -> None:
    link, clock = fake(1, latency_ms=30, shape=False)
    assert link.transmit(10_000_000) == pytest.approx(0.030)
    assert link.transmit(10_000_000) == pytest.approx(0.030)
    assert clock.now == pytest.approx(0.060)
    assert link.mode == "netns" and LinkEmulator(1, shape_bandwidth=True).mode == "emulated"


def test_rate_is_respected_across_threads_on_the_real_clock() -> None:
    link = LinkEmulator(10, latency_ms=5, shape_bandwidth=True)
    num_threads, per_thread, size = 4, 5, 25_000  # 500 kB = 4 Mbit -> 0.4 s at 10 Mbit/s

    def sender() -> None:
        for _ in range(per_thread):
            link.transmit(size)

    threads = [threading.Thread(target=sender) for _ in range(num_threads)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    elapsed = time.monotonic() - t0
    expected = num_threads * per_thread * size * 8 / 10e6
    assert expected <= elapsed <= expected * 1.1 + 0.2  # never faster than the rate; slack for a busy machine
    assert link.bytes_sent == num_threads * per_thread * size


def test_from_link_defaults_downlink_to_uplink() -> None:
    link = LinkEmulator.from_link(LinkSpec(site="a", uplink_mbps=30, latency_ms=12), shape_bandwidth=False)
    assert (link.uplink_mbps, link.downlink_mbps, link.latency_ms) == (30, 30, 12)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(AtollError, match="uplink_mbps"):
        LinkEmulator(0, shape_bandwidth=True)
    with pytest.raises(AtollError, match="latency_ms"):
        LinkEmulator(1, latency_ms=-1, shape_bandwidth=True)
    with pytest.raises(ValueError, match="num_bytes"):
        LinkEmulator(1, shape_bandwidth=True).transmit(-1)


# ---------------------------------------------------------------- scenarios


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
