import dataclasses
from collections.abc import Iterator

import pytest
import torch

from atoll.errors import AtollError
from atoll.model.config import get_preset
from atoll.model.llama import Transformer
from atoll.sync.fragments import (
    StreamingSchedule,
    gather_shard,
    scatter_shard,
    shard_layout,
    split_fragments,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def params_of(numels: list[int], *, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).view(-1, 1) if n else torch.zeros(0) for n in numels]


NUMELS = [[7, 0, 13, 1, 64], [5], [1, 1, 1], [100, 3, 250]]


@pytest.mark.parametrize("numels", NUMELS)
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 7, 8])
def test_shards_cover_every_element_once_and_are_balanced(numels: list[int], num_shards: int) -> None:
    layout = shard_layout(numels, num_shards=num_shards)
    covered = [torch.zeros(n, dtype=torch.int64) for n in numels]
    sizes = []
    for shard in range(num_shards):
        offset = 0
        for piece in layout.pieces(shard):
            assert piece.offset == offset and piece.numel > 0
            covered[piece.param][piece.start : piece.stop] += 1
            offset += piece.numel
        assert offset == layout.shard_numel(shard)
        sizes.append(offset)
    assert all(torch.all(c == 1) for c in covered)
    assert sum(sizes) == sum(numels) and max(sizes) - min(sizes) <= 1


def test_layout_from_tensors_and_bad_shard_count() -> None:
    params = params_of([3, 4])
    assert shard_layout(params, num_shards=2).bounds == (0, 4, 7)
    with pytest.raises(AtollError, match="num_shards"):
        shard_layout(params, num_shards=0)


@pytest.mark.parametrize("numels", NUMELS)
@pytest.mark.parametrize("num_shards", [1, 3, 4])
def test_gather_scatter_round_trip(numels: list[int], num_shards: int) -> None:
    params = params_of(numels)
    layout = shard_layout(params, num_shards=num_shards)
    flats = [gather_shard(params, layout, s) for s in range(num_shards)]
    assert torch.equal(torch.cat(flats), torch.cat([p.reshape(-1) for p in params]))
    restored = [torch.zeros_like(p) for p in params]
    for shard, flat in enumerate(flats):
        scatter_shard(flat, restored, layout, shard)
    assert all(torch.equal(a, b) for a, b in zip(params, restored, strict=True))


def test_scatter_touches_only_its_shard_and_casts() -> None:
    params = [p.to(torch.bfloat16) for p in params_of([10, 10])]
    layout = shard_layout(params, num_shards=2)
    flat = gather_shard(params, layout, 1, dtype=torch.float32)
    assert flat.dtype == torch.float32 and flat.numel() == 10
    before = [p.clone() for p in params]
    scatter_shard(torch.full((10,), 3.0), params, layout, 1)
    assert torch.equal(params[0], before[0])
    assert torch.equal(params[1], torch.full_like(params[1], 3.0))


def test_mismatched_tensors_are_refused() -> None:
    layout = shard_layout([3, 4], num_shards=2)
    with pytest.raises(AtollError, match="same order"):
        gather_shard(params_of([4, 3]), layout, 0)
    with pytest.raises(AtollError, match="elements"):
        scatter_shard(torch.zeros(3), params_of([3, 4]), layout, 0)


def model_names(**overrides: object) -> list[str]:
    cfg = dataclasses.replace(get_preset("tiny"), **overrides)
    return [name for name, _ in Transformer(cfg).named_parameters()]


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


@pytest.mark.parametrize("num_layers,num_fragments", [(4, 1), (4, 2), (5, 2), (6, 4), (5, 5)])
@pytest.mark.parametrize("tie", [False, True])
def test_fragments_partition_the_names_by_contiguous_layers(num_layers: int, num_fragments: int, tie: bool) -> None:
    names = model_names(num_layers=num_layers, tie_embeddings=tie)
    fragments = split_fragments(names, num_fragments=num_fragments)
    assert len(fragments) == num_fragments
    assert sorted(n for f in fragments for n in f) == sorted(names)
    assert "embed.weight" in fragments[0] and "norm.weight" in fragments[-1]
    assert ("lm_head.weight" in fragments[-1]) != tie
    layer_sets = [sorted({layer_of(n) for n in f} - {None}) for f in fragments]
    flat = [i for layers in layer_sets for i in layers]
    assert flat == list(range(num_layers))  # contiguous, in order, each layer once
    counts = [len(layers) for layers in layer_sets]
    assert max(counts) - min(counts) <= 1
    for fragment in fragments:  # order of `names` kept inside each fragment
        assert fragment == [n for n in names if n in set(fragment)]


def test_strided_fragments_and_wrapped_names() -> None:
    names = ["module." + n for n in model_names(num_layers=4)]
    fragments = split_fragments(names, num_fragments=2, pattern="strided")
    assert {layer_of(n.removeprefix("module.")) for n in fragments[0]} == {None, 0, 2}
    assert {layer_of(n.removeprefix("module.")) for n in fragments[1]} == {None, 1, 3}
    assert "module.embed.weight" in fragments[0] and "module.lm_head.weight" in fragments[1]


def test_fragment_errors() -> None:
    names = model_names(num_layers=2)
    with pytest.raises(AtollError, match="between 1 and the number of decoder layers"):
        split_fragments(names, num_fragments=3)
    with pytest.raises(AtollError, match="between 1"):
        split_fragments(names, num_fragments=0)
    with pytest.raises(AtollError, match="'lora_A.weight'"):
        split_fragments([*names, "lora_A.weight"], num_fragments=1)
    with pytest.raises(AtollError, match="sequential or strided"):
        split_fragments(names, num_fragments=1, pattern="random")  # type: ignore[arg-type]


@pytest.mark.parametrize("num_fragments,sync_every", [(1, 10), (2, 10), (3, 10), (4, 100), (5, 7), (3, 2)])
def test_schedule_spreads_offsets_and_syncs_each_fragment_once_per_h(num_fragments: int, sync_every: int) -> None:
    schedule = StreamingSchedule(num_fragments=num_fragments, sync_every=sync_every)
    offsets = schedule.offsets
    assert offsets[0] == 0 and all(0 <= o < sync_every for o in offsets)
    gaps = [b - a for a, b in zip(offsets, [*offsets[1:], offsets[0] + sync_every], strict=True)]
    assert max(gaps) - min(gaps) <= 1  # evenly spread around the cycle
    assert schedule.due(0) == [] and 0 in schedule.due(sync_every)
    for start in range(1, 3 * sync_every):
        window = [f for t in range(start, start + sync_every) for f in schedule.due(t)]
        assert sorted(window) == list(range(num_fragments))
    for f in range(num_fragments):
        for step in range(0, 2 * sync_every):
            nxt = schedule.next_sync(f, step)
            assert step < nxt <= step + sync_every and f in schedule.due(nxt)
            assert all(f not in schedule.due(t) for t in range(step + 1, nxt))


def test_schedule_validates() -> None:
    with pytest.raises(AtollError, match="sync_every"):
        StreamingSchedule(num_fragments=2, sync_every=0)
    with pytest.raises(AtollError, match="num_fragments"):
        StreamingSchedule(num_fragments=0, sync_every=5)
