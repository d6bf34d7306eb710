"""Lanes: which rank of a site exchanges which part of the model across the WAN, and moving those
parts between the rank that exchanges them and the ranks that hold them.

The exchange runs on G *lanes*, the same G at every site: lane g is local rank g, and lane g of
one site exchanges with lane g of the others (one torchft Manager and cross-site group per lane;
ranks >= G take no part in the WAN). The model is cut into *pieces*, each exchanged by one lane;
every site must cut and assign them alike, so two modes (`atoll.config.topology.lane_plan` picks
one from what every site knows):

- ``shard`` (every site has the same layout and rank count; G = ranks): the pieces are the
  distinct blocks the ranks hold (`atoll.sync.placement`), each given to a rank that holds it:
  a block held by one rank (an FSDP2 or TP shard) to that rank, a replicated one (DDP) to the
  least-loaded of its holders, largest first. A lane reads its pieces where it stands, and a
  replicated piece's new value goes to its other holders once per round. For a DDP site this is
  exactly the owner split of earlier versions (`assign_owners`).
- ``canonical`` (layouts or rank counts differ): the pieces are whole canonical parameters,
  given to G lanes by size (`assign_owners`, the same at every site). A lane collects its
  parameters' blocks from the ranks holding them before a send (and before an apply when the
  parameters moved on meanwhile), and scatters the new values back to every holder. Cost inside
  the site: the model's float32 bytes less what the lanes hold already, each way, per round
  (twice in for `delayed` and `streaming`); host memory: a lane keeps the anchor and outer state
  of its share, as in shard mode.

Moves use one `all_to_all_single` over the site's default process group (the site's devices),
only when a move is needed at all: a DDP site's reads and an FSDP2 site's reads and writes in
shard mode move nothing inside the site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from atoll.errors import AtollError
from atoll.sync.fragments import assign_owners
from atoll.sync.placement import Box, SiteView
from atoll.sync.tensors import host_copy

__all__ = ["LaneMode", "LanePlan", "Lanes", "Piece", "assign_owners", "broadcast_state"]

LaneMode = Literal["shard", "canonical"]


@dataclass(frozen=True)
class LanePlan:
    """How a run's sites cut the exchange, the same at every site (`atoll.config.topology`'s
    `Topology.lane_plan`): the mode, and the number of lanes (None: one per rank of the site)."""

    mode: LaneMode = "shard"
    num_lanes: int | None = None


def broadcast_state(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Rank 0's values (a few numbers) on every rank of the site (identity without a process group)."""
    if not dist.is_initialized():
        return values
    box = [values]
    dist.broadcast_object_list(box, src=0)
    return tuple(box[0])


@dataclass(frozen=True)
class Piece:
    """A block of one parameter that one lane exchanges; `key` names it in the sync's state."""

    key: str  # the parameter's name when the block is the whole parameter, else name[lo:hi,...]
    name: str
    box: Box
    lane: int


def _key(name: str, box: Box, shape: tuple[int, ...]) -> str:
    return name if box == Box.full(shape) else f"{name}[{box.label()}]"


def shard_pieces(view: SiteView) -> list[Piece]:
    """Shard mode: the distinct blocks the ranks hold, each to one of its holders."""
    blocks: list[tuple[str, Box, list[int]]] = []
    for name in view.names:
        by_box: dict[Box, list[int]] = {}
        for rank, box in view.holders[name]:
            by_box.setdefault(box, []).append(rank)
        blocks += [(name, box, ranks) for box, ranks in sorted(by_box.items(), key=lambda kv: kv[0].offset)]
    load = [0] * view.num_ranks
    lane: dict[tuple[str, Box], int] = {}
    for name, box, ranks in blocks:  # a block held by one rank stays there
        if len(ranks) == 1:
            lane[(name, box)] = ranks[0]
            load[ranks[0]] += box.numel
    shared = [(n, b, r) for n, b, r in blocks if len(r) > 1]
    for name, box, ranks in sorted(shared, key=lambda x: (-x[1].numel, _key(x[0], x[1], view.shapes[x[0]]))):
        rank = min(ranks, key=lambda r: (load[r], r))
        lane[(name, box)] = rank
        load[rank] += box.numel
    return [Piece(_key(n, b, view.shapes[n]), n, b, lane[(n, b)]) for n, b, _ in blocks]


