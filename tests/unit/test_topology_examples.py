"""Every example topology loads and plans, in seconds, with the model it was written for."""

from __future__ import annotations

from pathlib import Path

import pytest

from atoll.config.topology import load_topology
from atoll.planner.candidates import PlanRequest
from atoll.planner.search import plan
from atoll.planner.shape import resolve_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "topologies"
SCENARIOS = {
    "two-cluster-1gbps": ("qwen1.5-107b", 100e9),
    "mixed-vendors": ("llama3-70b", 200e9),
    "three-continents": ("llama3-10b", 1e12),
    "one-cluster": ("gpt-145b", 300e9),
}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_topology_loads(path: Path) -> None:
    assert load_topology(path).sites


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_example_plans(name: str) -> None:
    model, tokens = SCENARIOS[name]
    topology = load_topology(EXAMPLES / f"{name}.yaml")
    assert model in topology.description or name == "one-cluster"
    assert set(SCENARIOS) <= {p.stem for p in EXAMPLES.glob("*.yaml")}
    res = plan(topology, resolve_model(model), PlanRequest(tokens=tokens))
    rec = res.recommended
    assert rec.days > 0 and rec.reasons
    assert all(m.fits for sp in rec.sites for m in sp.estimate.memory)
    if len(topology.sites) > 1:
        # Every multi-site example sits on a WAN far too slow for per-step all-reduce.
        assert rec.sync.strategy != "ddp" and rec.utilization > 0.9


def test_lab_topology_plans_the_demo_model_away_from_ddp() -> None:
    from atoll.planner.shape import ModelShape

    # The demo preset's shape, written out so that this test needs no torch.
    demo = ModelShape(
        name="demo",
        num_layers=4,
        dim=256,
        num_heads=8,
        num_kv_heads=4,
        ffn_dim=768,
        vocab_size=8192,
        max_seq_len=256,
        tie_embeddings=True,
    )
    res = plan(
        load_topology(EXAMPLES / "lab-two-sites.yaml"),
        demo,
        PlanRequest(tokens=2e6, global_batch=16, seq_len=256, all_sites=True),
    )
    assert res.recommended.sync.strategy != "ddp"
