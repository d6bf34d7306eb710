"""Fine-tuning data: documents or prompt/response pairs -> masked token windows in the run directory.

Fine-tuning sets are small next to pre-training corpora, so they are read, split and tokenized
in one process with the parent's tokenizer, and stored in ``RUN/data/``:

    train_tokens.npy, train_mask.npy            (N, seq_len + 1) ids, (N, seq_len) loss mask
    validation_tokens.npy, validation_mask.npy
    heldout.jsonl                               the held-out documents (an eval set for `atoll eval`)
    hashes.json                                 sha256 of every train and held-out document
    data.json                                   written last: counts, sources and file hashes

`mask[i, t]` says whether target `t` (token `t + 1`) counts in the loss: every real token of a
text document, only the response (and its end-of-text token) of an instruction. Documents are
split by a hash of their normalized text, so identical documents land on the same side and no
held-out text is trained on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atoll.data import file_sha256
from atoll.errors import AtollError
from atoll.finetune.config import FinetuneDataSection
from atoll.finetune.replay import draw_replay, replay_summary
from atoll.rundir.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

DATA_JSON = "data.json"
HASHES_JSON = "hashes.json"
HELDOUT_JSONL = "heldout.jsonl"
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Example:
    """One document (`text`) or one instruction (`prompt` and `response`)."""

    id: str
    text: str = ""
    prompt: str = ""
    response: str = ""

    @property
    def is_instruct(self) -> bool:
        return bool(self.prompt or self.response)

    @property
    def content(self) -> str:
        return f"{self.prompt}\n{self.response}" if self.is_instruct else self.text

    def to_json(self) -> dict[str, str]:
        if self.is_instruct:
            return {"id": self.id, "prompt": self.prompt, "response": self.response}
        return {"id": self.id, "text": self.text}


def content_hash(text: str) -> str:
    """sha256 of the text with whitespace runs collapsed: the identity of a document for overlap checks."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- reading


_RST_UNDERLINE = re.compile(r"^\s*([=\-~^\"`#*+:.'_])\1{2,}\s*$")
_RST_EXPLICIT = re.compile(r"^\s*\.\.(\s|$)")  # directives (.. note::), comments, targets (.. _x:)
_RST_OPTION = re.compile(r"^\s+:[\w-]+:(\s.*)?$")
_RST_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^`>]*>)?`")
_RST_LITERAL = re.compile(r"``([^`]+)``")


def strip_rst(text: str) -> str:
    """reStructuredText to plain text, roughly: directives (with their options), comments and
    heading rules go; roles keep their text; indented bodies (code, notes) stay."""
    lines: list[str] = []
    in_options = False  # the `:key: value` lines right under a directive
    for line in text.splitlines():
        if _RST_EXPLICIT.match(line):
            in_options = True
            continue
        if in_options and _RST_OPTION.match(line):
            continue
        in_options = False
        if not _RST_UNDERLINE.match(line):
            lines.append(line)
    out = "\n".join(lines)
    out = _RST_ROLE.sub(r"\1", out)
    out = _RST_LITERAL.sub(r"\1", out)
    out = re.sub(r"\n{3,}", "\n\n", out)
    return out.strip() + "\n"


def _read_text(path: Path) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise AtollError(f"cannot read {path} ({exc}): fix or exclude it (data.exclude)") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AtollError(
            f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start}): convert it or exclude it (data.exclude)"
        ) from None


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _files(path: Path, *, patterns: Sequence[str], exclude: Sequence[str]) -> list[tuple[Path, str]]:
    """(file, id prefix) pairs under `path`, sorted, so the order never depends on the file system."""
    if path.is_file():
        return [(path, path.name)]
    if not path.is_dir():
        raise AtollError(f"data path {path} does not exist: fix data.paths")
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in path.glob(pattern) if p.is_file())
    skipped = {p for pattern in exclude for p in path.glob(pattern)}
    files = sorted(found - skipped)
    if not files:
        raise AtollError(
            f"no files in {path} match {list(patterns)} (after excluding {list(exclude)}): check "
            "data.paths and data.patterns"
        )
    return [(f, f.relative_to(path).as_posix()) for f in files]