def canonical_pieces(view: SiteView, *, num_lanes: int) -> list[Piece]:
    """Canonical mode: whole parameters over `num_lanes` lanes by size (`assign_owners`)."""
    owner = assign_owners({n: view.numel(n) for n in view.names}, num_ranks=num_lanes)
    return [Piece(n, n, Box.full(view.shapes[n]), owner[n]) for n in view.names]


@dataclass(frozen=True)
class _Move:
    """Copy `region` of piece `key` from rank `src` (which holds it in block `src_box`) to `dst`."""

    key: str
    name: str
    region: Box
    src: int
    src_box: Box  # the block holding the region on src (the piece itself when src is its lane)
    dst: int
    dst_box: Box


class Lanes:
    """The pieces of one site and this rank's part in moving them. Built once at start-up, the
    same on every rank of the site; `read` and `write` are collective over the site."""

    def __init__(self, view: SiteView, *, mode: LaneMode, num_lanes: int, rank: int) -> None:
        if mode == "shard" and num_lanes != view.num_ranks:
            raise AtollError(f"shard-to-shard lanes need one lane per rank ({view.num_ranks}), got {num_lanes}")
        if not 1 <= num_lanes <= view.num_ranks:
            raise AtollError(
                f"the exchange runs on {num_lanes} lanes but this site has {view.num_ranks} rank(s): "
                "every site needs at least as many ranks as there are lanes"
            )
        self.view = view
        self.mode = mode
        self.num_lanes = num_lanes
        self.rank = rank
        pieces = shard_pieces(view) if mode == "shard" else canonical_pieces(view, num_lanes=num_lanes)
        self.pieces = {p.key: p for p in pieces}
        self._by_name: dict[str, list[Piece]] = {}
        self._moves: dict[tuple[bool, tuple[str, ...]], list[_Move]] = {}  # the plan of each unit's reads and writes
        for p in pieces:
            self._by_name.setdefault(p.name, []).append(p)

    @property
    def is_lane(self) -> bool:
        return self.rank < self.num_lanes

    def keys(self, names: Sequence[str]) -> list[str]:
        """Every piece of these parameters, in their order."""
        return [p.key for n in names for p in self._by_name[n]]

    def owned(self, names: Sequence[str]) -> list[str]:
        """The pieces of these parameters that this rank exchanges."""
        return [k for k in self.keys(names) if self.pieces[k].lane == self.rank]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.pieces[key].box.shape

    def numel(self, keys: Sequence[str]) -> int:
        return sum(self.pieces[k].box.numel for k in keys)

    # ------------------------------------------------------------------ moves

    def _reads(self, keys: Sequence[str]) -> list[_Move]:
        cached = self._moves.get((False, tuple(keys)))
        if cached is not None:
            return cached
        moves = []
        for key in keys:
            piece = self.pieces[key]
            by_box: dict[Box, list[int]] = {}
            for rank, box in self.view.holders[piece.name]:
                by_box.setdefault(box, []).append(rank)
            for box, ranks in sorted(by_box.items(), key=lambda kv: kv[0].offset):
                region = box.intersect(piece.box)
                if region is not None:
                    src = piece.lane if piece.lane in ranks else min(ranks)
                    moves.append(_Move(key, piece.name, region, src, box, piece.lane, piece.box))
        self._moves[(False, tuple(keys))] = moves
        return moves

    def _writes(self, keys: Sequence[str]) -> list[_Move]:
        cached = self._moves.get((True, tuple(keys)))
        if cached is not None:
            return cached
        moves = []
        for key in keys:
            piece = self.pieces[key]
            for rank, box in self.view.holders[piece.name]:
                region = box.intersect(piece.box)
                if region is not None:
                    moves.append(_Move(key, piece.name, region, piece.lane, piece.box, rank, box))
        self._moves[(True, tuple(keys))] = moves
        return moves

    def moves_inside_site(self, keys: Sequence[str], *, write: bool) -> int:
        """Elements a read (or write) of `keys` moves between ranks (not counting local copies)."""
        moves = self._writes(keys) if write else self._reads(keys)
        return sum(m.region.numel for m in moves if m.src != m.dst)

    @torch.no_grad()
    def read(self, keys: Sequence[str], local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The current values (float32, host) of this rank's pieces among `keys`, assembled from
        their holders. `local`: this rank's local tensors (parameters or gradients) by name.
        Collective over the site when a block must move; blocks."""
        mine = {k: self.pieces[k] for k in keys if self.pieces[k].lane == self.rank}
        moves = self._reads(keys)
        out: dict[str, torch.Tensor] = {}
        for key, piece in mine.items():
            whole = [m for m in moves if m.key == key and m.src == self.rank and m.region == piece.box]
            if whole:  # held here in one block: one host copy, as a replicated site always did
                out[key] = host_copy(local[piece.name][whole[0].region.within(whole[0].src_box)])
            else:
                out[key] = torch.empty(piece.box.shape, dtype=torch.float32)
        for m in moves:
            if m.src == m.dst == self.rank and not (m.region == self.pieces[m.key].box):
                out[m.key][m.region.within(m.dst_box)] = local[m.name][m.region.within(m.src_box)].float().cpu()
        self._exchange(
            [m for m in moves if m.src != m.dst],
            send=lambda m: local[m.name][m.region.within(m.src_box)],
            recv=lambda m, value: out[m.key].__setitem__(m.region.within(m.dst_box), value.cpu()),
            like=local,
        )
        return out

    @torch.no_grad()
    def write(self, keys: Sequence[str], staged: dict[str, torch.Tensor], local: dict[str, torch.Tensor]) -> None:
        """Put the staged new values of this rank's pieces among `keys` into every holder's local
        tensor (popping them from `staged`); a lane that staged nothing (its round failed) leaves
        its pieces as they are. Collective over the site when a block must move; blocks."""
        moves = self._writes(keys)
        remote = [m for m in moves if m.src != m.dst]
        sending = [1]
        if remote and dist.is_initialized() and self.view.num_ranks > 1:
            mine = any(k in staged for k in keys if self.pieces[k].lane == self.rank)
            flags = torch.zeros(self.view.num_ranks, dtype=torch.int64, device=_device(local))
            flags[self.rank] = int(mine)
            dist.all_reduce(flags)
            sending = flags.tolist()
            remote = [m for m in remote if sending[m.src]]
        values = {k: staged.pop(k) for k in keys if k in staged and self.pieces[k].lane == self.rank}
        for m in moves:
            if m.src == m.dst == self.rank and m.key in values:
                target = local[m.name][m.region.within(m.dst_box)]
                target.copy_(values[m.key][m.region.within(m.src_box)].to(target.device, target.dtype))
        self._exchange(
            remote,
            send=lambda m: values[m.key][m.region.within(m.src_box)],
            recv=lambda m, value: _copy_into(local[m.name][m.region.within(m.dst_box)], value),
            like=local,
        )

    def _exchange(self, moves: list[_Move], *, send, recv, like: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
        """One all-to-all carrying `moves` (the same list on every rank); `send(move)` gives the
        block this rank sends, `recv(move, flat)` takes a block it receives."""
        if not moves or not dist.is_initialized() or self.view.num_ranks == 1:
            assert not moves, "moves between ranks need the site's process group"
            return
        device = _device(like)
        world = self.view.num_ranks
        out_moves = [m for m in moves if m.src == self.rank]
        in_moves = [m for m in moves if m.dst == self.rank]
        send_counts = [sum(m.region.numel for m in out_moves if m.dst == r) for r in range(world)]
        recv_counts = [sum(m.region.numel for m in in_moves if m.src == r) for r in range(world)]
        parts = [send(m).reshape(-1).to(device, torch.float32) for r in range(world) for m in out_moves if m.dst == r]
        buf_in = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32, device=device)
        buf_out = torch.empty(sum(recv_counts), dtype=torch.float32, device=device)
        dist.all_to_all_single(buf_out, buf_in, output_split_sizes=recv_counts, input_split_sizes=send_counts)
        offset = 0
        for r in range(world):
            for m in (m for m in in_moves if m.src == r):
                recv(m, buf_out[offset : offset + m.region.numel].view(m.region.shape))
                offset += m.region.numel


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    target.copy_(value.to(target.device, target.dtype))


def _device(local: dict[str, torch.Tensor]) -> torch.device:
    """The site's device (its process group's): where its parameters live."""
    for t in local.values():
        return t.device
    return torch.device("cpu")
