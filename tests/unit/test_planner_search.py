"""The search: only plans that fit, balanced heterogeneous splits, risk bounds, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from atoll.config.topology import Topology
from atoll.errors import AtollError
from atoll.planner.candidates import PlanRequest
from atoll.planner.search import RISK_BUDGETS, plan
from atoll.planner.shape import PLANNER_PRESETS, ModelShape

SMALL = ModelShape(
    name="small-1b",
    num_layers=16,
    dim=2048,
    num_heads=16,
    num_kv_heads=8,
    ffn_dim=5632,
    vocab_size=32000,
    max_seq_len=2048,
)


def topo(sites: list[tuple[str, list[tuple[str, int]], float]]) -> Topology:
    return Topology.model_validate(
        {
            "name": "t",
            "sites": [{"name": n, "devices": [{"kind": k, "count": c} for k, c in devs]} for n, devs, _ in sites],
            "links": [{"site": n, "uplink_mbps": mbps, "latency_ms": 10} for n, _, mbps in sites]
            if len(sites) > 1
            else [],
        }
    )


def test_every_candidate_fits_and_uses_the_budget() -> None:
    t = topo([("a", [("a100-80g", 16)], 1000), ("b", [("h100", 8)], 1000)])
    res = plan(t, SMALL, PlanRequest(tokens=50e9, global_batch=256, seq_len=2048))
    assert res.candidates[0] is res.recommended
    budget = RISK_BUDGETS["medium"]
    for c in res.candidates:
        assert sum(sp.estimate.batch for sp in c.sites) == 256
        for sp in c.sites:
            assert all(m.fits for m in sp.estimate.memory)
        if c.sync.strategy != "ddp":
            assert c.sync.inner_steps <= budget.max_inner_steps and c.sync.codec in budget.codecs
    assert res.recommended.reasons


def test_heterogeneous_sites_reach_each_exchange_together() -> None:
    t = topo([("fast", [("h100", 16)], 10000), ("slow", [("a100-80g", 16)], 10000)])
    res = plan(t, SMALL, PlanRequest(tokens=50e9, global_batch=512, seq_len=2048, strategies=("diloco",)))
    c = res.recommended
    assert len(c.sites) == 2
    # The runtime's knob: every site the same batch, its own inner steps per round.
    assert [sp.estimate.batch for sp in c.sites] == [256, 256] and c.global_batch == 512
    h = dict(zip((sp.name for sp in c.sites), c.site_inner_steps))
    assert h["fast"] > 1.5 * h["slow"] and sum(h.values()) == 2 * c.sync.inner_steps
    rounds = [n * sp.estimate.seconds for n, sp in zip(c.site_inner_steps, c.sites)]
    slowest_step = max(sp.estimate.seconds for sp in c.sites)
    assert max(rounds) - min(rounds) <= slowest_step  # one step of slack: steps are whole
    assert c.steps % c.sync.inner_steps == 0  # whole rounds
    assert c.efficiency.rounds > 0.97


def test_mixed_kinds_inside_a_site_split_by_speed() -> None:
    t = topo([("mix", [("h100", 8), ("a100-80g", 8)], 1000)])
    res = plan(t, SMALL, PlanRequest(tokens=10e9, global_batch=256, seq_len=2048))
    est = res.recommended.sites[0].estimate
    seqs = dict(zip((g.device.kind for g in est.groups), est.sequences))
    assert sum(seqs.values()) == 256 and seqs["h100"] > seqs["a100-80g"]


def test_slow_wan_moves_away_from_ddp_and_low_risk_bounds_h() -> None:
    t = topo([("a", [("a100-80g", 16)], 100), ("b", [("a100-80g", 16)], 100)])
    medium = plan(t, SMALL, PlanRequest(tokens=100e9, global_batch=256, seq_len=2048))
    assert medium.recommended.sync.strategy != "ddp"
    assert medium.recommended.utilization > 0.8
    low = plan(t, SMALL, PlanRequest(tokens=100e9, global_batch=256, seq_len=2048, risk="low"))
    assert low.recommended.sync.inner_steps <= 100 and low.recommended.sync.codec in ("none", "fp16", "int8")
    assert low.recommended.sync.strategy != "delayed"


def test_model_that_fits_nowhere_says_how_many_devices_it_needs() -> None:
    t = topo([("a", [("a100-80g", 32)], 1000), ("b", [("a100-80g", 16)], 1000)])
    with pytest.raises(
        AtollError, match=r"gpt-1t .* fits on no site: .*needs? at least \d+ x 80 GB a100-80g \(site a has 32\)"
    ):
        plan(t, PLANNER_PRESETS["gpt-1t"], PlanRequest(tokens=1e12))


def test_site_that_mixes_backends_is_refused() -> None:
    t = topo([("mix", [("a100-80g", 8), ("ascend-910b", 8)], 1000)])
    with pytest.raises(AtollError, match="mixes devices of different collective backends.*split it"):
        plan(t, SMALL, PlanRequest(tokens=1e9))


def test_cost_objective_can_drop_a_pricey_site() -> None:
    t = topo([("cheap", [("a100-80g", 16)], 1000), ("pricey", [("h100", 8)], 1000)])
    by_cost = plan(t, SMALL, PlanRequest(tokens=20e9, global_batch=256, seq_len=2048, objective="cost"))
    by_time = plan(t, SMALL, PlanRequest(tokens=20e9, global_batch=256, seq_len=2048))
    assert by_cost.recommended.cost_usd <= by_time.recommended.cost_usd
    assert by_time.recommended.time_to_train_s <= by_cost.recommended.time_to_train_s * 1.0001


def test_topology_with_zero_bandwidth_is_refused(tmp_path: Path) -> None:
    from atoll.config.topology import load_topology

    f = tmp_path / "t.yaml"
    f.write_text(
        "name: t\nsites:\n  - {name: a, devices: [{kind: h100, count: 8}]}\n"
        "  - {name: b, devices: [{kind: h100, count: 8}]}\n"
        "links:\n  - {site: a, uplink_mbps: 0}\n  - {site: b, uplink_mbps: 100}\n"
    )
    with pytest.raises(AtollError, match="uplink_mbps"):
        load_topology(f)


def test_planner_needs_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from atoll.config.topology import load_topology\n"
        "from atoll.planner.search import plan, PlanRequest\n"
        "from atoll.planner.shape import resolve_model\n"
        "import atoll.planner.simulate, atoll.planner.montecarlo, atoll.planner.commands\n"
        "plan(load_topology('examples/topologies/two-cluster-1gbps.yaml'), resolve_model('qwen1.5-107b'),"
        " PlanRequest(tokens=1e11))\n"
        "assert 'torch' not in sys.modules\n"
    )
    from tests.conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
