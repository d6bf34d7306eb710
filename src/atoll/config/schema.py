"""The run configuration: one small, documented section per concern.

Every section forbids unknown keys, so a typo (``train.stpes``) is an error instead of a
silently ignored setting. Checks across fields are the sections' model validators (a
`ValueError` that `atoll.config.load` turns into one line). A key that is valid but that the
section's other settings leave unread (``sync.fragments`` with strategy diloco) is named by
`ignored_settings`, which the loader logs as a warning. Leaf functions receive only the
section they need.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from atoll.sync.codec_specs import (
    CODEC_NAMES,
    CODEC_SYNC_KEYS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LOWRANK_RANK,
    DEFAULT_TOPK_FRACTION,
    CodecName,
)


class Section(BaseModel):
    """Base for config sections: unknown keys and bad types are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def ignored_keys(self, path: str) -> list[str]:
        """One message per key set in this section that its other settings leave unread.

        Only keys the user set count (pydantic's `model_fields_set`: written in the YAML or
        given as ``--section.key=value``), never a default. `path` is the section's dotted
        place in the config (``sync``), for the messages. Nested sections are not included:
        `ignored_settings` walks them. Sections whose keys apply only under some setting
        override this; the base reports nothing.
        """
        return []

    def _unread(self, path: str, *, setting: str, readers: dict[str, Collection[object]]) -> list[str]:
        """Messages for the keys of `readers` that were set while `setting` has a value that
        does not read them (`readers`: key -> the values of `setting` under which it is read)."""
        value = getattr(self, setting)
        return [
            f"{path}.{key} is ignored: it applies only when {path}.{setting} is "
            f"{' or '.join(str(v) for v in readers[key])} (it is {value}); "
            f"remove {path}.{key} or change {path}.{setting}"
            for key in type(self).model_fields  # in the order the section documents them
            if key in readers and key in self.model_fields_set and value not in readers[key]
        ]


def ignored_settings(config: BaseModel, *, path: str = "") -> list[str]:
    """Messages naming every key set in `config` and its sections that no setting reads.

    Pure; `atoll.config.load.validate` calls it after validation and logs the messages. An
    empty list means every key the user wrote takes effect, as far as the config alone can
    tell: the `sync` section, for one, is only read when a run spans several sites.
    """
    found = config.ignored_keys(path) if isinstance(config, Section) else []
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            found += ignored_settings(value, path=f"{path}.{name}" if path else name)
    return found


class RunSection(Section):
    name: str = Field("run", description="Run name; the run directory is `dir/name`.")
    dir: Path = Field(Path("runs"), description="Parent directory of run directories.")
    seed: int = Field(0, description="Seed for weights, data order and sampling.")

    @property
    def path(self) -> Path:
        return self.dir / self.name


class ModelSection(Section):
    preset: str | None = Field("demo", description="Named shape (tiny, demo, llama3-8b, ...).")
    init_from: Path | None = Field(
        None,
        description="Start from weights: a Hugging Face directory (Llama/Qwen2 layout) or an atoll run directory.",
    )
    dim: int | None = Field(None, gt=0, description="Override: hidden size.")
    num_layers: int | None = Field(None, gt=0, description="Override: decoder layers.")
    num_heads: int | None = Field(None, gt=0, description="Override: attention heads.")
    num_kv_heads: int | None = Field(None, gt=0, description="Override: key/value heads (GQA).")
    ffn_dim: int | None = Field(None, gt=0, description="Override: SwiGLU hidden size.")
    rope_theta: float | None = Field(None, gt=0, description="Override: rotary base.")
    norm_eps: float | None = Field(None, gt=0, description="Override: RMSNorm epsilon.")
    qkv_bias: bool | None = Field(None, description="Override: bias on q/k/v (Qwen2 style).")
    tie_embeddings: bool | None = Field(None, description="Override: tie input and output embeddings.")

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        if self.init_from is not None and self.overrides():
            raise ValueError(
                f"init_from is set, so the shape comes from {self.init_from}: "
                f"remove model.{', model.'.join(self.overrides())}"
            )
        if self.init_from is None and self.preset is None:
            raise ValueError(
                "preset is empty and init_from is not set: name a preset (tiny, demo, ...) or a model to start from"
            )
        return self

    def overrides(self) -> dict[str, object]:
        """The shape fields the user set explicitly."""
        skip = {"preset", "init_from"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}

    def ignored_keys(self, path: str) -> list[str]:
        if self.init_from is not None and self.preset is not None and "preset" in self.model_fields_set:
            return [
                f"{path}.preset is ignored: {path}.init_from is set, so the shape comes from {self.init_from}; "
                f"remove {path}.preset (or set it to null)"
            ]
        return []


