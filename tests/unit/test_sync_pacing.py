"""Paced rounds (atoll.sync.pacing): wall-clock budgets, measured balance, stragglers.

The sites run in threads over the engine tests' in-process hub; each inner step reports the
seconds it "took" (`after_step(..., seconds=...)`), so speeds are exact and nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from atoll.config.schema import SyncSection
from atoll.sync.engine import CrossSiteSync
from atoll.sync.pacing import Pacer, decode_pace, encode_pace, makespan, pace_mode, split_steps
from tests.unit.test_sync_engine import SECRET, FakeTransport, Hub, drift, params_of, small_model


def test_pace_codes_round_trip_within_a_tenth_of_a_percent() -> None:
    assert encode_pace(None) == encode_pace(0.0) == 0 and decode_pace(0) is None
    for seconds in (1e-4, 0.0123, 1.0, 37.5, 3600.0):
        assert decode_pace(encode_pace(seconds)) == pytest.approx(seconds, rel=1e-3)


def test_split_minimizes_the_slowest_sites_round() -> None:
    assert split_steps(24, [1.0, 2.0, 4.0]) == [14, 7, 3]  # 14, 14 and 12 seconds
    assert split_steps(4, [1.0, 1.0]) == [2, 2]
    assert split_steps(3, [1.0, 100.0, 100.0]) == [1, 1, 1]  # at least one step each
    best = split_steps(30, [1.0, 1.3, 3.1])
    assert sum(best) == 30
    # No other split of the same work ends sooner (brute force over every split).
    others = [(a, b, 30 - a - b) for a in range(1, 29) for b in range(1, 30 - a)]
    assert makespan(best, [1.0, 1.3, 3.1]) == min(makespan(o, [1.0, 1.3, 3.1]) for o in others)


def test_pace_mode_follows_the_config_and_the_topology() -> None:
    assert pace_mode(SyncSection(), sites_differ=False) == "fixed"  # alike sites: H is already balanced
    assert pace_mode(SyncSection(), sites_differ=True) == "balanced"
    assert pace_mode(SyncSection(balance="always"), sites_differ=False) == "balanced"
    assert pace_mode(SyncSection(balance="never"), sites_differ=True) == "fixed"
    counts = {"site_inner_steps": {"s0": 12}}
    assert pace_mode(SyncSection(**counts), sites_differ=True) == "fixed"  # hand-set counts stand
    assert pace_mode(SyncSection(**counts, balance="always"), sites_differ=True) == "balanced"  # a plan's start
    assert pace_mode(SyncSection(site_inner_steps={"a": 3}), sites_differ=True) == "fixed"
    assert pace_mode(SyncSection(round_seconds=5.0), sites_differ=False) == "budget"
    assert pace_mode(SyncSection(strategy="streaming"), sites_differ=True) == "fixed"


def test_budget_round_runs_the_steps_that_fit() -> None:
    pacer = Pacer("budget", "a", 4, rounds=3, round_seconds=10.0)
    steps = 0
    while True:
        pacer.step_done(2.5 if steps else 9.0)  # the first step is slow (warm-up) and not averaged
        steps += 1
        if pacer.round_over():
            break
    assert steps == 1  # 9 s + another 2.5 s step would overrun 10 s
    pacer.round_sent()
    steps = 0
    while True:
        pacer.step_done(2.5)
        steps += 1
        if pacer.round_over():
            break
    assert steps == 4 and pacer.last_round_steps == 1  # 4 x 2.5 s = 10 s


# ---------------------------------------------------------------------------- sites in threads


def run_paced(
    cfg: SyncSection,
    seconds: Callable[[int, int, int], float],
    *,
    num_sites: int,
    inner_steps: int,
    rounds: int,
    mode: str = "balanced",
) -> list[dict]:
    """Every site trains until its pacer's last round, then finishes; `seconds(site, round, step)`."""
    hub = Hub(num_sites)
    out: list[dict] = [{} for _ in range(num_sites)]

    def one_site(s: int) -> None:
        model = small_model()
        pacer = Pacer(mode, f"s{s}", inner_steps, rounds=rounds, round_seconds=cfg.round_seconds, tolerance=0.1)  # type: ignore[arg-type]
        sync = CrossSiteSync(
            model,
            cfg,
            transport=FakeTransport(hub, s),
            site_name=f"s{s}",
            local_rank=0,
            local_world_size=1,
            inner_steps=inner_steps,
            secret=SECRET,
            pacer=pacer,
        )
        step, arrivals, theta_checks = 0, [], []
        try:
            while not sync.run_over():
                step += 1
                drift(model, site=s, step=step)
                r = pacer.rounds_sent
                sync.after_step(step, tokens=10, seconds=seconds(s, r, pacer.steps_in_round))
                if pacer.rounds_sent > r:
                    arrivals.append(pacer.history[-1][2])
                    theta_checks.append(params_of(model))
            sync.finish(step)
        except BaseException:
            hub.barrier.abort()
            raise
        out[s] = {
            "steps": step,
            "rounds": [h[1] for h in pacer.history],
            "arrivals": arrivals,
            "weights": sync.transport.weights,  # type: ignore[attr-defined]
            "final": params_of(model),
            "pacer": pacer,
        }

    with ThreadPoolExecutor(max_workers=num_sites) as pool:
        for f in [pool.submit(one_site, s) for s in range(num_sites)]:
            f.result()
    return out


