"""Replay: rows of earlier training data mixed into a fine-tuning stage, so it does not forget.

`data.replay.share` of a stage's training rows come from `data.replay.source` (default: the
stage's parent): a pre-training run's data directory (token windows of `seq_len + 1`, every
target counted), or a fine-tuning stage's own training rows (its replay included, so a chain
keeps replaying what came before). The rows are drawn once, when the stage's data is prepared,
by a generator seeded with `run.seed`, and appended to ``train_tokens.npy``; the example stream
shuffles them with the stage's own rows, so over each epoch exactly `share` of the rows are
replay, and a resumed stage continues the same mix from its saved position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atoll.data.loader import TokenDataset
from atoll.errors import AtollError
from atoll.finetune.config import ReplaySection
from atoll.rundir.layout import CONFIG_YAML, DATA_DIR

MANIFEST_JSON = "manifest.json"
LINEAGE_JSON = "lineage.json"


@dataclass(frozen=True)
class ReplayRows:
    """Rows drawn for replay: tokens (R, seq_len + 1), mask (R, seq_len), and where they came from."""

    tokens: np.ndarray
    mask: np.ndarray
    source: str
    kind: str  # "pretrain-data" or "finetune-stage"


def replay_count(num_rows: int, share: float) -> int:
    """Rows to add to `num_rows` own rows so that replay is `share` of the total: R / (N + R) ~ share."""
    if share <= 0:
        return 0
    return max(1, round(num_rows * share / (1.0 - share)))


def _pretrain_data_dir(run_dir: Path) -> Path:
    import yaml

    config = yaml.safe_load((run_dir / CONFIG_YAML).read_text(encoding="utf-8")) or {}
    data_dir = Path(str((config.get("data") or {}).get("dir", "")))
    if not (data_dir / MANIFEST_JSON).is_file():
        raise AtollError(
            f"data.replay: the pre-training run {run_dir} trained on {data_dir}, which holds no {MANIFEST_JSON} "
            "here: set data.replay.source to its prepared data directory"
        )
    return data_dir


def _resolve(source: Path) -> tuple[Path, str]:
    """(directory to read, kind) for a replay source; raises AtollError naming the fix."""
    if (source / MANIFEST_JSON).is_file():
        return source, "pretrain-data"
    if (source / LINEAGE_JSON).is_file() and (source / DATA_DIR / "train_tokens.npy").is_file():
        return source / DATA_DIR, "finetune-stage"
    if (source / CONFIG_YAML).is_file() and (source / "model.json").is_file():
        return _pretrain_data_dir(source), "pretrain-data"
    raise AtollError(
        f"data.replay.source {source} is neither an atoll run nor a prepared data directory ({MANIFEST_JSON}): "
        "a Hugging Face parent records no training data; set data.replay.source to data to replay, or "
        "data.replay.share to 0"
    )


def _draw(num_available: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` row indices: without repetition while the source lasts, then further permutations."""
    parts = []
    while count > 0:
        take = min(count, num_available)
        parts.append(rng.permutation(num_available)[:take])
        count -= take
    return np.sort(np.concatenate(parts)) if len(parts) == 1 else np.concatenate(parts)


def draw_replay(cfg: ReplaySection, *, parent: Path, num_rows: int, seq_len: int, seed: int) -> ReplayRows | None:
    """The replay rows for a stage with `num_rows` own rows of `seq_len` targets, or None at share 0.

    Pure apart from reading the source. Raises AtollError for a source without training data or
    one whose rows have another length.
    """
    count = replay_count(num_rows, cfg.share)
    if count == 0:
        return None
    source = Path(cfg.source) if cfg.source is not None else Path(parent)
    where, kind = _resolve(source)
    rng = np.random.default_rng((seed, 0x5EED))
    if kind == "pretrain-data":
        data = TokenDataset(where, "train", seq_len=seq_len)
        idx = _draw(len(data), count, rng)
        tokens = np.stack([np.asarray(data[int(i)], dtype=np.int64) for i in idx])
        mask = np.ones((count, seq_len), dtype=np.bool_)
    else:
        src_tokens = np.load(where / "train_tokens.npy", mmap_mode="r")
        src_mask = np.load(where / "train_mask.npy", mmap_mode="r")
        if src_mask.shape[1] != seq_len:
            raise AtollError(
                f"data.replay.source {source} has rows of {src_mask.shape[1]} tokens, this stage {seq_len}: "
                "use the same data.seq_len"
            )
        idx = _draw(len(src_tokens), count, rng)
        tokens = np.asarray(src_tokens[idx], dtype=np.int64)
        mask = np.array(src_mask[idx], dtype=np.bool_)
    assert tokens.shape == (count, seq_len + 1) and mask.shape == (count, seq_len)
    return ReplayRows(tokens=tokens, mask=mask, source=str(source), kind=kind)


def replay_summary(rows: ReplayRows, *, share: float, own_rows: int) -> dict[str, object]:
    """The `replay` entry of data.json."""
    return {
        "share": share,
        "source": rows.source,
        "kind": rows.kind,
        "sequences": len(rows.tokens),
        "own_sequences": own_rows,
        "tokens": int(rows.mask.sum()),
        "rows_sha256": _digest(rows.tokens),
    }


def _digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()
