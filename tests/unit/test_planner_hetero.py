"""The planner plans what the runtime runs on uneven sites, and predicts the run's efficiency."""

from __future__ import annotations

from pathlib import Path

import pytest

from atoll.config.topology import Topology, load_topology
from atoll.data.shares import split_counts
from atoll.errors import AtollError
from atoll.planner.apply import plan_overrides
from atoll.planner.candidates import PlanRequest
from atoll.planner.hetero import SitePace, predict_efficiency, rank_step, ranks_efficiency, sites_efficiency
from atoll.planner.plan import plan_from_candidate
from atoll.planner.search import plan
from atoll.planner.shape import resolve_model
from atoll.sync.pacing import split_steps

REPO = Path(__file__).resolve().parents[2]
TINY = resolve_model("tiny")


def lab(slowdowns: list[float], *, mbps: float = 1000.0) -> Topology:
    names = ["east", "west", "north"][: len(slowdowns)]
    return Topology.model_validate(
        {
            "name": "lab",
            "sites": [
                {"name": n, "devices": [{"kind": "cpu", "count": 1, "per_node": 1, "slowdown": s}]}
                for n, s in zip(names, slowdowns)
            ],
            "links": [{"site": n, "uplink_mbps": mbps, "latency_ms": 2} for n in names],
        }
    )


def request(**kw: object) -> PlanRequest:
    args = {"tokens": 2e6, "global_batch": 24, "seq_len": 64, "all_sites": True, **kw}
    return PlanRequest(**args)  # type: ignore[arg-type]


def test_homogeneous_sites_lose_only_the_exchange() -> None:
    # Three alike sites, 2 s of exposed exchange per round of 3 x 8 one-second steps.
    alike = [SitePace(n, 8, 1.0, 4, 4.0) for n in "abc"]
    eff = predict_efficiency(alike, exchange_seconds=2.0)
    assert eff.efficiency == pytest.approx(8 / 10) and (eff.ranks, eff.rounds) == (1.0, 1.0)
    # A planned homogeneous run (diloco: the exchange is not overlapped): 1 - its exchange share.
    res = plan(lab([1, 1, 1], mbps=50), TINY, request(strategies=("diloco",)))
    c = res.recommended
    assert c.site_inner_steps == (c.sync.inner_steps,) * 3
    round_compute = c.sync.inner_steps * c.compute_step_s
    expected = round_compute / (round_compute + c.sync_s)
    assert 0.5 < expected < 0.999  # the exchange is visible at 50 Mbit/s
    assert c.efficiency.efficiency == pytest.approx(expected, rel=1e-9)
    assert c.efficiency.ranks == pytest.approx(1.0) and c.efficiency.rounds == pytest.approx(1.0)


def test_alike_multi_device_sites_lose_only_micro_batch_rounding_and_the_exchange() -> None:
    two = Topology.model_validate(
        {
            "name": "two",
            "sites": [{"name": n, "devices": [{"kind": "h100", "count": 16}]} for n in ("a", "b")],
            "links": [{"site": n, "uplink_mbps": 1000, "latency_ms": 10} for n in ("a", "b")],
        }
    )
    req = PlanRequest(tokens=20e9, global_batch=250, seq_len=4096, strategies=("diloco",), all_sites=True)
    c = plan(two, resolve_model("llama3-8b"), req).recommended
    est = c.sites[0].estimate
    slots = est.layout.dp * est.micro_batches[0] * est.layout.micro_batch  # sequences the replicas could run
    assert est.batch == 125 and slots > est.batch  # 125 does not divide evenly
    eff = c.efficiency
    assert eff.ranks == pytest.approx(est.batch / slots) and eff.rounds == pytest.approx(1.0)
    round_compute = c.sync.inner_steps * c.compute_step_s
    assert eff.exchange == pytest.approx(round_compute / (round_compute + c.sync_s))


def test_sites_at_speeds_1_half_quarter_round_their_inner_steps() -> None:
    steps = [1.0, 2.0, 4.0]  # seconds per step: speeds 1, 0.5, 0.25; alone 1.75 steps/s together
    # H = 8: 24 steps split 14/7/3 (the runtime's split); the round lasts 14 s (the slow site 12).
    assert split_steps(24, steps) == [14, 7, 3]
    paces = [SitePace(n, h, t, 8, 8 / t) for n, h, t in zip("abc", [14, 7, 3], steps)]
    eff = predict_efficiency(paces, exchange_seconds=1.0)
    assert eff.efficiency == pytest.approx(24 / 15 / 1.75)
    assert eff.rounds == pytest.approx(24 / 14 / 1.75) and eff.exchange == pytest.approx(14 / 15)
    assert eff.sites == pytest.approx({"a": 14 / 15, "b": 14 / 15, "c": 12 / 15})
    # H = 2: 6 steps split 4/1/1, a round of 4 s where 3.43 s would do.
    assert sites_efficiency(steps, inner_steps=2, policy="balanced") == pytest.approx(6 / 4 / 1.75)
    assert sites_efficiency(steps, inner_steps=8, policy="equal") == pytest.approx(24 / 32 / 1.75)