def test_balanced_sites_arrive_together_with_the_same_total_work() -> None:
    speed = [1.0, 2.0, 4.0]  # seconds per step: speeds 1, 0.5, 0.25
    sites = run_paced(SyncSection(), lambda s, r, i: speed[s], num_sites=3, inner_steps=8, rounds=5)
    # Round 1 runs H everywhere (nothing measured yet), then the measured split of 3 x 8 steps.
    for s, site in enumerate(sites):
        assert site["rounds"] == [8] + [[14, 7, 3][s]] * 4
    # Every round the total work is the configured one, and the sites reach the exchange within
    # the tolerance of each other (14, 14 and 12 s: the granularity of one step of the slowest).
    for r in range(1, 5):
        assert sum(site["rounds"][r] for site in sites) == 24
        arrivals = [site["arrivals"][r] for site in sites]
        assert max(arrivals) - min(arrivals) <= max(speed)
    # The average is weighted by tokens: the weights are each site's steps x 10 tokens.
    assert [w for w in sites[0]["weights"][:5]] == [80.0, 140.0, 140.0, 140.0, 140.0]
    for site in sites[1:]:
        for a, b in zip(sites[0]["final"], site["final"]):
            assert torch.equal(a, b)  # finish ends with every site identical


def test_a_straggler_stalls_the_others_by_at_most_the_tolerance() -> None:
    def seconds(s: int, r: int, i: int) -> float:
        if s == 1 and r >= 2:
            return 2.0  # site 1 turns 2x slower in its third round
        return 1.0

    sites = run_paced(SyncSection(), seconds, num_sites=2, inner_steps=6, rounds=5)
    planned = 6.0  # 6 steps of 1 s each
    slow = sites[1]
    assert slow["rounds"][2] < 6  # it stopped at the deadline instead of running its 6 steps
    assert slow["arrivals"][2] <= planned * 1.1 + 2.0  # the planned round plus the tolerance, plus one step
    # The next rounds are re-planned from the measured pace: the slow site gets the smaller share.
    assert slow["rounds"][4] < sites[0]["rounds"][4] and slow["rounds"][4] + sites[0]["rounds"][4] == 12
    for a, b in zip(sites[0]["final"], slow["final"]):
        assert torch.equal(a, b)


def test_alike_sites_keep_their_split_despite_noise() -> None:
    noise = [1.0, 1.4]  # 40 % apart: the 2 x 2 split is within the tolerance of the best one
    sites = run_paced(SyncSection(), lambda s, r, i: noise[s], num_sites=2, inner_steps=2, rounds=4)
    assert [site["rounds"] for site in sites] == [[2, 2, 2, 2], [2, 2, 2, 2]]


def test_budget_rounds_count_what_fits_and_weigh_by_tokens() -> None:
    speed = [1.0, 2.5]
    cfg = SyncSection(round_seconds=10.0)
    sites = run_paced(cfg, lambda s, r, i: speed[s], num_sites=2, inner_steps=4, rounds=3, mode="budget")
    assert sites[0]["rounds"] == [10, 10, 10] and sites[1]["rounds"] == [4, 4, 4]
    assert sites[0]["weights"][:3] == [100.0, 100.0, 100.0] and sites[1]["weights"][:3] == [40.0, 40.0, 40.0]
    for a, b in zip(sites[0]["final"], sites[1]["final"]):
        assert torch.equal(a, b)


def test_delayed_paced_rounds_land_one_round_late_and_end_identical() -> None:
    speed = [1.0, 3.0]
    cfg = SyncSection(strategy="delayed", balance="always")
    sites = run_paced(cfg, lambda s, r, i: speed[s], num_sites=2, inner_steps=4, rounds=4)
    # A round's exchange lands when the next round ends: the plan it carries starts one round later.
    assert sites[0]["rounds"] == [4, 4, 6, 6] and sites[1]["rounds"] == [4, 4, 2, 2]
    for a, b in zip(sites[0]["final"], sites[1]["final"]):
        assert torch.equal(a, b)


