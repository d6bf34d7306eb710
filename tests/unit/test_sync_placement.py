"""The placement view and the lanes, from fake holdings (no process group)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from atoll.config.topology import Topology
from atoll.errors import AtollError
from atoll.model.config import get_preset
from atoll.model.llama import Transformer
from atoll.sync.fragments import assign_owners
from atoll.sync.lanes import Lanes, canonical_pieces, shard_pieces
from atoll.sync.placement import Box, Holding, SiteView, canonical_order, describe


def model_shapes(num_layers: int = 2) -> dict[str, tuple[int, ...]]:
    model = Transformer(dataclasses.replace(get_preset("tiny"), num_layers=num_layers))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def replicated(shapes: dict[str, tuple[int, ...]], ranks: int) -> list[list[Holding]]:
    return [[Holding(n, s, Box.full(s)) for n, s in shapes.items()] for _ in range(ranks)]


def row_sharded(shapes: dict[str, tuple[int, ...]], ranks: int) -> list[list[Holding]]:
    """What FSDP2 gives each rank: dim 0 cut as torch.chunk cuts it (the last ranks may get less or nothing)."""
    out: list[list[Holding]] = [[] for _ in range(ranks)]
    for n, s in shapes.items():
        rows = torch.arange(s[0]).chunk(ranks)
        for r in range(ranks):
            if r < len(rows):
                out[r].append(Holding(n, s, Box((int(rows[r][0]),) + (0,) * (len(s) - 1), (len(rows[r]),) + s[1:])))
            else:
                out[r].append(Holding(n, s, Box((s[0],) + (0,) * (len(s) - 1), (0,) + s[1:])))
    return out


def test_box_intersection_and_index() -> None:
    a, b = Box((0, 0), (4, 6)), Box((2, 3), (4, 4))
    assert a.intersect(b) == Box((2, 3), (2, 3))
    assert a.intersect(Box((4, 0), (1, 6))) is None
    t = torch.arange(24).view(4, 6)
    inner = Box((2, 3), (2, 3))
    assert torch.equal(t[inner.within(a)], t[2:4, 3:6])
    assert inner.within(Box((2, 0), (2, 6))) == (slice(0, 2), slice(3, 6))


def test_plain_tensors_are_whole_blocks_and_a_replicated_site_keeps_the_module_order() -> None:
    model = Transformer(get_preset("tiny"))
    held = describe(model.named_parameters())
    assert all(h.box == Box.full(h.shape) for h in held)
    view = SiteView.from_holdings([held, held])
    assert view.names == [n for n, _ in model.named_parameters()]
    assert view.replicated_everywhere()


def test_canonical_order_does_not_depend_on_the_layout() -> None:
    names = list(model_shapes(4))
    stages = [[n for n in names if not n.startswith(("layers.2", "layers.3", "norm", "lm_head"))]]
    stages.append([n for n in names if n not in stages[0]])
    assert canonical_order(list(reversed(stages))) == names == canonical_order([names, names])


def test_a_view_refuses_blocks_that_do_not_tile_a_parameter() -> None:
    shape = (4, 3)
    with pytest.raises(AtollError, match="do not tile"):  # row 3 held nowhere
        SiteView.from_holdings([[Holding("w", shape, Box((0, 0), (3, 3)))]])
    with pytest.raises(AtollError, match="do not tile"):  # rows 1-2 held twice in different blocks
        SiteView.from_holdings([[Holding("w", shape, Box((0, 0), (3, 3)))], [Holding("w", shape, Box((1, 0), (3, 3)))]])
    with pytest.raises(AtollError, match="every rank of a site must build the same model"):
        SiteView.from_holdings([[Holding("w", shape, Box.full(shape))], [Holding("w", (4, 4), Box.full((4, 4)))]])


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_shard_pieces_of_a_replicated_site_are_the_owner_split(ranks: int) -> None:
    shapes = model_shapes()
    view = SiteView.from_holdings(replicated(shapes, ranks))
    owner = assign_owners({n: torch.Size(s).numel() for n, s in shapes.items()}, num_ranks=ranks)
    pieces = shard_pieces(view)
    assert [p.key for p in pieces] == list(shapes)  # whole parameters, keyed by their names
    assert {p.name: p.lane for p in pieces} == owner


def test_shard_pieces_of_an_fsdp_site_stay_where_they_are_held() -> None:
    shapes = model_shapes()
    view = SiteView.from_holdings(row_sharded(shapes, 2))
    pieces = shard_pieces(view)
    by_lane = {r: sum(p.box.numel for p in pieces if p.lane == r) for r in (0, 1)}
    assert sum(by_lane.values()) == sum(torch.Size(s).numel() for s in shapes.values())
    for p in pieces:
        assert (p.lane, p.box) in view.holders[p.name]  # each lane exchanges what it holds, once
    lanes = Lanes(view, mode="shard", num_lanes=2, rank=0)
    keys = lanes.keys(view.names)
    assert lanes.moves_inside_site(keys, write=False) == lanes.moves_inside_site(keys, write=True) == 0
    assert "embed.weight[0:256,0:64]" in keys  # a block's key names its rows and columns


def test_canonical_pieces_are_whole_parameters_and_moves_count_what_lanes_lack() -> None:
    shapes = model_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    sharded = SiteView.from_holdings(row_sharded(shapes, 2))
    pieces = canonical_pieces(sharded, num_lanes=2)
    assert [p.key for p in pieces] == list(shapes)
    assert {p.name: p.lane for p in pieces} == assign_owners(
        {n: torch.Size(s).numel() for n, s in shapes.items()}, num_ranks=2
    )
    lanes = Lanes(sharded, mode="canonical", num_lanes=2, rank=0)
    keys = lanes.keys(sharded.names)
    moved = lanes.moves_inside_site(keys, write=False)
    assert 0 < moved < numel and moved == lanes.moves_inside_site(keys, write=True)
    one_lane = Lanes(sharded, mode="canonical", num_lanes=1, rank=1)
    assert not one_lane.is_lane and one_lane.owned(sharded.names) == []
    assert one_lane.moves_inside_site(keys, write=False) == sum(  # rank 1's rows go to lane 0
        b.numel for n in sharded.names for r, b in sharded.holders[n] if r == 1
    )
    replicated_view = SiteView.from_holdings(replicated(shapes, 2))
    ddp = Lanes(replicated_view, mode="canonical", num_lanes=2, rank=0)
    assert ddp.moves_inside_site(keys, write=False) == 0  # a DDP lane holds its parameters already
    assert ddp.moves_inside_site(keys, write=True) == numel  # each goes to the other replica once


def test_lanes_refuse_more_lanes_than_ranks() -> None:
    view = SiteView.from_holdings(replicated(model_shapes(), 1))
    with pytest.raises(AtollError, match="at least as many ranks as there are lanes"):
        Lanes(view, mode="canonical", num_lanes=2, rank=0)


def topology(sites: list[dict[str, object]]) -> Topology:
    entries = [{"devices": [{"kind": "cpu", "count": 1}], **s} for s in sites]
    links = [{"site": s["name"], "uplink_mbps": 100.0} for s in sites]
    return Topology.model_validate({"name": "t", "sites": entries, "links": links})


def test_the_lane_plan_is_shard_to_shard_only_for_identical_sites() -> None:
    same = topology([{"name": "a", "parallel": {"shard": "fsdp"}}, {"name": "b", "parallel": {"shard": "fsdp"}}])
    assert same.lane_plan(default_ranks=4) == ("shard", 4)
    mixed = topology([{"name": "a"}, {"name": "b", "parallel": {"shard": "fsdp"}}])
    assert mixed.lane_plan(default_ranks=4) == ("canonical", 4)
    sizes = topology([{"name": "a", "ranks": 8}, {"name": "b", "ranks": 2}])
    assert sizes.lane_plan(default_ranks=4) == ("canonical", 2)
    assert topology([{"name": "a", "ranks": 3}, {"name": "b"}]).lane_plan(default_ranks=3) == ("shard", 3)


def test_a_site_parallel_entry_is_checked_naming_the_site() -> None:
    with pytest.raises(ValueError, match="site b: parallel.tensor is not a parallel setting"):
        topology([{"name": "a"}, {"name": "b", "parallel": {"tensor": 2}}])
    with pytest.raises(ValueError, match="site b: parallel"):
        topology([{"name": "a"}, {"name": "b", "parallel": {"shard": "zero3"}}])
    assert topology([{"name": "a", "parallel": {"shard": "fsdp"}}]).sites[0].parallel_overrides() == [
        '--parallel.shard="fsdp"'
    ]


def test_a_rank_refuses_a_site_size_other_than_its_topology_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import yaml

    from atoll.config.schema import SyncSection
    from atoll.sync.join import sync_for_site
    from atoll.sync.site_env import SiteEnv

    sites = [{"name": "east", "ranks": 2}, {"name": "west", "ranks": 1}]
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(topology(sites).model_dump(mode="json")), encoding="utf-8")
    monkeypatch.setenv("ATOLL_RUN_SECRET", "a-secret-of-at-least-16-bytes")
    env = SiteEnv(site="east", index=0, num_sites=2, topology=path, lighthouse="http://127.0.0.1:1")
    with pytest.raises(AtollError, match="site east runs 1 rank\\(s\\) but its topology entry says ranks: 2"):
        sync_for_site(Transformer(get_preset("tiny")), SyncSection(), env, local_rank=0, local_world_size=1)


def test_cross_site_ddp_refuses_sites_whose_inner_steps_would_round_differently() -> None:
    from atoll.config.schema import ParallelSection, SyncSection
    from atoll.config.topology import check_sites

    ddp, diloco = SyncSection(strategy="ddp"), SyncSection(strategy="diloco")
    mixed = topology([{"name": "a"}, {"name": "b", "parallel": {"shard": "fsdp"}}])
    with pytest.raises(AtollError, match="sync.strategy=ddp needs the same intra-site layout"):
        check_sites(mixed, sync=ddp, parallel=ParallelSection(), topology_path="t.yaml")
    check_sites(mixed, sync=diloco, parallel=ParallelSection(), topology_path="t.yaml")
    sizes = topology([{"name": "a", "ranks": 2}, {"name": "b", "ranks": 1}])
    check_sites(sizes, sync=ddp, parallel=ParallelSection(), topology_path="t.yaml")  # DDP sites step alike
    with pytest.raises(AtollError, match="sync.strategy=ddp"):
        check_sites(sizes, sync=ddp, parallel=ParallelSection(shard="fsdp"), topology_path="t.yaml")
