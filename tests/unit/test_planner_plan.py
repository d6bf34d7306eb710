"""plan.yaml: written from a search result, read back, validated, and checked by a trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from atoll.config.topology import Topology
from atoll.errors import AtollError
from atoll.planner.candidates import PlanRequest
from atoll.planner.plan import (
    LONG_RUN_OUTER,
    SHORT_RUN_OUTER,
    SHORT_RUN_ROUNDS,
    load_plan,
    outer_settings,
    plan_from_candidate,
    plan_settings,
    unhonored,
    write_plan,
)
from atoll.planner.search import plan
from atoll.planner.shape import ModelShape

SHAPE = ModelShape(
    name="small", num_layers=8, dim=1024, num_heads=8, num_kv_heads=8, ffn_dim=2816, vocab_size=32000, max_seq_len=2048
)
TOPO = Topology.model_validate(
    {
        "name": "t",
        "sites": [
            {"name": "a", "devices": [{"kind": "h100", "count": 8}]},
            {"name": "b", "devices": [{"kind": "a100-80g", "count": 4}, {"kind": "a800", "count": 4}]},
        ],
        "links": [{"site": "a", "uplink_mbps": 200}, {"site": "b", "uplink_mbps": 200}],
    }
)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    res = plan(
        TOPO, SHAPE, PlanRequest(tokens=5e9, global_batch=64, seq_len=2048, strategies=("diloco",), all_sites=True)
    )
    p = plan_from_candidate(
        res.recommended, model=SHAPE.name, model_params=SHAPE.num_params(), topology="t.yaml", tokens=5e9
    )
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    write_plan(p, path)
    return path


def test_round_trip(written: Path) -> None:
    p = load_plan(written)
    assert p.sync.strategy == "diloco" and p.sync.inner_steps > 1
    assert sum(s.batch for s in p.sites) == p.global_batch == 64
    assert {s.name for s in p.sites} == {"a", "b"}
    mixed = p.site("b")
    assert sum(d.sequences or 0 for d in mixed.devices) == mixed.batch
    assert p.predicted is not None and 0 < p.predicted.utilization <= 1
    assert p.reasons


def test_the_outer_step_follows_the_run_length(written: Path) -> None:
    # Short runs get the sweep's winner (damped averaging), long ones DiLoCo's Nesterov step.
    assert outer_settings(16) == SHORT_RUN_OUTER == (0.6, 0.0)
    assert outer_settings(SHORT_RUN_ROUNDS - 1) == SHORT_RUN_OUTER
    assert outer_settings(SHORT_RUN_ROUNDS) == LONG_RUN_OUTER == (0.7, 0.9)
    p = load_plan(written)
    rounds = p.steps // p.sync.inner_steps
    assert (p.sync.outer_lr, p.sync.outer_momentum) == outer_settings(rounds)
    assert plan_settings(p)["sync.outer_lr"] == outer_settings(rounds)[0]


def test_settings_and_unhonored(written: Path) -> None:
    p = load_plan(written)
    settings = plan_settings(p)
    assert settings["sync.strategy"] == "diloco"
    assert "sites.a.layout.tp" in settings and "predicted" not in " ".join(settings)
    # A trainer that implements only DiLoCo without compression and plain data parallelism:
    rejected = unhonored(p, lambda k, v: not k.endswith((".tp", ".pp")) or v == 1)
    assert all(".tp=" in r or ".pp=" in r for r in rejected)


def test_bad_plan_is_one_line_error(tmp_path: Path, written: Path) -> None:
    text = written.read_text().replace("strategy: diloco", "strategy: gossip")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(AtollError, match=r"sync.strategy") as err:
        load_plan(bad)
    assert "\n" not in str(err.value)
    bad.write_text(written.read_text().replace("global_batch: 64", "global_batch: 65"))
    with pytest.raises(AtollError, match="add up to 64, but global_batch is 65"):
        load_plan(bad)
