from pathlib import Path

import pytest

from atoll.config import RunConfig, load_config
from atoll.errors import AtollError
from atoll.planner.apply import plan_overrides
from atoll.planner.plan import Plan

REPO = Path(__file__).resolve().parents[2]


def make_plan(**site_b: object) -> Plan:
    site = {"name": "east", "devices": [{"kind": "cpu", "count": 1}], "batch": 8, "inner_steps": 20}
    other = {"name": "west", "devices": [{"kind": "cpu", "count": 1}], "batch": 8, "inner_steps": 30, **site_b}
    return Plan.model_validate(
        {
            "model": "demo",
            "model_params": 5_245_184,
            "topology": "t.yaml",
            "tokens": 1e6,
            "seq_len": 128,
            "global_batch": 8 + int(other["batch"]),
            "steps": 200,
            "sync": {"strategy": "delayed", "inner_steps": 20, "codec": "int4", "quant_block": 64},
            "sites": [site, other],
        }
    )


def test_plan_settings_become_config_overrides() -> None:
    args, ignored = plan_overrides(make_plan())
    cfg = load_config(RunConfig, REPO / "examples" / "configs" / "demo.yaml", args)
    assert (cfg.sync.strategy, cfg.sync.inner_steps, cfg.sync.codec, cfg.sync.block_size) == ("delayed", 20, "int4", 64)
    assert cfg.sync.site_inner_steps == {"west": 30}
    assert cfg.sync.balance == "always"  # the plan's split starts the rounds; measurement takes over
    assert (cfg.data.seq_len, cfg.train.steps, cfg.train.global_batch, cfg.train.micro_batch) == (128, 200, 8, 1)
    # The planner's default zero 1 with one replica per site shards nothing: no override.
    assert (cfg.parallel.tp, cfg.parallel.zero, cfg.parallel.recompute) == (1, None, "none")
    assert ignored == []


def test_what_cannot_be_honored_is_listed() -> None:
    _, ignored = plan_overrides(make_plan(batch=4, layout={"tp": 2, "pp": 2, "dp": 2, "zero": 2}))
    assert "sites.east.batch=8" in ignored and "sites.west.batch=4" in ignored
    # One config serves every site: layouts that differ between sites cannot be honored.
    assert "sites.west.layout.tp=2" in ignored and "sites.east.layout.tp=1" in ignored
    assert "sites.west.layout.pp=2" in ignored and "sites.west.layout.zero=2" in ignored


def test_a_layout_every_site_shares_becomes_parallel_overrides() -> None:
    layout = {"tp": 2, "pp": 2, "vp": 2, "dp": 2, "zero": 3, "recompute": "selective", "sequence_parallel": True}
    plan = make_plan(layout=layout)
    for site in plan.sites:
        site.layout = site.layout.model_validate(layout)
    args, ignored = plan_overrides(plan)
    assert ignored == []
    cfg = load_config(RunConfig, REPO / "examples" / "configs" / "demo.yaml", args)
    p = cfg.parallel
    assert (p.tp, p.pp, p.vp, p.pp_schedule, p.zero) == (2, 2, 2, "interleaved_1f1b", 3)
    assert (p.recompute, p.sequence_parallel) == ("selective", True)


def test_sites_of_mixed_devices_keep_whole_replicas() -> None:
    plan = make_plan(
        devices=[{"kind": "a100-80g", "count": 2, "sequences": 6}, {"kind": "h20", "count": 2, "sequences": 2}],
        layout={"tp": 2, "dp": 2, "zero": 1, "recompute": "full"},
    )
    args, ignored = plan_overrides(plan)
    assert "sites.west.layout.tp=2" in ignored and "sites.west.layout.zero=1" in ignored
    assert "--parallel.recompute=full" not in args  # east keeps none: the sites differ
    assert not any(a.startswith(("--parallel.tp", "--parallel.zero")) for a in args)


def test_planner_predicts_the_efficiency_of_uneven_sites_and_ranks() -> None:
    from atoll.planner.hetero import ranks_efficiency, sites_efficiency

    speeds = [1.0, 2.0, 4.0]  # seconds per step
    # Equal H: every round lasts 4 H, the sites do 3 H steps where alone they would do 1.75 x 4 H.
    assert sites_efficiency(speeds, inner_steps=8, policy="equal") == pytest.approx(3 / (4 * 1.75))
    # Balanced: 14, 7, 3 steps in 14 s.
    assert sites_efficiency(speeds, inner_steps=8, policy="balanced") == pytest.approx(24 / 14 / 1.75)
    assert sites_efficiency([1.0, 1.0], inner_steps=8, policy="balanced", exchange_seconds=2.0) == pytest.approx(0.8)
    # Two ranks at 1 and 2 s per sample, 4 samples: equal 2 + 2 takes 4 s; balanced 3 + 1 takes 3 s.
    assert ranks_efficiency([1.0, 2.0], global_batch=4, policy="equal") == pytest.approx(4 / 4 / 1.5)
    assert ranks_efficiency([1.0, 2.0], global_batch=4, policy="balanced") == pytest.approx(4 / 3 / 1.5)


def test_a_plans_per_device_sequences_become_where_the_ranks_start() -> None:
    plan = make_plan(
        devices=[{"kind": "a100-80g", "count": 2, "sequences": 6}, {"kind": "h20", "count": 2, "sequences": 2}]
    )
    args, ignored = plan_overrides(plan)
    cfg = load_config(RunConfig, REPO / "examples" / "configs" / "demo.yaml", args)
    assert cfg.parallel.device_shares == {"a100-80g": 3.0, "h20": 1.0}
    assert not [i for i in ignored if ".sequences" in i]


def test_sites_of_different_layouts_get_them_through_the_topology() -> None:
    from atoll.config.topology import Topology
    from atoll.planner.apply import site_layouts, with_site_layouts

    plan = make_plan(layout={"tp": 2, "pp": 2, "dp": 1, "micro_batch": 2, "recompute": "full"})
    _, ignored = plan_overrides(plan, per_site=True)
    assert ignored == ["sites.east.layout.micro_batch=1", "sites.west.layout.micro_batch=2"]  # a train.* key
    layouts = site_layouts(plan)
    assert layouts == {
        "east": {"tp": 1, "pp": 1, "recompute": "none"},
        "west": {"tp": 2, "pp": 2, "vp": 1, "recompute": "full"},
    }
    sites = [{"name": n, "devices": [{"kind": "cpu", "count": 4}]} for n in ("east", "west")]
    topo = Topology.model_validate(
        {
            "name": "t",
            "sites": sites,
            "links": [{"site": "east", "uplink_mbps": 100}, {"site": "west", "uplink_mbps": 100}],
        }
    )
    topo.sites[1].parallel = {"shard": "fsdp"}
    planned = with_site_layouts(topo, layouts, plan_path=Path("plan.yaml"))
    assert planned.site("west").parallel == {"shard": "fsdp", **layouts["west"]}  # the plan's keys added
    assert planned.lane_plan(default_ranks=4) == ("canonical", 4)  # different layouts: whole tensors
    with pytest.raises(AtollError, match="lacks"):
        with_site_layouts(topo, {"north": {"tp": 2}}, plan_path=Path("plan.yaml"))