class DataSection(Section):
    dir: Path = Field(Path("runs/data/demo"), description="Directory holding manifest.json and shards.")
    prepare: Literal["demo", "none"] = Field(
        "demo", description="`demo`: build the Shakespeare demo corpus into `dir` if it is missing."
    )
    vocab_size: int = Field(8192, gt=256, description="BPE vocabulary size when preparing data.")
    seq_len: int = Field(256, gt=0, description="Tokens per training sequence.")
    tokenizer: Path | None = Field(
        None, description="A tokenizer.json that must match the shards (default: the data directory's own)."
    )

    def ignored_keys(self, path: str) -> list[str]:
        # Without preparation the vocabulary is the prepared data's (its manifest says it).
        return self._unread(path, setting="prepare", readers={"vocab_size": ("demo",)})


class TrainSection(Section):
    steps: int = Field(300, gt=0, description="Optimizer steps in the whole run.")
    global_batch: int = Field(8, gt=0, description="Sequences per optimizer step, summed over all ranks.")
    micro_batch: int = Field(8, gt=0, description="Sequences per forward/backward on one rank.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms and biases).")
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 disables clipping.")
    log_every: int = Field(10, gt=0, description="Steps between metric records.")
    eval_every: int = Field(100, ge=0, description="Steps between validation passes; 0: only at the end.")
    eval_batches: int = Field(
        4, gt=0, description="Validation batches of global_batch sequences (the same samples whatever the rank count)."
    )
    checkpoint_every: int = Field(100, ge=0, description="Steps between checkpoints; 0: only at the end.")
    keep_checkpoints: int = Field(2, gt=0, description="Complete checkpoints kept on disk (oldest removed).")
    max_bad_steps: int = Field(
        3,
        gt=0,
        description="Non-finite steps in a row (each skipped, never applied) before the run rolls back "
        "to its last good checkpoint and skips the batches that led there.",
    )
    max_rollbacks: int = Field(
        2, ge=0, description="Rollbacks before a run that keeps diverging stops with an error; 0: stop at once."
    )
    spike_steps: int = Field(
        10,
        ge=0,
        description="Steps in a row whose loss spikes before the run rolls back; 0: spikes are only logged.",
    )
    spike_sigma: float = Field(
        6.0, gt=0, description="A spike: loss above its running mean by this many running deviations ..."
    )
    spike_ratio: float = Field(0.25, gt=0, description="... and by this fraction of the running mean.")
    skip_batches: list[int] = Field(
        default_factory=list,
        description="Batch indices (0-based, in the order the run draws them) never to train on: "
        "known-bad data; rollbacks add to them.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainSection:
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if any(b < 0 for b in self.skip_batches):
            raise ValueError(f"skip_batches holds negative indices {[b for b in self.skip_batches if b < 0]}")
        if self.micro_batch > self.global_batch:
            raise ValueError(
                f"micro_batch ({self.micro_batch}) exceeds global_batch ({self.global_batch}): lower micro_batch"
            )
        return self


class ParallelSection(Section):
    device: Literal["auto", "cpu", "cuda", "npu"] = Field(
        "auto",
        description="`auto`: the site's devices from the catalog (CUDA, or Ascend NPUs through torch_npu) when "
        "this machine has them, else the CPU; without a topology, CUDA when present.",
    )
    backend: Literal["auto", "gloo", "nccl", "hccl"] = Field(
        "auto", description="Collective library inside a site: gloo on CPU, NCCL on CUDA, HCCL on Ascend NPUs."
    )
    shard: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Replicate (DDP) or shard (FSDP2 fully_shard) inside a site; an alias of zero "
        "(ddp = 0, fsdp = 3): parallel.zero, when set, wins, and shard=fsdp with a zero other than 3 is an error.",
    )
    zero: int | None = Field(
        None,
        ge=0,
        le=3,
        description="Sharding over the data-parallel ranks: 0 replicates (DDP); 1 and 2 shard parameters, "
        "gradients and optimizer state with FSDP2, kept unsharded from forward to backward; 3 also reshards "
        "after forward (full sharding). Default: from parallel.shard.",
    )
    tp: int = Field(1, gt=0, description="Tensor-parallel ranks per model replica (must divide heads and kv heads).")
    pp: int = Field(1, gt=0, description="Pipeline stages per model replica (must divide layers with vp).")
    vp: int = Field(1, gt=0, description="Virtual pipeline stages per rank (interleaved_1f1b only).")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field(
        "1f1b", description="Pipeline schedule of the micro-batches (pp > 1)."
    )
    sequence_parallel: bool = Field(
        False, description="With tp > 1: shard the norms' activations along the sequence over the tp ranks."
    )
    recompute: Literal["none", "selective", "full"] = Field(
        "none",
        description="Activation recomputation: full recomputes every decoder block in backward; selective "
        "recomputes each block's attention only; none keeps every activation.",
    )
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute dtype; `auto`: bf16 autocast on CUDA, fp32 on CPU."
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder block in place (names and checkpoints unchanged); "
        "costs start-up time, pays off on GPUs.",
    )
    threads: int = Field(0, ge=0, description="CPU threads per rank; 0: cores divided by local ranks.")
    timeout_seconds: float = Field(600.0, gt=0, description="Timeout of every collective in the site.")
    rank_slowdowns: list[float] = Field(
        default_factory=list,
        description="Lab only, a single site: emulate ranks this many times slower (rank r takes entry "
        "r mod length; compute, then sleep; each rank is then timed alone); several sites set it per device "
        "in the topology.",
    )
    balance_ranks: bool = Field(
        True,
        description="Ranks of different devices take shares of the global batch in proportion to their speed; "
        "false: equal shares (the slowest rank then paces the site).",
    )
    device_shares: dict[str, float] = Field(
        default_factory=dict,
        description="Sequences per step of one device, by catalog kind (a plan's per-device split): where a "
        "site's ranks of different kinds start; measurement refines it. Default: the catalog's peak FLOP/s.",
    )
    rebalance_every: int = Field(
        20,
        ge=0,
        description="Sites whose ranks' devices differ: steps between re-measuring each rank's speed and "
        "re-splitting the global batch in proportion to it; 0: keep the split the catalog gives.",
    )

    @model_validator(mode="after")
    def _check(self) -> ParallelSection:
        if any(not x >= 1.0 for x in self.rank_slowdowns):
            raise ValueError(
                f"rank_slowdowns must be at least 1 (a rank this many times slower), got {self.rank_slowdowns}"
            )
        if self.shard == "fsdp" and self.zero is not None and self.zero != 3:
            raise ValueError(
                f"shard is fsdp (zero 3) but zero is {self.zero}: drop parallel.shard and keep parallel.zero"
            )
        return self

    def ignored_keys(self, path: str) -> list[str]:
        found = []
        if self.pp == 1:
            found += [
                f"{path}.{key} is ignored: it applies only when {path}.pp is above 1; remove it or set {path}.pp"
                for key in ("vp", "pp_schedule")
                if key in self.model_fields_set
            ]
        return found


