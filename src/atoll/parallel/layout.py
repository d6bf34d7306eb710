"""How a site's ranks split one model: tensor, pipeline and data parallelism, and their settings.

A `Layout` is resolved once per run from `parallel.*`, the site's rank count and the model's
shape (`resolve_layout`), before any rank starts where the CLI can (`atoll.train.setup.prepare_run`)
and again on every rank. Bad combinations are one-line `AtollError`s.

Ranks are ordered (pp, dp, tp), tp fastest: the tp ranks of one model replica are neighbours (on
one host, where the fast links are), then the replicas, then the stages:

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

`build_mesh` makes the matching three-dimensional `DeviceMesh` ("pp", "dp", "tp"), always with
all three names (a dimension of size 1 costs a trivial group), so that code can ask for
``mesh["dp"]`` whatever the layout. Pure below `build_mesh`: no process group is needed to
resolve or place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from atoll.config.schema import ParallelSection
from atoll.errors import AtollError
from atoll.model.config import ModelConfig

# The pipeline schedules `atoll.parallel.pipeline` runs (torch's classes live there: importing
# torch.distributed.pipelining costs a second, which a launcher or a config check need not pay).
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved_1f1b")

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class Layout:
    """The site's split of the model and what each replica does to save memory."""

    tp: int = 1
    pp: int = 1
    vp: int = 1
    dp: int = 1
    pp_schedule: str = "1f1b"
    sequence_parallel: bool = False
    recompute: str = "none"
    zero: int = 0  # 0: replicate over dp; 1, 2: FSDP2 without resharding after forward; 3: with it

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def split(self) -> bool:
        """Whether one replica spans several ranks (tensor or pipeline parallelism)."""
        return self.tp * self.pp > 1

    def place(self, rank: int) -> RankPlace:
        """Where `rank` sits in the layout (pure arithmetic, no process group)."""
        if not 0 <= rank < self.world_size:
            raise AtollError(f"rank {rank} is not in a layout of {self.world_size} ranks")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return RankPlace(
            dp_rank=dp_rank, dp_size=self.dp, tp_rank=tp_rank, tp_size=self.tp, pp_rank=pp_rank, pp_size=self.pp
        )


@dataclass(frozen=True)
class RankPlace:
    """One rank's coordinates in its site's layout."""

    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def counts(self) -> bool:
        """Whether this rank counts its loss and targets: the last stage's tp rank 0 does, so that
        a sum over the site counts each target exactly once."""
        return self.is_last_stage and self.tp_rank == 0

    @classmethod
    def data_parallel(cls, rank: int, world_size: int) -> RankPlace:
        """A site of pure data parallelism: every rank a replica."""
        return cls(dp_rank=rank, dp_size=world_size)


def zero_level(parallel: ParallelSection) -> int:
    """`parallel.zero` when set, else what the older `parallel.shard` says (fsdp = 3, ddp = 0)."""
    if parallel.zero is not None:
        return parallel.zero
    return 3 if parallel.shard == "fsdp" else 0


def resolve_layout(
    parallel: ParallelSection, *, world_size: int, model: ModelConfig | None = None, seq_len: int | None = None
) -> Layout:
    """The site's layout for `world_size` ranks; checks it against the model's shape when given
    (and the training sequence length for sequence parallelism).

    Raises `AtollError` (one line: the key, the numbers and the fix) for a layout that cannot run.
    """
    tp, pp, vp = parallel.tp, parallel.pp, parallel.vp
    if world_size % (tp * pp):
        raise AtollError(
            f"the site has {world_size} ranks, not a multiple of parallel.tp x parallel.pp = {tp} x {pp}: "
            f"use a rank count that is (ranks = tp x pp x dp) or change tp/pp"
        )
    layout = Layout(
        tp=tp,
        pp=pp,
        vp=vp,
        dp=world_size // (tp * pp),
        pp_schedule=parallel.pp_schedule,
        sequence_parallel=parallel.sequence_parallel,
        recompute=parallel.recompute,
        zero=zero_level(parallel),
    )
    if vp > 1 and parallel.pp_schedule != "interleaved_1f1b":
        raise AtollError(
            f"parallel.vp is {vp} but parallel.pp_schedule is {parallel.pp_schedule}: virtual stages need "
            f"--parallel.pp_schedule=interleaved_1f1b (or set --parallel.vp=1)"
        )
    if parallel.sequence_parallel and tp == 1:
        raise AtollError("parallel.sequence_parallel needs tensor parallelism: set --parallel.tp above 1 or drop it")
    if model is not None:
        _check_model(layout, model, seq_len=seq_len)
    return layout


