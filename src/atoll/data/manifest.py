"""The manifest of a prepared data directory: what the shards hold and how to check them.

`manifest.json` is written last and atomically: its presence marks a complete directory.
Format "atoll-shards", version 1. Fields added since version 1 was first written (per-split and
per-shard source mix, languages, the site map) are optional: a reader that does not know them
ignores them, and this reader fills defaults when they are absent. A change that an old reader
would misread (a new shard layout, a renamed field) must bump VERSION; `from_json` refuses any
version not in SUPPORTED_VERSIONS with a message that says to re-prepare.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atoll.data.tokenizer import file_sha256
from atoll.errors import AtollError

logger = logging.getLogger(__name__)

FORMAT = "atoll-shards"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "validation")
# How a user re-creates a data directory; every "prepare the data" message ends with it.
PREPARE_HINT = "re-run data preparation (atoll data prepare DATA.yaml, or atoll.data.prepare_demo_data)"


def token_dtype(vocab_size: int) -> str:
    """The shard dtype name for a vocabulary: "uint16" while every id fits, else "uint32"."""
    if vocab_size < 1:
        raise AtollError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise AtollError(f"vocab_size {vocab_size} does not fit uint32 token ids: use a smaller vocab")


def numpy_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype for a manifest dtype name ("uint16" or "uint32")."""
    if name not in ("uint16", "uint32"):
        raise AtollError(f"unknown shard dtype {name!r}: expected uint16 or uint32; {PREPARE_HINT}")
    return np.dtype(name).newbyteorder("<")


Mix = dict[str, dict[str, int]]  # name -> {"documents": n, "tokens": n}