# Sync keys that only some strategies read: key -> the strategies that read it. ddp exchanges
# gradients every step: it has no rounds and no outer optimizer.
_ROUNDS = ("diloco", "streaming", "delayed")
SYNC_STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "inner_steps": _ROUNDS,
    "site_inner_steps": _ROUNDS,
    "round_seconds": ("diloco", "delayed"),
    "balance": ("diloco", "delayed"),
    "balance_tolerance": ("diloco", "delayed"),
    "rebalance_gain": ("diloco", "delayed"),
    "outer_lr": _ROUNDS,
    "outer_momentum": _ROUNDS,
    "nesterov": _ROUNDS,
    "fragments": ("streaming",),
    "overlap_steps": ("streaming",),
}
# Sync keys that only some codecs read: key -> the codecs that read it. The codecs' options
# come from the codec table; error feedback carries a lossy codec's residual, and codec none
# leaves none.
SYNC_CODEC_KEYS: dict[str, tuple[str, ...]] = {
    **{
        key: tuple(codec for codec, keys in CODEC_SYNC_KEYS.items() if key in keys)
        for key in sorted({key for keys in CODEC_SYNC_KEYS.values() for key in keys})
    },
    "error_feedback": tuple(codec for codec in CODEC_NAMES if codec != "none"),
}


def sync_key_applies(key: str, *, strategy: str, codec: str) -> bool:
    """Whether a run with `strategy` and `codec` reads the `sync` key `key` (keys that every
    strategy and codec read always apply). The planner asks it to leave unread keys out."""
    return strategy in SYNC_STRATEGY_KEYS.get(key, (strategy,)) and codec in SYNC_CODEC_KEYS.get(key, (codec,))


