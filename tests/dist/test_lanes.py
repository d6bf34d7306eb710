"""Lanes move real blocks between real ranks: three gloo processes holding DTensor shards (as
FSDP2 and TP hold them), replicated plain tensors (DDP) and parameters only some ranks have
(pipeline stages). Reads must assemble the exact global tensors on the lanes, writes must land
in every holder's block, and the site's digest must be the digest of the full tensors."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from atoll.sync.digest import site_checksum, site_digest, theta_digest

WORLD = 3


def global_values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(7, 4, generator=g),  # rows cut over all three ranks (FSDP2), uneven
        "layers.0.w": torch.randn(5, 6, generator=g),  # columns cut over ranks 0 and 1 (TP on a sub-mesh)
        "layers.0.norm": torch.randn(6, generator=g),  # replicated everywhere (DDP)
        "layers.1.w": torch.randn(3, 3, generator=g),  # only rank 2 holds it (the last pipeline stage)
    }


def rank_params(rank: int) -> list[tuple[str, torch.Tensor]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.device_mesh import DeviceMesh

    full = global_values()
    everyone = init_device_mesh("cpu", (WORLD,))
    out = [("embed.weight", distribute_tensor(full["embed.weight"].clone(), everyone, [Shard(0)]))]
    pair = DeviceMesh("cpu", [0, 1])  # ranks 0 and 1 only; rank 2 is not part of it
    if rank in (0, 1):
        out.append(("layers.0.w", distribute_tensor(full["layers.0.w"].clone(), pair, [Shard(1)])))
    out.append(("layers.0.norm", full["layers.0.norm"].clone()))
    if rank == 2:
        out.append(("layers.1.w", full["layers.1.w"].clone()))
    return out


def worker(rank: int, store: str, results: str) -> None:
    import torch.distributed as dist

    from atoll.sync.lanes import Lanes
    from atoll.sync.placement import SiteView, local_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        params = rank_params(rank)
        view = SiteView.gather(params, num_ranks=WORLD)
        local = {n: local_tensor(p) for n, p in params}
        full = global_values()
        originals = {n: t.clone() for n, t in local.items()}
        for mode, lanes_n in (("canonical", 2), ("canonical", 1), ("shard", WORLD)):
            lanes = Lanes(view, mode=mode, num_lanes=lanes_n, rank=rank)  # type: ignore[arg-type]
            keys = lanes.keys(view.names)
            got = lanes.read(keys, local)
            assert set(got) == set(lanes.owned(view.names))
            for k, value in got.items():
                piece = lanes.pieces[k]
                whole = full[piece.name]
                assert torch.equal(value, whole[piece.box.within(type(piece.box).full(whole.shape))]), (mode, k)
            # Every lane writes its pieces + 1 (rank 2 is idle with one lane): every holder sees all of it.
            staged = {k: v + 1 for k, v in got.items()}
            lanes.write(keys, staged, local)
            assert not staged, "write pops what it wrote"
            for n, p in params:
                mine = local_tensor(p)
                expected = full[n] + 1
                for r, box in view.holders[n]:
                    if r == rank:
                        assert torch.equal(mine, expected[box.within(type(box).full(expected.shape))]), (mode, n)
            for n, p in params:  # back to the original values for the next mode
                local_tensor(p).copy_(originals[n])
            # A lane whose round failed stages nothing: nobody's blocks change.
            lanes.write(keys, {}, local)
            for n, p in params:
                for r, box in view.holders[n]:
                    if r == rank:
                        assert torch.equal(local_tensor(p), full[n][box.within(type(box).full(full[n].shape))])
        digest = site_digest(view, local, rank=rank)
        checksum = site_checksum(view, local, rank=rank)
        if rank == 0:
            Path(results).write_text(f"{digest.hex()}\n{checksum!r}\n{','.join(view.names)}\n")
    finally:
        dist.destroy_process_group()


def test_lanes_read_and_write_blocks_of_any_layout_exactly(tmp_path: Path) -> None:
    results = tmp_path / "results.txt"
    mp.spawn(worker, args=(str(tmp_path / "store"), str(results)), nprocs=WORLD, join=True)
    digest, checksum, names = results.read_text().splitlines()
    full = global_values()
    assert names.split(",") == list(full)  # the canonical order: embeddings, layers by index
    assert digest == theta_digest(full.values()).hex()  # the same digest a site holding everything whole shows
    assert abs(float(checksum) - sum(float(t.double().sum()) for t in full.values())) < 1e-9