@dataclass(frozen=True)
class ShardInfo:
    """One shard file. `num_documents` counts documents whose end-of-text token is in it;
    `sources` counts them by source (empty in manifests written before it existed)."""

    file: str
    sha256: str
    num_tokens: int
    num_documents: int
    sources: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitInfo:
    """One split: its totals, its shards in stream order, and its source and language mix
    (documents and tokens per name; empty in older manifests)."""

    num_documents: int
    num_tokens: int
    shards: tuple[ShardInfo, ...]
    sources: Mix = field(default_factory=dict)
    languages: Mix = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The contents of `manifest.json`: what the shards hold and how to check them.

    `sites` is the placement's site map: site -> split -> the shard files that site reads
    (an all-to-all placement lists every shard for every site). Empty when the data was
    prepared without sites; then every site reads every shard.
    """

    dtype: str
    seq_len: int
    vocab_size: int
    tokenizer_sha256: str
    splits: dict[str, SplitInfo]
    sources: dict[str, int] = field(default_factory=dict)
    tokenizer_file: str = TOKENIZER_FILE
    format: str = FORMAT
    version: int = VERSION
    placement: str = "all"
    sites: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to `manifest.json` (optional fields only when set)."""

        def shard(s: ShardInfo) -> dict[str, Any]:
            out: dict[str, Any] = {
                "file": s.file,
                "sha256": s.sha256,
                "num_tokens": s.num_tokens,
                "num_documents": s.num_documents,
            }
            if s.sources:
                out["sources"] = dict(s.sources)
            return out

        def split(info: SplitInfo) -> dict[str, Any]:
            out: dict[str, Any] = {"num_documents": info.num_documents, "num_tokens": info.num_tokens}
            if info.sources:
                out["sources"] = info.sources
            if info.languages:
                out["languages"] = info.languages
            out["shards"] = [shard(s) for s in info.shards]
            return out

        data: dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "dtype": self.dtype,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "tokenizer": {"file": self.tokenizer_file, "sha256": self.tokenizer_sha256},
            "sources": dict(self.sources),
            "splits": {name: split(info) for name, info in self.splits.items()},
        }
        if self.sites:
            data["placement"] = self.placement
            data["sites"] = {site: {sp: list(files) for sp, files in m.items()} for site, m in self.sites.items()}
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: Path | str) -> Manifest:
        """Parse a manifest object; `where` names the file in errors. Raises `AtollError`."""
        try:
            if data["format"] != FORMAT:
                raise AtollError(
                    f"{where} is not an atoll shard manifest (format {data['format']!r}): "
                    f"point at a directory made by atoll's data preparation or {PREPARE_HINT}"
                )
            if data["version"] not in SUPPORTED_VERSIONS:
                raise AtollError(
                    f"{where} has manifest version {data['version']}, this atoll reads "
                    f"version {', '.join(map(str, SUPPORTED_VERSIONS))}: {PREPARE_HINT}"
                )

            def mix(raw: Any) -> Mix:
                return {str(k): {str(f): int(n) for f, n in v.items()} for k, v in (raw or {}).items()}

            splits = {
                name: SplitInfo(
                    num_documents=int(split["num_documents"]),
                    num_tokens=int(split["num_tokens"]),
                    shards=tuple(
                        ShardInfo(
                            file=str(s["file"]),
                            sha256=str(s["sha256"]),
                            num_tokens=int(s["num_tokens"]),
                            num_documents=int(s["num_documents"]),
                            sources={str(k): int(v) for k, v in s.get("sources", {}).items()},
                        )
                        for s in split["shards"]
                    ),
                    sources=mix(split.get("sources")),
                    languages=mix(split.get("languages")),
                )
                for name, split in data["splits"].items()
            }
            sites = {
                str(site): {str(sp): tuple(str(f) for f in files) for sp, files in m.items()}
                for site, m in data.get("sites", {}).items()
            }
            manifest = cls(
                dtype=str(data["dtype"]),
                seq_len=int(data["seq_len"]),
                vocab_size=int(data["vocab_size"]),
                tokenizer_file=str(data["tokenizer"]["file"]),
                tokenizer_sha256=str(data["tokenizer"]["sha256"]),
                sources={str(k): int(v) for k, v in data["sources"].items()},
                splits=splits,
                placement=str(data.get("placement", "all")),
                sites=sites,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, AtollError):
                raise
            raise AtollError(f"{where} is malformed ({exc!r}): {PREPARE_HINT}") from exc
        numpy_dtype(manifest.dtype)  # reject an unknown dtype now, not at first read
        known = {s.file for split in manifest.splits.values() for s in split.shards}
        for site, m in manifest.sites.items():
            unknown = [f for files in m.values() for f in files if f not in known]
            if unknown:
                raise AtollError(f"{where}: site {site!r} lists shard {unknown[0]} that no split has: {PREPARE_HINT}")
        return manifest

    def site_shards(self, split: str, site: str | None) -> tuple[ShardInfo, ...]:
        """The shards of `split` that `site` reads, in stream order.

        `site=None`, or a manifest without a site map, gives every shard of the split. Raises
        `AtollError` for an unknown split, or a site the site map does not name.
        """
        if split not in self.splits:
            raise AtollError(f"no split {split!r} in this data: use one of {', '.join(sorted(self.splits))}")
        shards = self.splits[split].shards
        if site is None or not self.sites:
            return shards
        if site not in self.sites:
            raise AtollError(
                f"site {site!r} has no data in this manifest: its sites are {', '.join(self.sites)}; "
                "fix the site name or placement.sites in the data config"
            )
        files = set(self.sites[site].get(split, ()))
        return tuple(s for s in shards if s.file in files)

    @classmethod
    def load(cls, data_dir: Path | str) -> Manifest:
        """Read `data_dir/manifest.json`.

        Raises `AtollError` if it is missing (the data was never prepared, or preparation did
        not finish), is not JSON, or is not an atoll shard manifest of this version.
        """
        path = Path(data_dir) / MANIFEST_FILE
        if not path.is_file():
            raise AtollError(f"no {MANIFEST_FILE} in {data_dir}: prepare the data first ({PREPARE_HINT})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AtollError(f"{path} is not valid JSON ({exc}): {PREPARE_HINT}") from exc
        return cls.from_json(data, where=path)

    def shard_path(self, data_dir: Path | str, shard: ShardInfo) -> Path:
        """Where `shard` lives when this manifest is in `data_dir`."""
        return Path(data_dir) / shard.file

    def verify(
        self,
        data_dir: Path | str,
        *,
        tokenizer_path: Path | str | None = None,
        check_hashes: bool = True,
    ) -> None:
        """Check that the files in `data_dir` are the ones this manifest describes.

        Every shard must exist with the byte size implied by its token count, and (with
        `check_hashes`, which reads every shard) its SHA-256 must match. The tokenizer in
        `data_dir` must match the manifest; a `tokenizer_path` the caller means to use
        instead must match too. Raises `AtollError` naming the first bad file.
        """
        data_dir = Path(data_dir)
        own_tokenizer = data_dir / self.tokenizer_file
        if not own_tokenizer.is_file():
            raise AtollError(f"tokenizer {own_tokenizer} is missing: {PREPARE_HINT} into {data_dir}")
        own_sha = file_sha256(own_tokenizer)
        if own_sha != self.tokenizer_sha256:
            raise AtollError(
                f"tokenizer {own_tokenizer} was changed after the shards were written "
                f"(sha256 {own_sha} != {self.tokenizer_sha256}): {PREPARE_HINT} into {data_dir}"
            )
        if tokenizer_path is not None:
            other = Path(tokenizer_path)
            if not other.is_file():
                raise AtollError(
                    f"tokenizer {other} does not exist: pass an existing tokenizer.json or use {own_tokenizer}"
                )
            other_sha = file_sha256(other)
            if other_sha != self.tokenizer_sha256:
                raise AtollError(
                    f"tokenizer {other} does not match the shards in {data_dir} "
                    f"(sha256 {other_sha} != {self.tokenizer_sha256}): re-prepare the data "
                    f"with this tokenizer or use {own_tokenizer}"
                )
        itemsize = numpy_dtype(self.dtype).itemsize
        for split_name, split in self.splits.items():
            for shard in split.shards:
                path = self.shard_path(data_dir, shard)
                if not path.is_file():
                    raise AtollError(f"shard {path} of split {split_name!r} is missing: {PREPARE_HINT} into {data_dir}")
                size = path.stat().st_size
                expected = shard.num_tokens * itemsize
                if size != expected:
                    raise AtollError(
                        f"shard {path} has {size} bytes, expected {expected} "
                        f"({shard.num_tokens} {self.dtype} tokens; truncated?): "
                        f"{PREPARE_HINT} into {data_dir}"
                    )
                if check_hashes:
                    sha = file_sha256(path)
                    if sha != shard.sha256:
                        raise AtollError(
                            f"shard {path} is corrupted (sha256 {sha} != {shard.sha256}): "
                            f"{PREPARE_HINT} into {data_dir}"
                        )


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    """Write `out_dir/manifest.json` atomically: readers see no manifest or a complete one."""
    path = out_dir / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