def _jsonl_records(path: Path, text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AtollError(f"{path}:{number} is not valid JSON ({exc.msg}): fix the line") from None
        if not isinstance(record, dict):
            raise AtollError(f"{path}:{number} is not a JSON object: each line must be {{...}}")
        yield number, record


def _field(record: dict[str, Any], key: str, *, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise AtollError(
            f"{where} has no string field {key!r} (keys: {', '.join(record) or 'none'}): set data.*_field "
            "to the right key"
        )
    return value


@dataclass(frozen=True)
class SourceFile:
    path: str
    sha256: str


def read_examples(paths: Sequence[Path], cfg: FinetuneDataSection) -> tuple[list[Example], list[SourceFile]]:
    """Every example under `paths` in a stable order, and the files they came from (with sha256).

    Raises AtollError for a missing path, unreadable file, malformed JSON line or missing field.
    """
    examples: list[Example] = []
    sources: list[SourceFile] = []
    for root in paths:
        for file, rel in _files(root, patterns=cfg.patterns, exclude=cfg.exclude):
            sources.append(SourceFile(str(file), file_sha256(file)))
            text = _read_text(file)
            if _is_jsonl(file):
                for number, record in _jsonl_records(file, text):
                    where = f"{file}:{number}"
                    if cfg.format == "instruct":
                        prompt = _field(record, cfg.prompt_field, where=where)
                        response = _field(record, cfg.response_field, where=where)
                        examples.append(Example(id=f"{rel}:{number}", prompt=prompt, response=response))
                    else:
                        examples.append(
                            Example(id=f"{rel}:{number}", text=_clean(_field(record, cfg.text_field, where=where), cfg))
                        )
            elif cfg.format == "instruct":
                raise AtollError(
                    f"{file}: instruct data must be JSON Lines (.jsonl) with {cfg.prompt_field!r} and "
                    f"{cfg.response_field!r}"
                )
            else:
                examples.append(Example(id=rel, text=_clean(text, cfg)))
            if cfg.max_documents is not None and len(examples) >= cfg.max_documents:
                return examples[: cfg.max_documents], sources
    return examples, sources


def _clean(text: str, cfg: FinetuneDataSection) -> str:
    return strip_rst(text) if cfg.markup == "rst" else text


def chunk_examples(examples: Sequence[Example], *, max_chars: int) -> list[Example]:
    """Cut text documents at blank lines into pieces of at most about `max_chars` (a longer
    paragraph stays whole); instructions stay as they are. `max_chars` 0 changes nothing."""
    if max_chars <= 0:
        return list(examples)
    out: list[Example] = []
    for ex in examples:
        if ex.is_instruct or len(ex.text) <= max_chars:
            out.append(ex)
            continue
        piece: list[str] = []
        size = 0
        parts = [p for p in re.split(r"\n\s*\n", ex.text) if p.strip()]
        for para in parts:
            if piece and size + len(para) > max_chars:
                out.append(Example(id=f"{ex.id}#{len(out)}", text="\n\n".join(piece) + "\n"))
                piece, size = [], 0
            piece.append(para)
            size += len(para) + 2
        if piece:
            out.append(Example(id=f"{ex.id}#{len(out)}", text="\n\n".join(piece) + "\n"))
    return out


def _hash_fraction(digest: str) -> float:
    return int(digest[:12], 16) / float(16**12)


def split_examples(
    examples: Sequence[Example], *, validation_fraction: float, validation: Sequence[Example] | None = None
) -> tuple[list[Example], list[Example], int]:
    """(train, validation, duplicates dropped). Exact duplicates (same normalized text) are kept
    once; a document is held out when the hash of its text falls below `validation_fraction`
    (or, with explicit `validation` examples, when it is one of them). At least one document
    is held out. Raises AtollError when nothing is left to train on."""
    seen: set[str] = set()
    unique: list[tuple[Example, str]] = []
    for ex in examples:
        digest = content_hash(ex.content)
        if digest not in seen and ex.content.strip():
            seen.add(digest)
            unique.append((ex, digest))
    dropped = len(examples) - len(unique)
    if validation is not None:
        held = {content_hash(ex.content): ex for ex in validation if ex.content.strip()}
        train = [ex for ex, d in unique if d not in held]
        dropped += len(unique) - len(train)
        val = list(held.values())
    else:
        train = [ex for ex, d in unique if _hash_fraction(d) >= validation_fraction]
        val = [ex for ex, d in unique if _hash_fraction(d) < validation_fraction]
        if not val and len(train) > 1:
            pick = min(unique, key=lambda pair: _hash_fraction(pair[1]))[0]
            train = [ex for ex in train if ex is not pick]
            val = [pick]
    if not train:
        raise AtollError(
            f"no training documents left ({len(examples)} read, {len(val)} held out): add data or lower "
            "data.validation_fraction"
        )
    if not val:
        raise AtollError("no held-out documents: add data.validation_paths or more documents")
    return train, val, dropped


# ---------------------------------------------------------------- tokenizing


def encode_text(
    examples: Sequence[Example], tokenizer: TextTokenizer, *, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Documents as one stream (each followed by end-of-text), cut into windows of `seq_len + 1`
    at stride `seq_len`; the last window is padded and its padding masked out."""
    stream: list[int] = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for ex in examples:
        stream.extend(tokenizer.encode(ex.text, add_bos=False))
        stream.append(tokenizer.eos_id)
    num = max(1, -(-(len(stream) - 1) // seq_len))
    tokens = np.full((num, seq_len + 1), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((num, seq_len), dtype=np.bool_)
    for i in range(num):
        window = stream[i * seq_len : i * seq_len + seq_len + 1]
        tokens[i, : len(window)] = window
        mask[i, : len(window) - 1] = True
    return tokens, mask


def instruct_prompt(tokenizer: TextTokenizer, prompt: str, *, prompt_format: str) -> str:
    """The text the model sees before a response: the chat template's user turn, or the prompt."""
    if prompt_format == "chat":
        return tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt


def encode_instruct(
    examples: Sequence[Example], tokenizer: TextTokenizer, *, seq_len: int, prompt_format: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """One padded row per instruction; loss only on the response and its end-of-text token.

    A response that does not fit is cut at `seq_len`; an instruction whose prompt alone fills
    the window is dropped (counted in the third return value).
    """
    rows: list[tuple[list[int], int]] = []
    dropped = 0
    for ex in examples:
        prompt_ids = tokenizer.encode(instruct_prompt(tokenizer, ex.prompt, prompt_format=prompt_format))
        if len(prompt_ids) >= seq_len:
            dropped += 1
            continue
        ids = prompt_ids + tokenizer.encode(ex.response, add_bos=False) + [tokenizer.eos_id]
        rows.append((ids[: seq_len + 1], len(prompt_ids)))
    tokens = np.full((len(rows), seq_len + 1), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), seq_len), dtype=np.bool_)
    for i, (ids, prompt_len) in enumerate(rows):
        tokens[i, : len(ids)] = ids
        # target t predicts ids[t + 1]: it counts when that token belongs to the response
        mask[i, prompt_len - 1 : len(ids) - 1] = True
    return tokens, mask, dropped


def encode_examples(
    examples: Sequence[Example], tokenizer: TextTokenizer, cfg: FinetuneDataSection
) -> tuple[np.ndarray, np.ndarray, int]:
    if cfg.format == "instruct":
        return encode_instruct(examples, tokenizer, seq_len=cfg.seq_len, prompt_format=cfg.prompt_format)
    tokens, mask = encode_text(examples, tokenizer, seq_len=cfg.seq_len)
    return tokens, mask, 0


# ---------------------------------------------------------------- the run's data directory


def _token_dtype(vocab_size: int) -> type[np.unsignedinteger[Any]]:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def prepare_data(
    cfg: FinetuneDataSection, tokenizer: TextTokenizer, out_dir: Path, *, parent: Path | None = None, seed: int = 0
) -> dict[str, Any]:
    """Read, split, tokenize and write the data of a stage into `out_dir`; returns data.json's content.

    With `cfg.replay.share` > 0, rows drawn (by `seed`) from `cfg.replay.source` or `parent` are
    appended to the training split (see atoll.finetune.replay); validation stays the stage's own.

    Replaces `out_dir` atomically (written beside it, then renamed). Raises AtollError for
    unreadable or empty data, or a split with nothing to train on.
    """
    examples, sources = read_examples(cfg.paths, cfg)
    examples = chunk_examples(examples, max_chars=cfg.chunk_chars)
    validation = None
    val_sources: list[SourceFile] = []
    if cfg.validation_paths:
        held, val_sources = read_examples(cfg.validation_paths, cfg)
        validation = chunk_examples(held, max_chars=cfg.chunk_chars)
    train, val, duplicates = split_examples(
        examples, validation_fraction=cfg.validation_fraction, validation=validation
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    summary: dict[str, Any] = {
        "format": cfg.format,
        "seq_len": cfg.seq_len,
        "sources": [{"path": s.path, "sha256": s.sha256} for s in sources + val_sources],
        "duplicates_dropped": duplicates,
        "splits": {},
        "files": {},
    }
    for split, items in (("train", train), ("validation", val)):
        tokens, mask, too_long = encode_examples(items, tokenizer, cfg)
        if len(tokens) == 0:
            raise AtollError(
                f"no {split} example fits data.seq_len {cfg.seq_len} ({too_long} prompts are longer): "
                "raise data.seq_len or shorten the prompts"
            )
        if split == "train" and cfg.replay.share > 0:
            if parent is None and cfg.replay.source is None:
                raise AtollError("data.replay.share is set but there is no parent: set data.replay.source")
            rows = draw_replay(
                cfg.replay, parent=parent or Path("."), num_rows=len(tokens), seq_len=cfg.seq_len, seed=seed
            )
            if rows is not None:
                summary["replay"] = replay_summary(rows, share=cfg.replay.share, own_rows=len(tokens))
                tokens, mask = np.concatenate([tokens, rows.tokens]), np.concatenate([mask, rows.mask])
        np.save(tmp / f"{split}_tokens.npy", tokens.astype(dtype))
        np.save(tmp / f"{split}_mask.npy", mask)
        summary["splits"][split] = {
            "documents": len(items),
            "sequences": len(tokens),
            "tokens": int(mask.sum()),
            "dropped_too_long": too_long,
        }
    with (tmp / HELDOUT_JSONL).open("w", encoding="utf-8") as f:
        for ex in val:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
    hashes = {
        "train": sorted({content_hash(ex.content) for ex in train}),
        "validation": sorted({content_hash(ex.content) for ex in val}),
    }
    (tmp / HASHES_JSON).write_text(json.dumps(hashes), encoding="utf-8")
    for path in sorted(tmp.iterdir()):
        summary["files"][path.name] = file_sha256(path)
    (tmp / DATA_JSON).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    t, v = summary["splits"]["train"], summary["splits"]["validation"]
    log.info(
        (
            "fine-tuning data: %d train documents (%d sequences, %d loss tokens), %d held out (%d loss "
            "tokens); %d duplicates dropped"
        ),
        t["documents"],
        t["sequences"],
        t["tokens"],
        v["documents"],
        v["tokens"],
        duplicates,
    )
    return summary


def read_data_summary(data_dir: Path, *, verify: bool = False) -> dict[str, Any]:
    """data.json of a stage's data directory; with `verify`, every file is checked against its sha256."""
    path = data_dir / DATA_JSON
    if not path.is_file():
        raise AtollError(
            f"{data_dir} holds no prepared fine-tuning data ({DATA_JSON} missing): start the stage again "
            "without --resume"
        )
    summary: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if verify:
        for name, digest in summary["files"].items():
            f = data_dir / name
            if not f.is_file() or file_sha256(f) != digest:
                raise AtollError(
                    f"fine-tuning data file {f} is missing or changed since the stage started: start the "
                    "stage again in a new run directory"
                )
    return summary


def read_hashes(data_dir: Path, split: str) -> set[str]:
    data = json.loads((data_dir / HASHES_JSON).read_text(encoding="utf-8"))
    return set(data[split])


def read_heldout(path: Path) -> list[Example]:
    """Examples of a JSON Lines file with `text` or `prompt`/`response` (heldout.jsonl, or a user's)."""
    out = []
    for number, record in _jsonl_records(path, _read_text(path)):
        where = f"{path}:{number}"
        ident = str(record.get("id", f"{path.name}:{number}"))
        if "prompt" in record or "response" in record:
            out.append(
                Example(
                    id=ident,
                    prompt=_field(record, "prompt", where=where),
                    response=_field(record, "response", where=where),
                )
            )
        else:
            out.append(Example(id=ident, text=_field(record, "text", where=where)))
    return out


class ExampleSet:
    """One split of a stage's prepared data: masked token windows, memory-mapped."""

    def __init__(self, data_dir: Path, split: str) -> None:
        if split not in SPLITS:
            raise AtollError(f"no split {split!r}: use one of {', '.join(SPLITS)}")
        self.tokens = np.load(data_dir / f"{split}_tokens.npy", mmap_mode="r")
        self.mask = np.load(data_dir / f"{split}_mask.npy", mmap_mode="r")
        assert self.tokens.shape[0] == self.mask.shape[0] and self.tokens.shape[1] == self.mask.shape[1] + 1

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.mask.shape[1])

    def gather(self, indices: Sequence[int] | np.ndarray) -> tuple[Any, Any]:
        """(tokens LongTensor (B, seq_len + 1), mask BoolTensor (B, seq_len)) of the rows `indices`."""
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.tokens[idx].astype(np.int64)), torch.from_numpy(np.array(self.mask[idx]))


class ExampleStream:
    """The order of one stage's training rows: epoch `e` visits a permutation seeded by (seed, e);
    step `k` takes the next `global_batch` rows, continuing into the next epoch. Every rank walks
    the same sequence and takes its slice, so the rows of a step do not depend on the rank count,
    and a resumed stage sees the rows the uninterrupted one would have."""

    def __init__(self, num_rows: int, *, global_batch: int, seed: int) -> None:
        if num_rows < 1:
            raise AtollError("the training split has no rows")
        self.num_rows = num_rows
        self.global_batch = global_batch
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_rows)
        return self._perm

    def next_indices(self) -> np.ndarray:
        parts = []
        needed = self.global_batch
        while needed:
            perm = self._permutation()
            take = min(needed, self.num_rows - self.offset)
            parts.append(perm[self.offset : self.offset + take])
            self.offset += take
            needed -= take
            if self.offset == self.num_rows:
                self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        return np.concatenate(parts)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or state.get("num_rows") != self.num_rows:
            raise AtollError(
                f"the checkpoint's data order (seed {state.get('seed')}, {state.get('num_rows')} rows) is "
                "not this stage's: resume with the config the stage was started with"
            )
        self.epoch, self.offset, self._perm = int(state["epoch"]), int(state["offset"]), None