class SyncSection(Section):
    strategy: Literal["ddp", "diloco", "streaming", "delayed"] = Field(
        "diloco",
        description="ddp: all-reduce gradients across sites every step; diloco: outer step every H inner steps; "
        "streaming: fragments on staggered schedules with overlap; delayed: each exchange overlaps the next round.",
    )
    inner_steps: int = Field(50, gt=0, description="H: inner steps between outer synchronizations.")
    site_inner_steps: dict[str, int] = Field(
        default_factory=dict,
        description="Per-site H (faster sites run more inner steps per round); default inner_steps.",
    )
    round_seconds: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget of a round's compute: each site runs as many inner steps as fit, "
        "measured (diloco and delayed only); replaces inner_steps as the round's length.",
    )
    balance: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Without round_seconds: split each round's inner steps (sites x inner_steps, or the sum "
        "of site_inner_steps) between sites by their measured step times, so they reach the exchange together. "
        "auto: when the topology's sites differ and no site_inner_steps are set; always: also starting from "
        "site_inner_steps (a plan's split, then re-measured); never: every site runs its own H.",
    )
    balance_tolerance: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Balanced rounds: a site that turns slow (a straggler) stops at the planned round time "
        "times (1 + this), so it stalls the others by at most this fraction of a round plus one step.",
    )
    rebalance_gain: float = Field(
        0.03,
        ge=0,
        lt=1,
        description="Balanced rounds: a new split of a round's steps is taken only if it shortens the round "
        "by more than this fraction (hysteresis against noise in the measured step times).",
    )
    codec: CodecName = Field("none", description="Compression of what crosses the WAN.")
    block_size: int = Field(DEFAULT_BLOCK_SIZE, gt=0, description="int8/int4: elements per absmax block.")
    topk_fraction: float = Field(DEFAULT_TOPK_FRACTION, gt=0, le=1, description="topk: fraction of entries sent.")
    rank: int = Field(DEFAULT_LOWRANK_RANK, gt=0, description="lowrank: rank r.")
    value_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32",
        description="topk and lowrank: the dtype of the values (the factors) sent; bf16 halves their bytes, "
        "and error feedback carries the rounding into the next exchange.",
    )
    error_feedback: bool = Field(True, description="Carry the lossy codecs' residual into the next exchange.")
    fragments: int = Field(4, gt=0, description="streaming: number of model fragments.")
    overlap_steps: int = Field(
        1, ge=0, description="streaming: tau, inner steps an exchange overlaps before it is applied."
    )
    outer_lr: float = Field(0.7, gt=0, description="Outer SGD learning rate.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Outer SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum in the outer step.")
    timeout_seconds: float = Field(
        1800.0, gt=0, description="Timeout of one cross-site exchange (slow links need long ones)."
    )
    min_sites: int | None = Field(None, gt=0, description="Quorum size below which sites wait (default: all sites).")
    chunk_kib: int | None = Field(
        None,
        gt=0,
        description=(
            "Chunk of the pipelined WAN all-gather, KiB (default: the links' bandwidth-delay "
            "product, at least 256 KiB)."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> SyncSection:
        if self.strategy == "streaming" and self.overlap_steps >= self.inner_steps:
            raise ValueError(f"overlap_steps ({self.overlap_steps}) must be below inner_steps ({self.inner_steps})")
        if self.round_seconds is not None and self.strategy not in ("diloco", "delayed"):
            raise ValueError("round_seconds works with the diloco and delayed strategies only")
        if self.round_seconds is not None and self.site_inner_steps:
            raise ValueError(
                "round_seconds and site_inner_steps both set a round's length: keep one "
                "(round_seconds measures what fits, site_inner_steps fixes the counts)"
            )
        return self

    def ignored_keys(self, path: str) -> list[str]:
        found = self._unread(path, setting="strategy", readers=SYNC_STRATEGY_KEYS)
        found += self._unread(path, setting="codec", readers=SYNC_CODEC_KEYS)
        if "balance" in self.model_fields_set and self.round_seconds is not None:
            found.append(f"{path}.balance is ignored: {path}.round_seconds sets the rounds' length; remove one of them")
        elif "balance" in self.model_fields_set and self.site_inner_steps and self.balance == "auto":
            found.append(
                f"{path}.balance is ignored: auto keeps {path}.site_inner_steps as the rounds' split; remove it, "
                f"or set always to start from them and re-measure"
            )
        return found

    def inner_steps_for(self, site: str) -> int:
        return self.site_inner_steps.get(site, self.inner_steps)


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    sync: SyncSection = Field(default_factory=SyncSection)