def test_a_site_of_two_speeds_rounds_shares_and_micro_batches() -> None:
    # Ranks at 1 and 0.5 (1 and 2 s per sample), 7 samples in micro-batches of 2: shares 5 + 2
    # (largest remainder of 4.67 + 2.33); rank 0 runs 3 micro-batches (6 s), rank 1 one (4 s).
    step, solo, counts = rank_step([1.0, 2.0], batch=7, micro_batch=2)
    assert (counts, step, solo) == ([5, 2], 6.0, 1.5)
    assert ranks_efficiency([1.0, 2.0], global_batch=7, policy="balanced", micro_batch=2) == pytest.approx(7 / 6 / 1.5)
    # At least one sample each, even for a rank 10x slower with a batch of 3.
    assert rank_step([1.0, 10.0], batch=3)[2] == [2, 1]
    assert ranks_efficiency([1.0, 10.0], global_batch=3, policy="balanced") == pytest.approx(3 / 10 / 1.1)


def test_uneven_sites_get_the_same_batch_and_inner_steps_by_speed() -> None:
    res = plan(lab([1, 2, 4]), TINY, request(strategies=("diloco",)))
    c = res.recommended
    assert [sp.estimate.batch for sp in c.sites] == [8, 8, 8]
    times = [sp.estimate.seconds for sp in c.sites]
    assert times[1] == pytest.approx(2 * times[0], rel=0.01) and times[2] == pytest.approx(4 * times[0], rel=0.01)
    assert list(c.site_inner_steps) == split_steps(3 * c.sync.inner_steps, times)
    assert c.site_inner_steps[0] > c.site_inner_steps[1] > c.site_inner_steps[2]
    eff = c.efficiency
    assert eff.efficiency == pytest.approx(eff.ranks * eff.rounds * eff.exchange)
    assert eff.efficiency > 0.9 and eff.rounds < 1.0
    # Equal H would leave the fast sites idle most of each round: the planner says so.
    assert sites_efficiency(times, inner_steps=c.sync.inner_steps, policy="equal") < 0.5


def test_mixed_devices_split_like_the_runtime() -> None:
    t = load_topology(REPO / "examples" / "topologies" / "a100-ascend.yaml")
    c = plan(t, resolve_model("llama3-8b"), PlanRequest(tokens=20e9, all_sites=True)).recommended
    nvidia = c.sites[0].estimate
    assert [g.device.kind for g in nvidia.groups] == ["a100-80g", "h20"]
    assert sum(nvidia.sequences) == nvidia.batch == c.sites[1].estimate.batch
    # The planner's per-group sequences are the runtime's per-replica split, summed.
    replicas = nvidia.replicas
    speeds = [nvidia.sequences[i] / replicas[i] for i in range(2)]
    counts = split_counts(nvidia.batch, [speeds[0]] * replicas[0] + [speeds[1]] * replicas[1])
    assert [sum(counts[: replicas[0]]), sum(counts[replicas[0] :])] == list(nvidia.sequences)
    assert 0.9 < c.efficiency.ranks < 1.0


def test_a_heterogeneous_plan_is_honoured_by_the_trainer() -> None:
    topology = REPO / "examples" / "topologies" / "lab-two-speeds.yaml"
    res = plan(load_topology(topology), TINY, request(global_batch=16))
    c = res.recommended
    p = plan_from_candidate(c, model="tiny", model_params=TINY.num_params(), topology=str(topology), tokens=2e6)
    east, west = p.sites
    assert east.batch == west.batch == 8 and east.inner_steps > west.inner_steps
    assert p.predicted is not None and p.predicted.efficiency == pytest.approx(c.efficiency.efficiency, abs=1e-4)
    assert west.predicted is not None and west.predicted.efficiency is not None
    overrides, unhonored = plan_overrides(p)
    assert "--train.global_batch=8" in overrides
    if p.sync.strategy in ("diloco", "delayed"):
        assert f"--sync.site_inner_steps={{east: {east.inner_steps}, west: {west.inner_steps}}}" in overrides
        assert "--sync.balance=always" in overrides  # the plan's split starts the run, then it is re-measured
    assert not [u for u in unhonored if ".batch=" in u or ".inner_steps=" in u or ".devices." in u]


def test_a_run_too_short_for_its_rounds_is_refused_by_name() -> None:
    with pytest.raises(AtollError, match=r"26 steps of 16 x 64 tokens, too few for 10 outer rounds .* raise --tokens"):
        plan(lab([1, 2]), TINY, request(tokens=26e3, global_batch=16, strategies=("diloco",)))


def test_the_simulators_play_per_site_rounds_as_planned() -> None:
    from atoll.planner.playback import play
    from atoll.planner.simulate import Disturbances

    c = plan(lab([1, 2, 4], mbps=50), TINY, request(strategies=("diloco",))).recommended
    assert len(set(c.site_inner_steps)) == 3
    pb = play(c, TINY, disturbances=Disturbances(), trials=1)
    # Without jitter or failures, both simulators agree with the analytic model's per-site rounds.
    assert pb.horizon.seconds[0] == pytest.approx(c.steps * c.wall_step_s, rel=1e-6)  # no failures drawn
    assert pb.horizon.utilization == pytest.approx(c.utilization, rel=1e-6)
