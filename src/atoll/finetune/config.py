"""FINETUNE.yaml: which stage to start from, how to adapt it, and on what text.

The `run`, `train`, `parallel` and `sync` sections are pre-training's own (same keys, same
meaning); `finetune` and `data` are specific to a fine-tuning stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from atoll.config.schema import ParallelSection, RunSection, Section, SyncSection, TrainSection

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LoraModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSection(Section):
    rank: int = Field(8, gt=0, description="r: rank of each adapter's A (r x in) and B (out x r).")
    alpha: float = Field(16.0, gt=0, description="lora_alpha: the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input during training.")
    target_modules: list[LoraModule] = Field(
        list(LORA_MODULES),
        min_length=1,
        description="Linear layers that get adapters (attention q/k/v/o, MLP gate/up/down).",
    )


class FinetuneSection(Section):
    parent: Path = Field(
        ...,
        description=(
            "The stage to start from: an atoll run (pre-training or an earlier fine-tuning stage) "
            "or a Hugging Face directory (Llama/Qwen2)."
        ),
    )
    method: Literal["lora", "full"] = Field(
        "lora", description="`lora`: train adapters (PEFT) on a frozen parent; `full`: train every weight."
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    chat_template: Path | None = Field(
        None, description="A Jinja chat template for this stage (default: the parent's, else atoll's)."
    )

    def ignored_keys(self, path: str) -> list[str]:
        return self._unread(path, setting="method", readers={"lora": ("lora",)})


# Data keys that only one format reads: key -> the formats that read it. Instructions are
# JSON Lines records kept whole; only plain text is cleaned of markup and cut into chunks.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "text_field": ("text",),
    "markup": ("text",),
    "chunk_chars": ("text",),
    "prompt_field": ("instruct",),
    "response_field": ("instruct",),
    "prompt_format": ("instruct",),
}


class ReplaySection(Section):
    share: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Share of the training rows taken from earlier data so the stage does not forget it: the "
            "stage's rows are this share replay and the rest its own data (0: no replay). The rows are "
            "chosen once, by run.seed, and stored with the stage's data, so the mix is deterministic "
            "and a resumed stage continues it."
        ),
    )
    source: Path | None = Field(
        None,
        description=(
            "Where replayed rows come from: an atoll run (a pre-training run's data.dir, or a "
            "fine-tuning stage's training rows, its own replay included) or a prepared pre-training "
            "data directory (manifest.json). Default: finetune.parent."
        ),
    )

    def ignored_keys(self, path: str) -> list[str]:
        if self.share == 0 and "source" in self.model_fields_set:
            return [f"{path}.source is ignored: {path}.share is 0; set a share or remove {path}.source"]
        return []


class FinetuneDataSection(Section):
    format: Literal["text", "instruct"] = Field(
        "text",
        description=(
            "`text`: plain documents, loss on every token; `instruct`: JSON Lines with "
            "prompt/response, loss on the response only."
        ),
    )
    paths: list[Path] = Field(
        ..., min_length=1, description="Files or directories to train on (.txt/.md/.rst, .gz, .jsonl)."
    )
    patterns: list[str] = Field(
        ["**/*.txt", "**/*.md", "**/*.rst", "**/*.jsonl", "**/*.txt.gz", "**/*.md.gz", "**/*.rst.gz", "**/*.jsonl.gz"],
        min_length=1,
        description="Glob patterns for files under a directory in `paths`.",
    )
    exclude: list[str] = Field([], description="Glob patterns (relative to the directory) of files to leave out.")
    markup: Literal["none", "rst"] = Field(
        "none", description="`rst`: drop reStructuredText directives, comments and heading underlines."
    )
    chunk_chars: int = Field(
        0,
        ge=0,
        description=(
            "Cut text documents at paragraph breaks into pieces of about this many characters "
            "before the split (0: whole documents)."
        ),
    )
    validation_paths: list[Path] = Field(
        [], description="Held-out files; default: documents chosen by a hash of their text."
    )
    validation_fraction: float = Field(
        0.05, gt=0, lt=1, description="Share of documents held out when validation_paths is empty."
    )
    seq_len: int = Field(256, gt=0, description="Tokens per training sequence (at most the parent's context).")
    text_field: str = Field("text", description="JSON Lines key of a text document.")
    prompt_field: str = Field("prompt", description="JSON Lines key of an instruction's prompt.")
    response_field: str = Field("response", description="JSON Lines key of an instruction's response.")
    prompt_format: Literal["chat", "plain"] = Field(
        "chat",
        description=(
            "instruct: `chat` wraps the prompt in the chat template as a user turn "
            "(as `atoll serve` does); `plain` uses it as is."
        ),
    )
    max_documents: int | None = Field(None, gt=0, description="Read at most this many documents (for trials).")
    replay: ReplaySection = Field(
        default_factory=ReplaySection,
        description="Rows of earlier training data mixed into this stage's (see replay.share).",
    )

    def ignored_keys(self, path: str) -> list[str]:
        found = self._unread(path, setting="format", readers=FORMAT_KEYS)
        if "validation_fraction" in self.model_fields_set and self.validation_paths:
            found.append(
                f"{path}.validation_fraction is ignored: {path}.validation_paths names the held-out files; "
                f"remove one of the two"
            )
        return found


class FinetuneConfig(Section):
    """A fine-tuning stage: `atoll finetune FINETUNE.yaml`."""

    run: RunSection = Field(default_factory=RunSection)
    finetune: FinetuneSection
    data: FinetuneDataSection
    train: TrainSection = Field(default_factory=TrainSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    sync: SyncSection = Field(default_factory=SyncSection)

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.parallel.shard != "ddp":
            raise ValueError(
                "parallel.shard: fine-tuning replicates the model in a site (ddp); fsdp is not supported "
                "for fine-tuning yet"
            )
        par = self.parallel
        if par.tp > 1 or par.pp > 1 or (par.zero or 0) > 0:
            raise ValueError(
                "parallel.tp/pp/zero: fine-tuning replicates the whole model on every rank of a site; "
                "set --parallel.tp=1 --parallel.pp=1 --parallel.zero=0"
            )
        return self