def test_pacer_state_round_trips() -> None:
    pacer = Pacer("balanced", "s0", 4, rounds=9)
    for x in (3.0, 1.0, 1.2):
        pacer.step_done(x)
    pacer.round_sent()
    pacer.observe([("s0", encode_pace(1.0)), ("s1", encode_pace(3.0))])
    copy = Pacer("balanced", "s0", 4, rounds=9)
    copy.load_state_dict(pacer.state_dict())
    assert copy.state_dict() == pacer.state_dict() and copy.planned == 6


def test_the_first_round_follows_the_catalog_then_measurement_keeps_it_when_close() -> None:
    prior = {"s0": 1.0, "s1": 2.0, "s2": 4.0}
    pacers = [Pacer("balanced", f"s{i}", 8, rounds=3, prior=prior) for i in range(3)]
    assert [p.planned for p in pacers] == [14, 7, 3]
    pacers[0].observe([("s0", encode_pace(1.05)), ("s1", encode_pace(2.0)), ("s2", encode_pace(3.9))])
    assert pacers[0].planned == 14  # within the tolerance of the best split: no change


def test_a_plans_split_starts_the_rounds_and_measurement_takes_over() -> None:
    # A plan split 16 steps as 12 + 4 (speeds 1 : 3 on paper); the sites measure 1 : 2.
    split = {"s0": 12, "s1": 4}
    pacers = [Pacer("balanced", f"s{i}", split[f"s{i}"], rounds=3, first_split=split) for i in range(2)]
    assert [p.planned for p in pacers] == [12, 4]  # the plan's split, not H or the catalog's
    for p in pacers:
        p.observe([("s0", encode_pace(1.0)), ("s1", encode_pace(2.0))])
    # The same 16 steps re-split by the measured times: 12 + 4 lasts max(12, 8) = 12 s, the best
    # split, 11 + 5, max(11, 10) = 11 s: 8 % shorter, more than the 3 % gain a re-split needs.
    assert [p.planned for p in pacers] == [11, 5]
    for p in pacers:
        p.observe([("s0", encode_pace(1.0)), ("s1", encode_pace(1.0))])
    # Now alike: 8 + 8 lasts 8 s against 11 s: taken, and the round's work stays 16 steps.
    assert [p.planned for p in pacers] == [8, 8]


def test_a_split_changes_only_for_more_than_the_rebalance_gain() -> None:
    split = {"s0": 100, "s1": 100}
    pacers = [Pacer("balanced", f"s{i}", 100, rounds=3, first_split=split) for i in range(2)]
    for p in pacers:  # 100 + 100 lasts 103 s; 101 + 99 lasts 101.97 s: 1 % shorter, kept
        p.observe([("s0", encode_pace(1.0)), ("s1", encode_pace(1.03))])
    assert [p.planned for p in pacers] == [100, 100]
    for p in pacers:  # 100 + 100 lasts 106 s; 103 + 97 lasts 103 s: 2.8 % shorter, still kept
        p.observe([("s0", encode_pace(1.0)), ("s1", encode_pace(1.06))])
    assert [p.planned for p in pacers] == [100, 100]
    strict = [Pacer("balanced", f"s{i}", 100, rounds=3, first_split=split, rebalance_gain=0.02) for i in range(2)]
    for p in strict:  # with a 2 % gain the same paces re-split
        p.observe([("s0", encode_pace(1.0)), ("s1", encode_pace(1.06))])
    assert [p.planned for p in strict] == [103, 97]


def test_the_pace_averages_the_whole_round_not_only_its_last_steps() -> None:
    pacer = Pacer("balanced", "s0", 32, rounds=3)
    for x in [5.0, 5.0] + [1.0] * 16 + [3.0] * 16:  # 2 warm-up steps, then a round of 32
        pacer.step_done(x)
    assert pacer.step_seconds == pytest.approx(3.0)  # the moving average: the last 8 steps
    assert decode_pace(pacer.pace()) == pytest.approx(2.0, rel=1e-3)  # the round's 32 measured steps
    pacer.round_sent()
    for x in [4.0] * 2:  # a short round still averages PACE_WINDOW steps
        pacer.step_done(x)
    assert decode_pace(pacer.pace()) == pytest.approx((6 * 3.0 + 2 * 4.0) / 8, rel=1e-3)
