"""The simulators against the analytic model (no jitter, no failures), and their disturbances."""

from __future__ import annotations

from pathlib import Path

import pytest

from atoll.planner.montecarlo import time_to_train
from atoll.planner.simulate import Disturbances, SimSite, SimSync, simulate
from atoll.planner.timeline import draw_timeline, merged_spans
from atoll.planner.wan import exposed_per_round
from atoll.sync.link_model import WanLink, allgather_bytes, allgather_latency, allgather_seconds

LINKS = [WanLink("a", 1e8, 1e8, 0.01), WanLink("b", 5e7, 1e8, 0.02), WanLink("c", 1e8, 2e8, 0.005)]
STEP = {"a": 1.0, "b": 0.8, "c": 1.0}
PAYLOAD = 2e9  # bytes per site of a full exchange


def sites() -> list[SimSite]:
    return [SimSite(link.name, STEP[link.name], 1000, 8, link, failure_rate_per_s=1e-4) for link in LINKS]


def sync(strategy: str, h: int, *, fragments: int = 1, tau: int = 0) -> tuple[SimSync, float]:
    volume = allgather_bytes(PAYLOAD, 3)
    full = allgather_seconds(PAYLOAD, LINKS)
    return SimSync(strategy, h, volume, LATENCY, fragments, tau), full  # type: ignore[arg-type]


LATENCY = allgather_latency(LINKS)


@pytest.mark.parametrize(
    ("strategy", "h", "fragments", "tau", "rel"),
    [
        ("ddp", 1, 1, 0, 1e-9),
        ("diloco", 10, 1, 0, 1e-9),
        ("delayed", 100, 1, 0, 1e-9),
        ("streaming", 20, 4, 2, 1e-9),
        ("streaming", 40, 4, 1, 1e-9),
        # Rounds shorter than the exchange: the next exchange starts before the last one ends and the
        # two share the links, which the analytic model does not see.
        ("delayed", 10, 1, 0, 0.01),
    ],
)
def test_event_simulator_matches_the_analytic_model(
    strategy: str, h: int, fragments: int, tau: int, rel: float
) -> None:
    s, full = sync(strategy, h, fragments=fragments, tau=tau)
    per_round = (
        exposed_per_round(
            strategy,
            inner_steps=h,
            step_s=1.0,
            sync_s=full,
            fragments=fragments,  # type: ignore[arg-type]
            overlap_steps=tau,
            latency_s=LATENCY,
        )
        + h * 1.0
    )
    # Rounds 11..20 are steady state for every strategy (delayed waits from round 2 on).
    r10 = simulate(sites(), s, num_steps=10 * h).wall_s
    r20 = simulate(sites(), s, num_steps=20 * h).wall_s
    assert (r20 - r10) / 10 == pytest.approx(per_round, rel=rel)


def test_monte_carlo_without_disturbances_is_the_analytic_time() -> None:
    _, full = sync("diloco", 50)
    res = time_to_train(sites(), strategy="diloco", inner_steps=50, sync_s=full, total_steps=5000, trials=3)
    assert res.seconds[0] == pytest.approx(100 * (50 * 1.0 + full), rel=1e-9)
    assert res.utilization == pytest.approx((8 * 50 + 8 * 40 + 8 * 50) / (24 * (50 + full)), rel=1e-9)


def test_jitter_stragglers_and_failures_slow_the_run_down() -> None:
    _, full = sync("diloco", 50)
    calm = time_to_train(sites(), strategy="diloco", inner_steps=50, sync_s=full, total_steps=5000, trials=5)
    rough = time_to_train(
        sites(),
        strategy="diloco",
        inner_steps=50,
        sync_s=full,
        total_steps=5000,
        trials=5,
        disturbances=Disturbances(jitter=0.1, straggler_prob=0.02, failures=True, seed=3),
    )
    assert rough.days_p50 > calm.days_p50 and rough.failures > 0
    ddp = time_to_train(
        sites()[:1],
        strategy="ddp",
        inner_steps=1,
        sync_s=0.0,
        total_steps=20000,
        trials=5,
        disturbances=Disturbances(failures=True, recovery_s=600, seed=1),
        checkpoint_interval_s=3600,
    )
    assert ddp.days_p50 > 20000 / 86400


def test_link_sharing_splits_bandwidth() -> None:
    # One site's failure makes it download its state while the others exchange: the two share
    # the same downlink, so the exchange takes longer than alone.
    s, _ = sync("diloco", 5)
    alone = simulate(sites(), s, num_steps=10).wall_s
    heal = Disturbances(fail_at=(("a", 0.5),), recovery_s=1.0, heal_bytes=5e9)
    with_heal = simulate(sites(), s, num_steps=10, disturbances=heal)
    assert with_heal.failures == 1
    heal_seg = next(seg for seg in with_heal.segments if seg.kind == "heal")
    # 5 GB through b's 50 MB/s uplink, shared with b's own exchange traffic: over 100 s.
    assert heal_seg.end - heal_seg.start > 5e9 / 5e7
    assert with_heal.wall_s > alone
    assert with_heal.tokens < 3 * 10 * 1000


def test_ddp_failure_redoes_work_since_checkpoint() -> None:
    s, _ = sync("ddp", 1)
    base = simulate(sites(), s, num_steps=20)
    hit = simulate(
        sites(),
        s,
        num_steps=20,
        disturbances=Disturbances(fail_at=(("b", base.wall_s / 2),), recovery_s=30.0, checkpoint_steps=5),
    )
    # Failing mid-way through step 10's sync rolls back to step 5: 30 s down plus 5 steps redone.
    assert hit.wall_s > base.wall_s + 30.0 + 4 * 1.0
    assert hit.tokens == base.tokens  # the redone steps replace the lost ones


def test_timeline_png(tmp_path: Path) -> None:
    s, _ = sync("delayed", 10)
    res = simulate(sites(), s, num_steps=30)
    spans = merged_spans(res)
    assert len(spans[("a", "compute")]) <= 3  # back-to-back steps are one bar
    out = draw_timeline(res, ["a", "b", "c"], tmp_path / "t.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("strategy", "fragments", "tau"), [("delayed", 1, 0), ("streaming", 4, 30)])
def test_a_run_ends_with_its_last_exchange_applied(strategy: str, fragments: int, tau: int) -> None:
    # The exchanges hide behind compute (H=100 steps of 1 s; one full exchange ~80 s, a fragment's
    # ~20 s < tau), except at the end: the last exchange is waited for, as atoll's
    # CrossSiteSync.finish does, so every site ends with the same weights. Streaming flushes at
    # step 200 fragment 0 (due) and the three sent earlier; together they move one full payload.
    s, full = sync(strategy, 100, fragments=fragments, tau=tau)
    res = simulate(sites(), s, num_steps=200)
    assert res.wall_s == pytest.approx(200 * 1.0 + full, rel=1e-6)
