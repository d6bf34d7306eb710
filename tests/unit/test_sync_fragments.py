import dataclasses

import pytest

from atoll.errors import AtollError
from atoll.model.config import get_preset
from atoll.model.llama import Transformer
from atoll.sync.fragments import StreamingSchedule, assign_owners, count_layers, split_fragments


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
def test_owners_cover_every_parameter_once_and_balance_the_load(num_ranks: int) -> None:
    model = Transformer(dataclasses.replace(get_preset("tiny"), num_layers=3))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    owner = assign_owners(sizes, num_ranks=num_ranks)
    assert set(owner) == set(sizes) and set(owner.values()) <= set(range(num_ranks))
    load = [sum(sizes[n] for n, r in owner.items() if r == rank) for rank in range(num_ranks)]
    # Greedy largest-first: no rank exceeds the ideal share by more than the largest tensor.
    assert max(load) - sum(load) / num_ranks <= max(sizes.values())
    assert owner == assign_owners(dict(reversed(list(sizes.items()))), num_ranks=num_ranks), "order-independent"
    with pytest.raises(AtollError, match="num_ranks"):
        assign_owners(sizes, num_ranks=0)


def model_names(**overrides: object) -> list[str]:
    cfg = dataclasses.replace(get_preset("tiny"), **overrides)
    return [name for name, _ in Transformer(cfg).named_parameters()]


def test_count_layers_reads_wrapped_names_and_is_at_least_one() -> None:
    names = model_names(num_layers=3)
    assert count_layers(names) == 3
    assert count_layers([f"module._orig_mod.{n}" for n in names]) == 3
    assert count_layers(["embed.weight", "lm_head.weight"]) == 1


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