def _check_model(layout: Layout, model: ModelConfig, *, seq_len: int | None) -> None:
    tp = layout.tp
    for key, value in (
        ("num_heads", model.num_heads),
        ("num_kv_heads", model.num_kv_heads),
        ("ffn_dim", model.ffn_dim),
        ("vocab_size", model.vocab_size),
    ):
        if value % tp:
            raise AtollError(f"parallel.tp {tp} does not divide the model's {key} ({value}): use a tp that divides it")
    stages = layout.pp * layout.vp
    if layout.pp > model.num_layers:
        raise AtollError(
            f"parallel.pp {layout.pp} is more than the model's {model.num_layers} layers: every pipeline stage "
            f"needs a layer: use a pp of at most {model.num_layers}"
        )
    if layout.pp > 1 and model.tie_embeddings:
        raise AtollError(
            f"parallel.pp is {layout.pp} but the model ties its embeddings (the first stage embeds, the last "
            "projects with the same matrix): set model.tie_embeddings: false, or use --parallel.pp=1"
        )
    if model.num_layers % stages:
        raise AtollError(
            f"the model's {model.num_layers} layers do not split into parallel.pp x parallel.vp = "
            f"{layout.pp} x {layout.vp} = {stages} stages of equal depth: use pp x vp dividing {model.num_layers}"
        )
    if layout.sequence_parallel and seq_len is not None and seq_len % tp:
        raise AtollError(
            f"parallel.sequence_parallel splits the sequence over tp {tp} ranks but data.seq_len is {seq_len}: "
            f"use a seq_len divisible by {tp}"
        )


def check_schedule(schedule: str, *, pp: int, vp: int, num_micro_batches: int) -> None:
    """Raise `AtollError` unless torch's `schedule` can run pp × vp stages over that many micro-batches.

    GPipe takes any count; 1F1B needs at least pp; interleaved 1F1B runs in rounds of
    max(1, m // pp) and needs m divisible by that number of rounds. Single-stage schedules (GPipe,
    1F1B) take vp 1 only.
    """
    if schedule not in SCHEDULE_NAMES:
        raise AtollError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    m = num_micro_batches
    if m < 1:
        raise AtollError(f"the pipeline needs at least one micro-batch per step, got {m}")
    if vp > 1 and schedule != "interleaved_1f1b":
        raise AtollError(f"vp {vp} (virtual stages per rank) needs pp_schedule: interleaved_1f1b, not {schedule}")
    if schedule == "1f1b" and m < pp:
        raise AtollError(f"1f1b needs at least pp ({pp}) micro-batches per step, got {m}; raise the batch or use gpipe")
    if schedule == "interleaved_1f1b":
        rounds = max(1, m // pp)
        if m % rounds:
            raise AtollError(
                f"interleaved_1f1b runs {m} micro-batches in {rounds} rounds of pp ({pp}) and needs a multiple "
                f"of {rounds}; use a multiple of pp micro-batches per step"
            )


def pipeline_micro_batches(layout: Layout, *, global_batch: int, micro_batch: int) -> int:
    """Micro-batches each pipeline runs per step: its replica's rows (global batch / dp) in
    micro-batches of `micro_batch` rows, which must divide them (a pipeline's micro-batches share
    one shape). Raises `AtollError` (one line) when they do not, or when `layout.pp_schedule`
    cannot run that many; 0 without pipeline stages (pp 1). Pure: no process group."""
    if layout.pp == 1:
        return 0
    rows = layout.dp * micro_batch
    if global_batch % rows:
        raise AtollError(
            f"pipeline stages need equal micro-batches: train.global_batch {global_batch} is not a multiple of "
            f"dp x train.micro_batch = {layout.dp} x {micro_batch}: use a global batch divisible by {rows}"
        )
    count = global_batch // rows
    try:
        check_schedule(layout.pp_schedule, pp=layout.pp, vp=layout.vp, num_micro_batches=count)
    except AtollError as exc:
        raise AtollError(
            f"train.global_batch {global_batch} / (dp {layout.dp} x train.micro_batch {micro_batch}) gives "
            f"{count} micro-batches per step, and {exc}"
        ) from None
    return count


def build_mesh(layout: Layout, *, device_type: str) -> DeviceMesh:
    """The site's (pp, dp, tp) device mesh; collective over the site (every rank must call it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (layout.pp, layout.dp, layout.tp), mesh_dim_names=MESH_DIMS)
